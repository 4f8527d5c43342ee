"""What every command shares when it fails: `CliError`, the exit statuses, and `run_command`, which
turns each error a person can act on into one line (`moga: error: ...`) and its exit status."""
from __future__ import annotations

import os
import sys

EXIT_USAGE, EXIT_CANCELLED = 2, 130


class CliError(ValueError):
    """A problem with the command line's input; the message says what to do."""


def check_exists(path, what: str):
    if path and not os.path.exists(path):
        raise CliError(f"{what} {path!r} does not exist")


def loaded_types(*types) -> tuple:
    """Exception types to catch; (module, name) ones only if that module was imported (it alone raises
    them), so that `moga train --help` and the like never import torch for an except clause."""
    out = []
    for t in types:
        if isinstance(t, tuple):
            t = getattr(sys.modules.get(t[0]), t[1], None)
        if t is not None:
            out.append(t)
    return tuple(out)


def run_command(args, say, rank) -> int:
    """The command, with every error a person can act on as one line and its exit status."""
    def cancelled_by_signal():  # under torchrun: a collective broken by the other ranks' Ctrl-C
        if rank is None:
            return False
        from ..parallel import launch
        return launch.cancelled()

    try:
        return args.func(args)
    except loaded_types(KeyboardInterrupt, ("moga.sampling", "Cancelled")):
        say("moga: cancelled")
        return EXIT_CANCELLED
    except loaded_types(CliError, ValueError, FileNotFoundError, ("moga.wan_io", "MissingExtra")) as e:
        if cancelled_by_signal():
            say("moga: cancelled")
            return EXIT_CANCELLED
        say(f"moga: error: {e}")
        return EXIT_USAGE
    except BaseException:
        if cancelled_by_signal():
            say("moga: cancelled")
            return EXIT_CANCELLED
        raise
