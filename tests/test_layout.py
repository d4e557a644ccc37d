"""The house's layout, read from the code itself: the root holds the entry scripts and nothing else, no script is
imported as a library, no import cycle anywhere (imports inside functions count), model.py is the model alone, and
no file is too long to read. The imports are parsed (ast), not run."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('data', 'model', 'train', 'finetune', 'dpo', 'reward', 'rl', 'evaluate', 'sample', 'serve', 'export',
           'bench')  # in lifecycle order
LIBRARY_SCRIPTS = ('model', 'sample')  # the documented Python API: `from model import GPT`, `from sample import generate`


def modules():
    """{module name: path} of every Python module of the project outside tests/: the root scripts and nanolab.*."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, '*.py'))}
    found.update({'nanolab.' + os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, 'nanolab', '*.py'))
                  if not p.endswith('__init__.py')})
    return found


def imports(path, known):
    """The project modules that the file at path imports, anywhere in it (functions and branches included)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from nanolab import engine` imports the module nanolab.engine; `from nanolab.x import y` nanolab.x
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph():
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_the_root_holds_the_entry_scripts_and_nothing_else():
    assert sorted(modules()[m] for m in modules() if '.' not in m) == \
        sorted(os.path.join(ROOT, f'{s}.py') for s in SCRIPTS)


def test_no_script_is_imported_as_a_library():
    g = graph()
    for m, deps in g.items():
        scripts = {d for d in deps if not d.startswith('nanolab.')}
        allowed = {'model'} if m.startswith('nanolab.') else set(LIBRARY_SCRIPTS)
        assert scripts <= allowed, f'{m} imports the script(s) {sorted(scripts - allowed)}'


def test_no_import_cycle():
    g, state, path = graph(), {}, []

    def visit(m):  # depth-first; a module met again while on the path closes a cycle
        state[m] = 'open'
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 'open':
                pytest.fail('import cycle: ' + ' -> '.join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 'done'
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a package module that imports a script, and two that import each other."""
    (tmp_path / 'nanolab').mkdir()
    (tmp_path / 'train.py').write_text('import model\n')
    (tmp_path / 'model.py').write_text('def f():\n    from nanolab import a\n')  # inside a function: still counts
    (tmp_path / 'nanolab' / 'a.py').write_text('from nanolab.b import x\n')
    (tmp_path / 'nanolab' / 'b.py').write_text('import train\nfrom model import GPT\n')
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    g = graph()
    assert g['model'] == {'nanolab.a'} and g['nanolab.a'] == {'nanolab.b'} and g['nanolab.b'] == {'train', 'model'}
    with pytest.raises(AssertionError, match=r'nanolab.b imports the script\(s\) \[.train.\]'):
        test_no_script_is_imported_as_a_library()
    with pytest.raises(pytest.fail.Exception, match='model -> nanolab.a -> nanolab.b -> model'):
        test_no_import_cycle()


def test_files_stay_readable():
    """model.py is the model alone (~450 lines at most); no Python or JavaScript file outside tests/ passes 600."""
    lines = lambda p: sum(1 for _ in open(p, encoding='utf-8'))
    assert lines(os.path.join(ROOT, 'model.py')) <= 450
    files = list(modules().values()) + glob.glob(os.path.join(ROOT, 'web', '**', '*.js'), recursive=True)
    long = {os.path.relpath(p, ROOT): lines(p) for p in files if lines(p) > 600}
    assert not long, f'over 600 lines: {long}'


@pytest.mark.parametrize('name, home', [('load_model', 'nanolab.checkpoint'), ('KVCache', 'nanolab.kv_cache'),
                                        ('resolve_device', 'nanolab.device'), ('write_atomic', 'nanolab.files')])
def test_a_name_that_left_model_py_says_where_it_went(name, home):
    with pytest.raises(ImportError, match=f'from {home} import {name}'):
        exec(f'from model import {name}', {})
    import model
    with pytest.raises(AttributeError):
        model.no_such_name  # anything else is a plain AttributeError (hasattr works)
    assert not hasattr(model, 'no_such_name')


@pytest.mark.parametrize('script', ['sample', 'serve', 'model'])
def test_importing_a_library_script_does_nothing(script):
    """sample.py and serve.py keep their code in functions: importing one reads no flags and starts nothing, so an
    argument that their configure() would refuse passes unnoticed."""
    code = f'import sys; sys.argv = ["x", "--no_such_flag=1"]; import {script}; print("imported")'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == 'imported', out.stderr[-500:]
