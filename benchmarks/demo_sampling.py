"""Sampling settings of the demo model: guidance scale x steps, scored by the demo evaluator.

    python3 benchmarks/demo_sampling.py --checkpoints moga/demo/moga-demo.safetensors,dense.safetensors \
        --cfg 2,4,6,8 --steps 20,40 --shift 3 --stories 32 --seed 1 --json out.json

Each checkpoint runs as trained (MoGA with its routers, a dense model dense) on the same held-out
stories and seeds for every setting, so rows compare settings, not luck. One JSON, one table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.checkpoint import inspect_checkpoint  # noqa: E402
from moga.demo.evaluation import run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", default="moga/demo/moga-demo.safetensors")
    ap.add_argument("--cfg", default="2,4,6,8")
    ap.add_argument("--steps", default="20,40")
    ap.add_argument("--shift", default="3")
    ap.add_argument("--seed", type=int, default=0, help="held-out set (tune on one, report another)")
    ap.add_argument("--stories", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what remains after this many seconds")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for ck in args.checkpoints.split(","):
        mode = "moga" if inspect_checkpoint(ck).moga else "dense"  # each model as trained (header only)
        for steps, cfg, shift in itertools.product([int(s) for s in args.steps.split(",")],
                                                   [float(c) for c in args.cfg.split(",")],
                                                   [float(h) for h in args.shift.split(",")]):
            if time.perf_counter() - start > args.budget_s:
                print(f"budget reached: skip {ck} steps {steps} cfg {cfg} shift {shift}", flush=True)
                continue
            out = run(ck, None, stories=args.stories, modes=(mode,), steps=steps, cfg=cfg, shift=shift,
                      seed=args.seed, device=args.device, log=lambda m: None)
            for r in out:
                r.update(checkpoint=ck)
                rows.append(r)
                print(json.dumps({k: r[k] for k in ("checkpoint", "mode", "steps", "cfg", "shift", "colour", "shape",
                                                    "direction", "consistency", "seconds")}), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n| checkpoint | mode | steps | cfg | shift | colour | shape | size | direction | consistency | smoothness |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['checkpoint']).name} | {r['mode']} | {r['steps']} | {r['cfg']:g} | {r['shift']:g} | {r['colour']} | "
              f"{r['shape']} | {r['size']} | {r['direction']} | {r['consistency']} | {r['smoothness']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
