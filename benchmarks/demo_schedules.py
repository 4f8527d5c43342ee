"""Attention schedules of the demo model's first sampling steps, scored by the demo evaluator.

    python3 benchmarks/demo_schedules.py --seed 2 --stories 128 --batch 64 \
        --schedule d3=dense:3 --schedule m2x7=2:7 --schedule m4x19=4:19 --schedule d3m4x4=dense:3,4:4 \
        --json out.json

A schedule is NAME=PHASE[,PHASE...], each PHASE `dense:N` (N steps of full attention) or `M:N` (N steps
with the routers merged at run time to M groups); the remaining steps run the file's MoGA settings.
`--schedule base=` is MoGA at every step. Every schedule samples the same held-out stories and noise,
so rows compare schedules; the FLOPs column counts every call (the bar of issue 7 is 1/3 of dense).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.demo.generate import evaluate_model  # noqa: E402
from moga.demo.model import demo_info, load_demo  # noqa: E402
from moga.demo.world import heldout_stories  # noqa: E402


def parse_schedule(text: str) -> tuple[str, list[tuple[str | int, int]]]:
    """'d3m4=dense:3,4:4' -> ('d3m4', [('dense', 3), (4, 4)])."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise ValueError(f"schedule {text!r}: write NAME=PHASE[,PHASE...], e.g. d3=dense:3 or m4=4:19")
    phases = []
    for part in filter(None, body.split(",")):
        kind, sep, count = part.partition(":")
        if not sep or not count.isdigit() or not (kind == "dense" or kind.isdigit()):
            raise ValueError(f"schedule {name}: phase {part!r} must be dense:N or M:N (N steps, M groups)")
        phases.append((kind if kind == "dense" else int(kind), int(count)))
    return name, phases


def step_configs(base, phases, steps: int) -> list:
    """One MoGAConfig per step: the phases first, then `base`."""
    out = []
    for kind, count in phases:
        cfg = base.replace(dense=True) if kind == "dense" else base.replace(num_groups=kind)
        out += [cfg] * count
    if len(out) > steps:
        raise ValueError(f"the phases take {len(out)} steps, more than the {steps} sampling steps")
    return out + [base] * (steps - len(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a MoGA demo file (default: the shipped one)")
    ap.add_argument("--schedule", action="append", required=True, help="NAME=PHASE[,PHASE...] (repeat)")
    ap.add_argument("--seed", type=int, default=2, help="held-out set (default 2: a validation set)")
    ap.add_argument("--stories", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    schedules = [parse_schedule(s) for s in args.schedule]  # bad specs fail before the model loads
    model = load_demo(args.checkpoint, device=args.device)
    if model.moga_config is None or not model.config.moga_layers:
        ap.error("the checkpoint has no routers: schedules choose how a MoGA model attends")
    s = demo_info(model)["sampling"]
    stories = heldout_stories(args.stories, num_shots=4, seed=args.seed)
    print(f"{'schedule':<12} {'colour':>6} {'shape':>6} {'size':>6} {'dir':>6} {'consis':>6} {'FLOPs':>6} {'s':>6}")
    rows = []
    for name, phases in schedules:
        configs = step_configs(model.moga_config, phases, int(s["steps"]))
        t0 = time.perf_counter()
        res = evaluate_model(model, stories, steps=int(s["steps"]), cfg=float(s["cfg"]), shift=float(s["shift"]),
                             solver=s["solver"], batch=args.batch, device=args.device, seed=args.seed,
                             step_configs=configs)
        row = {"schedule": name, "phases": phases, **res.summary, "attention_flops_ratio": round(res.flop_ratio, 4),
               "seconds": round(time.perf_counter() - t0, 1), "seed": args.seed, "stories": args.stories, **s}
        rows.append(row)
        print(f"{name:<12} " + " ".join(f"{row[k]:>6.1f}" for k in ("colour", "shape", "size", "direction",
                                                                   "consistency"))
              + f" {row['attention_flops_ratio']:>6.3f} {row['seconds']:>6.0f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
