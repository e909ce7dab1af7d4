"""
Command-line configuration in the nanoGPT manner, for train.py, sample.py, eval.py, plan.py and bench.py.

A program keeps its settings as plain module-level values and calls `configure(globals(), sys.argv[1:])`:
  python train.py config/gpu.py --batch_size=32 --mode two_stage
A `*.py` argument is executed first (it may set any of the values), then every `--key=value` or
`--key value` overrides one value. Values are parsed as Python literals when they look like one and
must keep the default's type; an unknown key is an error that lists the valid ones.
"""
import ast
import os
import sys
import types


def fail(msg):
    """One-line error to stderr and exit code 2 (the usual code for bad command-line input)."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(2)


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

    Only keys whose values are plain data (bool/int/float/str/tuple/None) and do not start with '_'
    are settings. Returns the dict of all settings after the overrides (for checkpoints and logs)."""
    keys = {k for k, v in settings.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, type(None)))}
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
                if k not in keys:
                    fail(f"{arg} sets unknown setting {k!r}; valid: {', '.join(sorted(keys))}")
                settings[k] = v
        else:
            key, eq, raw = arg[2:].partition('=')
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
