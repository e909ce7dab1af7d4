"""
Command-line configuration in the nanoGPT manner, for every program here (train.py, eval.py, sample.py, ...).

A program keeps its settings as plain module-level values and calls `configure(globals(), sys.argv[1:])`:
  python train.py config/gpu.py --batch_size=32 --mode two_stage
A `*.py` argument is executed first (it may set any of the values), then every `--key=value` or
`--key value` overrides one value. Values are parsed as Python literals when they look like one and
must keep the default's type; an unknown key is an error that lists the valid ones; a program's RENAMED
maps old setting names to new ones, so that old command lines keep working. `--help` (or `-h`)
prints the program's docstring and its settings block as written (every default and comment), so the
help is the code. `check` refuses out-of-range values in one line before the program does any work.
"""
import ast
import os
import sys
import types


def fail(msg):
    """One-line error to stderr and exit code 2 (the usual code for bad command-line input)."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def print_help(settings, keys):
    """The program's docstring, then its settings block: the source lines of its longest run of setting
    assignments, with defaults, comments and section headers exactly as the file has them."""
    path = settings.get('__file__')
    print((settings.get('__doc__') or '').strip() + '\n')
    if path and os.path.isfile(path):
        src = open(path).read()
        runs, run = [], []  # runs of consecutive top-level statements that assign a setting; the longest is the block
        for n in ast.parse(src).body:
            if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id in keys for t in n.targets):
                run.append(n)
            elif run:
                runs, run = runs + [run], []
        block = max(runs + [run], key=len)
        if block:
            lines = src.splitlines()[block[0].lineno - 1:block[-1].end_lineno]
            print("settings (override with --key=value or a config/NAME.py file):\n" + '\n'.join(lines))
            return
    print('settings: ' + ', '.join(f'--{k}={settings[k]!r}' for k in sorted(keys)))


def check(settings, positive=(), non_negative=(), fraction=(), choices=None):
    """Refuse out-of-range settings in one line that names the flag: each key of `positive` must be > 0, of
    `non_negative` >= 0, of `fraction` in [0, 1]; `choices` maps a key to its allowed values. None passes (a
    size left None takes its preset's value)."""
    for keys, ok, what in ((positive, lambda v: v > 0, 'positive'), (non_negative, lambda v: v >= 0, 'at least 0'),
                           (fraction, lambda v: 0 <= v <= 1, 'in [0, 1]')):
        for k in keys:
            if settings[k] is not None and not ok(settings[k]):
                fail(f"--{k} must be {what}, got {settings[k]!r}")
    for k, allowed in (choices or {}).items():
        if settings[k] not in allowed:
            fail(f"--{k} must be one of {', '.join(map(str, allowed))}; got {settings[k]!r}")


def parse_value(key, raw, default):
    """Turn the string `raw` into a value of the default's type (bool/int/float/str/tuple/None)."""
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        val = raw  # a bare word: a string
    if isinstance(default, bool):
        if isinstance(val, str) and val.lower() in ('true', 'false'):
            val = val.lower() == 'true'
        if val in (0, 1) and not isinstance(val, float):
            val = bool(val)
    elif isinstance(default, float) and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    elif isinstance(default, str) and not isinstance(val, str):
        val = raw  # e.g. --out_dir=123 is the string '123'
    elif isinstance(default, tuple) and isinstance(val, (list, int, str)):
        # a comma list of bare words (--presets=cpu,base or --presets=base) is a tuple of strings
        val = tuple(val) if isinstance(val, list) else (val,) if isinstance(val, int) else \
            tuple(w.strip() for w in raw.split(',') if w.strip())
    if default is not None and type(val) is not type(default):
        fail(f"--{key}={raw}: expected {type(default).__name__}, like the default {default!r}")
    return val


def configure(settings, argv):
    """Apply config files and flags in argv to the dict `settings` (a module's globals()), in place.

    Only keys whose values are plain data (bool/int/float/str/tuple/None), that do not start with '_' and are
    not CAPITALISED constants are settings. Returns the dict of all settings after the overrides (for checkpoints and logs)."""
    keys = {k for k, v in settings.items()  # CAPITALISED names are constants, not settings
            if not k.startswith('_') and not k.isupper() and isinstance(v, (bool, int, float, str, tuple, type(None)))}
    if '--help' in argv or '-h' in argv:
        print_help(settings, keys)
        sys.exit(0)
    renamed = settings.get('RENAMED', {})  # old name -> new: old command lines and config files keep working
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            if not arg.endswith('.py') or not os.path.isfile(arg):
                fail(f"{arg!r} is neither a config file (config/NAME.py) nor a --key=value flag")
            scope = {}
            exec(open(arg).read(), scope)
            for k, v in scope.items():
                if k.startswith('_') or isinstance(v, types.ModuleType):
                    continue
                k = renamed.get(k, k)
                if k not in keys:
                    fail(f"{arg} sets unknown setting {k!r}; valid: {', '.join(sorted(keys))}")
                settings[k] = v
        else:
            key, eq, raw = arg[2:].partition('=')
            key = renamed.get(key, key)
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith('--'):
                    if isinstance(settings.get(key), bool):
                        raw = 'True'  # a bare boolean flag: --resume
                    else:
                        fail(f"--{key} needs a value")
                else:
                    i += 1
                    raw = argv[i]
            if key not in keys:
                fail(f"unknown flag --{key}; valid flags: {' '.join('--' + k for k in sorted(keys))}")
            settings[key] = parse_value(key, raw, settings[key])
        i += 1
    return {k: settings[k] for k in sorted(keys)}
