"""Commands that their own module runs (`train`, `inspect`): registered only where that module
exists, the rest of the line handed to its `main`. `inspect`'s options are parsed first by a
torch-free module, so its --help and bad flags answer at once."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .device import check_device

FORWARDS: dict[str, str] = {}  # forwarded command -> module (filled by build_parser)
# a forwarded command whose options a torch-free module parses first: --help and bad flags answer at once
LIGHT_PARSERS = {"inspect": "moga.inspect_args"}


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def add_forward(sub, name: str, module: str, help_text: str):
    """`moga NAME ARGS...` runs `module` with ARGS (its own parser); registered only if it exists."""
    if not has_module(module):
        return
    p = sub.add_parser(name, help=help_text, add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: run_module(module, args.argv))
    FORWARDS[name] = module


def run_module(module: str, argv) -> int:
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        import runpy
        saved = sys.argv
        sys.argv = [module] + list(argv)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved
        return 0
    return int(main(list(argv)) or 0)


def run_parsed(module: str, options) -> int:
    if getattr(options, "device", None) is not None:
        options.device = str(check_device(options.device))
    return int(importlib.import_module(module).main(options) or 0)
