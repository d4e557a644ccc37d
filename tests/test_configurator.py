"""
Tests for nanolab/configurator.py and its strict rules: config files apply first, in order, then flags; an unknown key
or a value of the wrong type is one line naming the fix; choices are checked on the final values.

    python -m pytest -q tests/test_configurator.py
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # don't depend on conftest.py for the import
from nanolab.configurator import configure

CHOICES = {'init_from': None, 'dtype': ('auto', 'float32', 'bfloat16', 'float16')}

# a stand-in for a script's hyperparameter block; also written out for the subprocess tests
SCRIPT = textwrap.dedent("""\
    import os
    # -----------------------------------------------------------------------------
    out_dir = 'out'          # where checkpoints go
    max_iters = 5000         # total optimizer steps
    learning_rate = 6e-4     # peak LR
    compile = True           # torch.compile the model
    init_from = 'scratch'    # 'scratch' | 'resume' | model source
    dtype = 'auto'           # 'auto' | 'float32' | 'bfloat16' | 'float16'
    start = '#'              # prompt; the '#' in the string is not a comment
    betas = (0.9, 0.95)      # AdamW betas
    n_kv_head = None         # None = n_head
    # -----------------------------------------------------------------------------
    from nanolab.configurator import configure
    config = configure(globals(), choices={CHOICES!r})
    print('RESULT', max_iters, learning_rate, compile)
    """).replace('{CHOICES!r}', repr(CHOICES))


def fake_globals(tmp=[]):
    """The globals of SCRIPT run up to its configure() call, with __file__ naming a copy of it."""
    if not tmp:
        import tempfile
        tmp.append(os.path.join(tempfile.mkdtemp(), 'script.py'))
        with open(tmp[0], 'w') as f:
            f.write(SCRIPT)
    g = {'__name__': '__main__', '__file__': tmp[0], '_private': 1, 'configure': configure}
    exec(SCRIPT.split('from nanolab.configurator')[0], g)  # run only the hyperparameter block
    g['ARCHS'] = ('gpt2', 'llama')  # a tuple constant after the block: not a setting
    return g


def apply(argv, g=None):
    g = fake_globals() if g is None else g
    return g, configure(g, argv, choices=CHOICES, verbose=False)


def error(argv):
    """The message of the SystemExit that configure raises for argv."""
    with pytest.raises(SystemExit) as e:
        apply(argv)
    msg = str(e.value.code)
    assert msg.startswith('config error: '), msg
    return msg


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_and_keys():
    g, config = apply([])
    assert config == {'out_dir': 'out', 'max_iters': 5000, 'learning_rate': 6e-4, 'compile': True,
                      'init_from': 'scratch', 'dtype': 'auto', 'start': '#', 'betas': (0.9, 0.95),
                      'n_kv_head': None}  # the settings block only: no modules, functions, constants, _private names
    # a plain dict (no __file__) is all settings; a setting that is not a plain value is an error
    assert configure({'a': 1, 'b': (1, 2)}, [], verbose=False) == {'a': 1, 'b': (1, 2)}
    with pytest.raises(SystemExit, match='setting f = .* is not a plain value'):
        configure({'a': 1, 'f': len}, [], verbose=False)


def test_flags_types_and_returned_dict(capsys):
    g = fake_globals()
    config = configure(g, ['--max_iters=100', '--learning_rate=1', '--compile=false', '--out_dir=runs/a',
                           "--init_from='resume'", '--betas=[0.8, 0.9]', '--n_kv_head=2'], choices=CHOICES)
    assert config['max_iters'] == 100 and config['out_dir'] == 'runs/a' and config['init_from'] == 'resume'
    assert config['learning_rate'] == 1.0 and isinstance(config['learning_rate'], float)  # int ok for float
    assert config['compile'] is False and config['betas'] == (0.8, 0.9) and config['n_kv_head'] == 2
    assert config == {k: g[k] for k in config}  # the returned dict is the final globals
    out = capsys.readouterr().out
    assert 'max_iters = 100  (from --max_iters)' in out and 'dtype' not in out  # only overrides print


@pytest.mark.parametrize('argv, want', [(['--compile=False'], False), (['--compile=false'], False),
                                        (['--compile=TRUE'], True), (['--compile=False', '--compile'], True)])
def test_booleans(argv, want):
    assert apply(argv)[1]['compile'] is want


def test_split_on_first_equals():
    assert apply(['--start=a=b=c'])[1]['start'] == 'a=b=c'


def test_files_before_flags_whatever_the_order(tmp_path):
    a = write(tmp_path, 'a.py', """\
        # what it trains
        import math
        from math import sqrt                          # imported helpers are not settings
        max_iters = 10
        learning_rate = learning_rate * math.sqrt(4)   # reads the default
        _scratch = 3                                   # private helpers are allowed
        """)
    b = write(tmp_path, 'b.py', 'max_iters = 20\ndtype = "float32"\n')
    config = apply(['--max_iters=7', a, b])[1]  # the flag comes first yet wins; b wins over a
    assert config['max_iters'] == 7 and config['dtype'] == 'float32'
    assert config['learning_rate'] == pytest.approx(1.2e-3)


def test_typo_in_flag_suggests_nearest():
    msg = error(['--learning_rat=1e-3'])
    assert "'learning_rat'" in msg and 'learning_rate' in msg and '--learning_rat' in msg and '--help' in msg


def test_typo_in_config_file_suggests_nearest(tmp_path):
    path = write(tmp_path, 'typo.py', 'max_iter = 100\n')
    msg = error([path])
    assert "'max_iter'" in msg and 'max_iters' in msg and path in msg


@pytest.mark.parametrize('argv, words', [
    (['--max_iters=abc'], ['max_iters', 'abc', 'int']),
    (['--n_kv_head=abc'], ['n_kv_head', "'abc'", 'Python literal', 'quote']),
    (['--zzz=1'], ['zzz', '--help']),
    (['--max_iters=True'], ['max_iters', 'int', 'bool']),  # bool is not an int
    (['--learning_rate=True'], ['learning_rate', 'float', 'bool']),  # nor a float
    (['--compile=1'], ['compile', 'bool', 'int']),
    (['--compile=yes'], ['compile', 'yes']),
    (['--learning_rate=fast'], ['learning_rate', 'float']),
    (['--max_iters=1e4'], ['max_iters', 'float', '10000']),  # suggests the integer form
    (['--max_iters=2.5'], ['max_iters', 'float']),
    (['--max_iters'], ['--max_iters=VALUE']),  # bare flag only for bools
    (['--betas=0.9'], ['betas', 'tuple']),
    (['max_iters=10'], ['max_iters=10', '--key=value']),  # forgot the dashes
    (['--dtype=fp8'], ['dtype', 'fp8', "'bfloat16'", '--dtype']),
])
def test_bad_flags(argv, words):
    msg = error(argv)
    for w in words:
        assert w in msg, (w, msg)
    assert '\n' not in msg.strip() and 'Traceback' not in msg


def test_bad_config_files(tmp_path):
    assert "'fp8'" in error([write(tmp_path, 'c.py', 'dtype = "fp8"\n')])  # choices hold for files too
    assert 'max_iters' in error([write(tmp_path, 'd.py', 'max_iters = 1e4\n')])
    assert 'compile' in error([write(tmp_path, 'e.py', 'compile = 0\n')])
    msg = error([write(tmp_path, 'f.py', 'x = (\n')])
    assert 'f.py line 1' in msg and 'SyntaxError' in msg
    msg = error([write(tmp_path, 'g.py', 'max_iters = 3\nout_dir = foo\n')])
    assert 'g.py line 2' in msg and 'NameError' in msg
    missing = str(tmp_path / 'nope.py')
    assert missing in error([missing])


def test_subprocess_error_and_help(tmp_path):
    script = write(tmp_path, 'script.py', SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                                       env=env, cwd=tmp_path, timeout=60)
    r = run('--learning_rat=1')
    assert r.returncode != 0 and 'Traceback' not in r.stderr and r.stdout == ''
    assert r.stderr.startswith('config error: ') and 'learning_rate' in r.stderr
    r = run('--help')
    assert r.returncode == 0, r.stderr
    assert 'total optimizer steps' in r.stdout and "max_iters = 5000" in r.stdout
    assert "start = '#'" in r.stdout and 'not a comment' in r.stdout
    assert "one of: 'auto'" in r.stdout and 'RESULT' not in r.stdout  # exits before the script goes on
    r = run('--max_iters=3', '--compile')
    assert r.returncode == 0 and 'RESULT 3 0.0006 True' in r.stdout and 'max_iters = 3  (from --max_iters)' in r.stdout


@pytest.mark.parametrize('argv, want', [
    (['--max_iters', '8'], "write --max_iters=8, one argument with '='"),  # argparse's spelling
    (['--prompt', 'ROMEO:'], "write --start=ROMEO:, one argument with '=' (--prompt is not a key here; it is called start)"),
    (['--lerning_rate', '3e-4'], 'write --learning_rate=3e-4'),  # a typo, the close key
    (['--prompt=ROMEO:'], "unknown key 'prompt' (from --prompt=ROMEO:): here it is called start: --start=VALUE"),
    (['--lr=3e-4'], 'here it is called learning_rate: --learning_rate=VALUE'),
    (['--epochs=2'], 'here it is called max_iters (iterations, not epochs'),
])
def test_flags_from_elsewhere_get_our_name_suggested_never_accepted(argv, want):
    assert want in error(argv)


def test_an_alias_is_only_suggested_when_the_script_has_that_setting():
    msg = error(['--num_tokens=5'])  # SCRIPT has no max_new_tokens: no false lead
    assert 'max_new_tokens' not in msg and "unknown key 'num_tokens'" in msg


@pytest.mark.parametrize('script', ['data', 'train', 'finetune', 'dpo', 'reward', 'rl', 'evaluate', 'sample', 'serve',
                                    'export', 'bench'])
def test_every_script_describes_its_settings_without_running(script):
    """describe() reads a script's settings block and its CHOICES from the source: names, defaults, types, comments
    and allowed values, in order (what a form for the script's settings is built from). Nothing of the script runs:
    its configure() would read this process's argv and stop on it."""
    from nanolab.configurator import describe, read_settings, settings_names
    path = os.path.join(ROOT, f'{script}.py')
    rows = describe(path)
    assert [r['name'] for r in rows] == settings_names(path) and len(rows) >= 5
    assert {r['name']: r['default'] for r in rows} == read_settings(path)
    for r in rows:
        assert r['type'] == type(r['default']).__name__ and r['comment'], f'{script}.{r["name"]} has no comment'
        if r['choices'] is not None:
            assert r['default'] in r['choices'], f'{script}.{r["name"]}: the default is not an allowed value'


def test_describe_reads_choices_from_where_the_script_imports_them(tmp_path):
    from nanolab.configurator import describe
    from nanolab.device import DTYPES
    from model import ARCHS
    rows = {r['name']: r for r in describe(os.path.join(ROOT, 'train.py'))}
    assert rows['dtype']['choices'] == list(DTYPES) and rows['arch']['choices'] == list(ARCHS)
    assert rows['positions']['choices'][0] == '' and rows['max_iters']['choices'] is None
    data = {r['name']: r for r in describe(os.path.join(ROOT, 'data.py'))}
    assert 'shakespeare_char' in data['dataset']['choices'] and 'bench' in data['dataset']['choices']
    script = tmp_path / 'x.py'  # a name imported from outside the package is refused, not imported
    script.write_text("from os import sep\n# ---\nk = 'a'  # k\n# ---\nCHOICES = {'k': (sep,)}\n")
    with pytest.raises(ValueError, match='CHOICES uses sep'):
        describe(str(script))
