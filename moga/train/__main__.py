"""`python -m moga.train demo ...` (the embedded demo model, moga/demo/training.py) and
`python -m moga.train wan|prepare ...` (fine-tuning Wan checkpoints, moga/train/wan.py).

An entry point, like moga.cli: it may reach up to moga.demo, which owns the demo's world and data.
"""
from __future__ import annotations

import sys

USAGE = ("usage: python -m moga.train demo --out RUN [options]   (the demo model)\n"
         "       python -m moga.train wan|prepare ...            (Wan fine-tuning; see --help)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "demo":
        from ..demo.training import main as demo_main

        demo_main(argv[1:])
        return 0
    from .wan import main as wan_main

    return int(wan_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
