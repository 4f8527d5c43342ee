"""`main`: parse the line, hand it to its command, and under torchrun let rank 0 alone print while every
rank exits alike."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import run_command
from .forward import FORWARDS, LIGHT_PARSERS, run_module, run_parsed
from .parsers import build_parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHT_PARSERS and argv[0] in FORWARDS:
        options = importlib.import_module(LIGHT_PARSERS[argv[0]]).build_parser().parse_args(argv[1:])
        args = argparse.Namespace(func=lambda a: run_parsed(FORWARDS[argv[0]], options))
    elif argv and argv[0] in FORWARDS:  # the module parses its own options, --help included
        args = argparse.Namespace(func=lambda a: run_module(FORWARDS[argv[0]], argv[1:]))
    else:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would blame the top-level parser and print its usage, not the command's
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}"
                                                   + _unknown_hint(args.command, unknown))
    rank = _torchrun_rank()  # under torchrun: rank 0 alone prints, every rank exits alike
    stop_watch = None
    if rank is not None:
        from ..parallel import launch  # imports no torch
        stop_watch = launch.watch_signals(lead=rank == 0)
    say = (lambda msg: print(msg, file=sys.stderr)) if rank in (None, 0) else (lambda msg: None)
    try:
        code = run_command(args, say, rank)
        return launch.exit_together(int(code or 0)) if rank is not None else code
    finally:
        if stop_watch is not None:
            stop_watch()


def _torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (WORLD_SIZE > 1), else None."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except ValueError:
        return None


def _subparser(parser, command):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _unknown_hint(command, unknown) -> str:
    if any(a.split("=")[0] in ("--gpus", "--gpu", "--nproc", "--world-size") for a in unknown):
        return (f"; `moga {command}` runs on one device (--device); for several GPUs launch it with "
                f"`torchrun --nproc-per-node G -m moga {command} ...` (docs/parallel.md)")
    return ""
