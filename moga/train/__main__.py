"""`python -m moga.train COMMAND ...`: the commands of moga.train.commands (demo, wan, prepare)."""
from __future__ import annotations

import sys

from .commands import run


def main(argv=None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
