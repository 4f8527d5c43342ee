"""The subcommands of `python -m moga.train` (and `moga train`): a table of names to "module:function"
strings, each module imported only when its command runs.

So `--help` imports no torch, and moga.train never imports moga.demo: the demo trainer lives a floor
above (moga.demo imports moga.train, not the reverse) and is named here only as a string, as a
console-script entry names its function. A command's function takes the arguments after its name and
returns an exit status (an int; anything else counts as 0). `register` adds a command (another package's, or a test's).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str    # "package.module:function"
    summary: str   # one line for the usage text

    def load(self):
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


COMMANDS: dict[str, Command] = {
    "demo": Command("moga.demo.training:main", "train the embedded demo model (--out RUN [options])"),
    "wan": Command("moga.train.wan.cli:main_wan", "fine-tune a Wan2.1 checkpoint into a MoGA checkpoint"),
    "prepare": Command("moga.train.wan.cli:main_prepare", "encode clips + captions into training shards, once"),
}


def register(name: str, target: str, summary: str = "") -> None:
    """Add (or replace) the command `name`, run by `target` ("package.module:function")."""
    if ":" not in target:
        raise ValueError(f"a command's target is 'package.module:function', got {target!r}")
    COMMANDS[name] = Command(target, summary)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m moga.train COMMAND [options]   (COMMAND --help: its options)", "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def run(argv) -> int:
    """Run `argv[0]`'s command with the rest; usage (exit 0) for -h/--help, (exit 2) for none or an
    unknown one."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        import sys
        print(f"{usage()}\nmoga train: error: unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    status = command.load()(argv[1:])
    return status if isinstance(status, int) else 0  # the demo trainer returns its run's summary


__all__ = ["Command", "COMMANDS", "register", "usage", "run"]
