"""
Strict configuration for every nanolab script: nanoGPT's configurator.py, with checks.
A script keeps its hyperparameters as commented module-level globals in its settings block, the
lines between its first two rule lines (`# -----...`), then calls
    config = configure(globals(), choices={'dtype': DTYPES})
and runs as `python train.py [configs/x.py ...] [--key=value ...]` or `python train.py --help`. A
config file may also be JSON, such as the config.json a run writes: `python train.py
out-x/config.json --out_dir=out-y` repeats it. The settings are exactly the names that block
assigns (settings_names), so the constants, imports and helpers after it are never settings,
whatever their type; describe() reads them, with their comments and allowed values (the script's
CHOICES dict), without running the script.

The rules: files apply first, in order, then flags, whatever their order; an unknown key is an
error that suggests the closest ones; a value must have its default's type (an int for a float is
fine); `choices` restricts string options. Every failure is SystemExit('config error: ...'): one
message, exit code 1, no traceback. Bad input found later, at run time, ends a script the same way:
fail() and cli_errors() below.
"""
import ast
import difflib
import importlib
import json
import os
import sys
import traceback
from contextlib import contextmanager

CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list)  # not modules, functions, classes


def _fail(msg):
    # SystemExit(str) prints the message to stderr and exits 1, without a traceback
    raise SystemExit(f'config error: {msg}')


# names users bring from nanoGPT's guides, Hugging Face and other tools -> what we call the setting
# (and a note); suggested in the error, never accepted: one name per setting
ALIASES = {
    'prompt': ('start', ''), 'num_tokens': ('max_new_tokens', ''),
    'max_tokens': ('max_new_tokens', ''), 'n_tokens': ('max_new_tokens', ''),
    'length': ('max_new_tokens', ''), 'temp': ('temperature', ''), 'lr': ('learning_rate', ''),
    'epochs': ('max_iters', ' (iterations, not epochs: an epoch is train tokens / (batch_size x '
                            'block_size x gradient_accumulation_steps) iterations)'),
    'num_epochs': ('max_iters', ' (iterations, not epochs)'), 'steps': ('max_iters', ''),
    'max_steps': ('max_iters', ''), 'num_train_epochs': ('max_iters', ' (iterations, not epochs)'),
    'n_layers': ('n_layer', ''), 'num_layers': ('n_layer', ''), 'n_heads': ('n_head', ''),
    'num_heads': ('n_head', ''), 'd_model': ('n_embd', ''), 'hidden_size': ('n_embd', ''),
    'context_length': ('block_size', ''), 'seq_len': ('block_size', ''),
    'ctx_len': ('block_size', ''), 'bs': ('batch_size', ''), 'batch': ('batch_size', ''),
    'model': ('init_from', ''), 'checkpoint': ('init_from', ''), 'ckpt': ('init_from', ''),
    'output_dir': ('out_dir', ''), 'out': ('out_dir', ''), 'samples': ('num_samples', ''),
    'n': ('num_samples', ''), 'wd': ('weight_decay', ''), 'warmup': ('warmup_iters', ''),
    'warmup_steps': ('warmup_iters', ''), 'clip': ('grad_clip', ''),
    'max_grad_norm': ('grad_clip', ''),
}

def _unknown(key, keys, source):
    alias, note = ALIASES.get(key, (None, ''))
    if alias in keys:
        _fail(f"unknown key '{key}' (from {source}): here it is called {alias}{note}: "
              f"--{alias}=VALUE. Run with --help to list all keys.")
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ''
    _fail(f"unknown key '{key}' (from {source}).{hint} Run with --help to list all keys.")


def _parse(key, raw, default, source):
    """Turn the text of a flag into a Python value, guided by the default's type."""
    if isinstance(default, str):  # no quotes needed (--init_from=resume); strip any given
        try:
            value = ast.literal_eval(raw)
        except Exception:
            value = None
        return value if isinstance(value, str) else raw
    if isinstance(default, bool) and raw.lower() in ('true', 'false'):
        return raw.lower() == 'true'
    try:
        return ast.literal_eval(raw)
    except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, ...
        want = f'''a Python literal (quote a string: --{key}="'{raw}'")''' if default is None \
            else type(default).__name__
        _fail(f"cannot read {key}={raw!r} (from {source}) as {want}")


def _check(key, value, default, source):
    """Return value converted to the default's type, or fail if the types disagree."""
    if default is None:  # None means "not set": any literal goes
        return value
    # subtle: bool is a subclass of int, so compare bools first (--compile=1, --max_iters=True)
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)  # --learning_rate=1 means 1.0
    elif isinstance(default, int) and isinstance(value, float):
        hint = f'; write {int(value)}' if value.is_integer() else ''  # 1e4 -> 10000
        _fail(f"{key}: expected int, got float {value!r} (from {source}){hint}")
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)  # (0.9, 0.95) and [0.9, 0.95] both work
    elif type(value) is type(default):
        return value
    _fail(f"{key}: expected {type(default).__name__} (default {default!r}), "
          f"got {type(value).__name__} {value!r} (from {source})")


def _comments(path):
    """name -> comment, from the script's top-level lines `name = value  # comment`."""
    try:
        with open(path, encoding='utf-8') as f:
            src = f.read()
        tree = ast.parse(src)
    except (OSError, SyntaxError, ValueError):
        return {}
    lines, comments = src.splitlines(), {}
    for node in tree.body:  # ast, not a regex on '#', so `start = '#'` is read right
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            # subtle: end_col_offset counts UTF-8 bytes, not characters
            rest = lines[node.end_lineno - 1].encode()[node.end_col_offset:].decode().strip()
            if rest.startswith('#'):
                comments.setdefault(node.targets[0].id, rest[1:].strip())  # first one: the block
    return comments


def _settings_block(path):
    """The top-level assignments of a script's settings block: between its first two lines that
    start with '# ----'."""
    with open(path, encoding='utf-8') as f:
        src = f.read()
    rules = [i + 1 for i, line in enumerate(src.splitlines()) if line.startswith('# ----')][:2]
    if len(rules) < 2:
        return []
    return [n for n in ast.parse(src).body if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Name) and rules[0] < n.lineno < rules[1]]


def settings_names(path):
    """The names a script's settings block assigns, in order ([] if it has none)."""
    return [n.targets[0].id for n in _settings_block(path)]


def read_settings(path):
    """A script's settings and their defaults, read from its source without running it (for tests
    and tools)."""
    return {n.targets[0].id: ast.literal_eval(n.value) for n in _settings_block(path)}


def read_choices(path):
    """A script's allowed values: the `CHOICES = {...}` that follows its settings block, evaluated
    without running the script. The names it uses are looked up where the script imports them from,
    which may only be the package or model.py (`from nanolab.device import DTYPES`); anything else
    in it must be a literal."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    node = next((n for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.targets[0], ast.Name) and n.targets[0].id == 'CHOICES'), None)
    if node is None:
        return {}
    imported = {a.asname or a.name: (n.module, a.name) for n in tree.body
                if isinstance(n, ast.ImportFrom)
                for a in n.names if n.module == 'model' or (n.module or '').startswith('nanolab')}
    names = {}
    for name in {x.id for x in ast.walk(node.value) if isinstance(x, ast.Name)}:
        if name not in imported:
            raise ValueError(f"{path}: CHOICES uses {name}, which is not imported "
                             "from the package or model.py")
        module, attr = imported[name]
        try:  # `from nanolab import datasets`: a module
            names[name] = importlib.import_module(f'{module}.{attr}')
        except ImportError:  # `from nanolab.device import DTYPES`: a name in one
            names[name] = getattr(importlib.import_module(module), attr)
    return eval(compile(ast.Expression(node.value), path, 'eval'), {'__builtins__': {}}, names)


def describe(path):
    """Every setting of a script, read without running it: [{name, default, type, comment,
    choices}] in the order of its settings block (choices: the allowed values, or None for any
    value of the type)."""
    comments, choices = _comments(path), read_choices(path)
    return [{'name': k, 'default': v, 'type': type(v).__name__, 'comment': comments.get(k, ''),
             'choices': list(choices[k]) if choices.get(k) is not None else None}
            for k, v in read_settings(path).items()]


def _help(g, defaults, choices):
    comments = _comments(g['__file__']) if g.get('__file__') else {}
    script = os.path.basename(g.get('__file__') or 'script.py')
    print(f'usage: python {script} [configs/file.py ...] [--key=value ...]')
    print('config files apply first, in order, then flags. keys, defaults and comments:')
    width = max((len(f'{k} = {v!r}') for k, v in defaults.items()), default=0)
    for k, v in defaults.items():
        line = f'  {f"{k} = {v!r}":<{width}}'
        if comments.get(k):
            line += f'  # {comments[k]}'
        if choices.get(k):
            line += f"  (one of: {', '.join(map(repr, choices[k]))})"
        print(line.rstrip())


def configure(g, argv=None, choices=None, verbose=True, positional=None):
    """Apply config files and --key=value flags to g; return the resolved config. g is a script's
    globals (its settings: the names its settings block assigns) or, without '__file__', a plain
    dict of settings. positional: a setting that a first argument which is neither a flag nor a
    config file gives, as `python data.py shakespeare_char` gives dataset='shakespeare_char'."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if positional and argv and not argv[0].startswith('-') \
            and not argv[0].endswith(('.py', '.json')):
        argv[0] = f'--{positional}={argv[0]}'
    choices = choices or {}
    if g.get('__file__'):
        names = settings_names(g['__file__'])
        if not names:  # a bug in the calling script, not in the user's input
            _fail(f"{g['__file__']} has no settings block (settings between two '# ----' lines)")
    else:
        names = [k for k in g if not k.startswith('_')]
    defaults = {k: g[k] for k in names}
    bad = [k for k, v in defaults.items() if not isinstance(v, CONFIG_TYPES)]
    if bad:
        _fail(f"setting {bad[0]} = {defaults[bad[0]]!r} is not a plain value "
              f"({', '.join(t.__name__ for t in CONFIG_TYPES)})")
    if '--help' in argv or '-h' in argv:
        _help(g, defaults, choices)
        raise SystemExit(0)

    # 1) sort the command line into files and flags; files apply first whatever the order
    files, flags = [], []
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')  # first '=' only: --start=a=b gives 'a=b'
            flags.append((key, raw if eq else None, arg))
        elif arg.endswith(('.py', '.json')):
            files.append(arg)
        elif flags and flags[-1][1] is None and not isinstance(defaults.get(flags[-1][0]), bool):
            key = name = flags[-1][0]  # `--n_layer 8`: argparse's spelling
            alias, note = ALIASES.get(key, (None, ''))
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = ''
            if key not in defaults:
                name = alias if alias in defaults else close[0] if close else key
                hint = (f" (--{key} is not a key here"
                        f"{'; it is called ' + alias + note if alias in defaults else ''})")
            _fail(f"unexpected argument '{arg}' after --{key}: write --{name}={arg}, "
                  f"one argument with '='{hint}")
        else:
            _fail(f"unexpected argument '{arg}': pass config files (configs/x.py, "
                  "out_dir/config.json) or --key=value")

    config, applied = dict(defaults), {}  # applied: key -> source, in the order first set

    def assign(key, value, source):
        value = _check(key, value, defaults[key], source)
        if value != config[key] or type(value) is not type(config[key]):
            config[key] = value
            applied[key] = source

    # 2) config files: plain Python, exec'd in a namespace that holds the current config
    for path in files:
        if not os.path.isfile(path):
            _fail(f'config file not found: {path}')
        # a run's config.json: every key a setting, every value of its type
        if path.endswith('.json'):
            try:
                with open(path, encoding='utf-8') as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                _fail(f'{path}: not a JSON object of settings ({e})')
            if not isinstance(saved, dict):
                _fail(f'{path}: not a JSON object of settings')
            for key, value in saved.items():
                if key not in defaults:
                    _unknown(key, defaults, path)
                assign(key, value, path)
            continue
        ns = dict(config)
        try:
            with open(path) as f:
                exec(compile(f.read(), path, 'exec'), ns)
        except Exception as e:  # say which line of the config file failed, without a traceback
            lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__)
                     if fr.filename == path]
            line, msg = (e.lineno, e.msg) if isinstance(e, SyntaxError) else \
                ((lines or ['?'])[-1], e)
            _fail(f'{path} line {line}: {type(e).__name__}: {msg}')
        for key, value in ns.items():
            if key.startswith('_') or (key not in defaults
                                       and not isinstance(value, CONFIG_TYPES)):
                continue  # __builtins__, `import math`, helper functions: not settings
            if key not in defaults:
                _unknown(key, defaults, path)
            if value is not config[key]:  # only what the file (re)assigned
                assign(key, value, path)

    # 3) flags, last one wins
    for key, raw, arg in flags:
        if key not in defaults:
            _unknown(key, defaults, arg)
        if raw is None:  # bare --flag switches a bool on
            if not isinstance(defaults[key], bool):
                _fail(f'--{key} needs a value: --{key}=VALUE (default {defaults[key]!r})')
            raw = 'True'
        assign(key, _parse(key, raw, defaults[key], arg), f'--{key}')

    # 4) fixed-value string options, checked on the final values so a file can't sneak one in
    for key, allowed in choices.items():
        if key not in config:  # a bug in the calling script
            _fail(f"choices names '{key}', which is not a config key")
        if allowed is not None and config[key] not in allowed:
            source = applied.get(key, 'the default')
            close = difflib.get_close_matches(str(config[key]), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ''
            _fail(f"{key}={config[key]!r} (from {source}) is not one of "
                  f"{', '.join(map(repr, allowed))}{hint}")

    g.update({k: config[k] for k in applied})
    if verbose:
        for key, source in applied.items():
            print(f'{key} = {config[key]!r}  (from {source})')
    return config


# -----------------------------------------------------------------------------
# bad input at run time: one line that names the problem and the fix, exit status 1, no traceback

def fail(msg):
    """End the script with `error: msg` on stderr and exit status 1 (SystemExit: no traceback)."""
    raise SystemExit(f'error: {msg}')


@contextmanager
def cli_errors(*kinds):
    """A ValueError (or one of `kinds`) raised in the block is bad input: the script ends with
    fail's one line. Every library function that refuses input raises ValueError with a message
    that names the problem and the fix, so a script wraps the calls that read user input in this,
    and nothing else."""
    try:
        yield
    except (ValueError, *kinds) as e:
        # a KeyError's str() would quote it
        fail(e.args[0] if isinstance(e, KeyError) and e.args else e)
