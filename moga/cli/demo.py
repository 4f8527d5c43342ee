"""`moga demo`: the bundled demo model's story (moga.demo), else the attention demo."""
from __future__ import annotations

import importlib

from .device import check_device
from .errors import CliError, check_exists
from .forward import has_module


def cmd_demo(args) -> int:
    from ..outputs import check_output
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1 (the demo model's own setting is 40), got {args.steps}")
    if args.dense_steps is not None and not 0.0 <= args.dense_steps <= 1.0:
        raise CliError(f"--dense-steps is a fraction of the steps in [0, 1], got {args.dense_steps}")
    if args.checkpoint is not None:
        check_exists(args.checkpoint, "demo checkpoint")
    check_output(args.out, "video", args.overwrite, flag="--out")
    args.device = str(check_device(args.device))
    if has_module("moga.demo"):
        demo = importlib.import_module("moga.demo")
        run_demo = getattr(demo, "run_demo", None)
        if run_demo is not None:
            return int(run_demo(args) or 0)
    if has_module("moga.attention.demo"):
        return int(importlib.import_module("moga.attention.demo").main() or 0)
    raise CliError("no demo is installed in this copy of moga (moga.demo.run_demo / moga.attention.demo)")
