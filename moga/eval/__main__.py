"""`python -m moga.eval demo ...` (see moga/demo/evaluation.py). An entry point, like moga.cli."""
from __future__ import annotations

import sys

USAGE = "usage: python -m moga.eval demo [--stories N] [--modes moga,dense,window] [--json FILE]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "demo":
        print(f"unknown evaluation {argv[0]!r}; {USAGE}", file=sys.stderr)
        return 2
    from ..demo.evaluation import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
