"""`python -m moga.eval demo`: held-out stories through the demo model, scored by the world's evaluator.

Modes on the same weights: `moga` (the trained setting), `dense` (routers off: full attention),
`window` (the window branch alone); with --dense-checkpoint also a dense-trained model of the same
training budget. Prints a table of the scores and the attention FLOPs (QK^T + PV, counted per call
by moga.diagnostics.attention_flops) relative to dense, and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..sampling import SOLVERS
from .generate import evaluate_model
from .model import DEMO_PATH, demo_info, load_demo
from .world import heldout_stories

MODES = ("moga", "dense", "window")
COLUMNS = ("colour", "shape", "direction", "consistency", "smoothness", "background", "detected")


def mode_config(model, mode: str, capacity: float | None = None, split: str | None = None):
    """The MoGA settings of an evaluation mode; `capacity` (0: off) and `split` override the file's."""
    base = model.moga_config
    if capacity is not None:
        base = base.replace(capacity=capacity)
    if split is not None:
        base = base.replace(capacity_split=split)
    if mode == "moga":
        return base
    if mode == "dense":
        return base.replace(dense=True)
    if mode == "window":
        return base.replace(routed=False, per_frame=False, windowed=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def run(checkpoint=None, dense_checkpoint=None, stories: int = 32, shots: int = 4, modes=MODES, steps=None,
        cfg=None, seed: int = 0, batch: int = 16, device="cpu", capacity: float | None = None,
        capacity_split: str | None = None, shift: float | None = None, solver: str | None = None,
        dense_steps: float | None = None, fp8: bool = False, log=print) -> list[dict]:
    """Each (model, mode) on the same held-out stories, noise and sampling settings: steps, cfg, shift and
    solver default to the (first) checkpoint's own, for the dense-trained model too, and the MoGA mode's
    dense warm-up (`dense_steps`, a fraction of the steps) to the file's `moga.dense_warmup`.
    fp8: every row again with the blocks' linear layers on e4m3 (`moga.fp8.enable_fp8`: weights per row,
    activations per token; off a fp8 GPU the dequantised reference, the same rounding), mode "<mode>+fp8"."""
    held = heldout_stories(stories, num_shots=shots, seed=seed)
    rows = []
    runs = [(checkpoint, m) for m in modes]
    if dense_checkpoint:
        runs.append((dense_checkpoint, "dense-trained"))
    if fp8:
        runs = [r for run_ in runs for r in (run_, (run_[0], run_[1] + "+fp8"))]
    models = {}
    s = None  # the sampling settings every row shares: the first file's, where not given
    for path, label in runs:
        mode = label.removesuffix("+fp8")
        key = str(path or DEMO_PATH)
        if key not in models:
            models[key] = load_demo(path, device=device)
        model = models[key]
        if label != mode:
            if key + "+fp8" not in models:
                models[key + "+fp8"] = _fp8_copy(model, device, log)
            model = models[key + "+fp8"]
        info = demo_info(model)
        if s is None:
            s = info["sampling"]
        elif info["sampling"] != s:
            log(f"note: {Path(key).name} records other sampling settings ({info['sampling']}); "
                f"it is sampled as {Path(str(checkpoint or DEMO_PATH)).name} is, for a like-for-like row")
        has_routers = bool(model.config.moga_layers)
        if mode in ("moga", "window") and not has_routers:
            log(f"skip {mode}: {key} has no routers")
            continue
        mcfg = mode_config(model, mode, capacity, capacity_split) if has_routers and mode != "dense-trained" else None
        warmup = 0.0
        if mode == "moga":
            warmup = float(model.dense_warmup if dense_steps is None else dense_steps)
        sampling = dict(steps=int(steps or s["steps"]), cfg=float(cfg or s["cfg"]),
                        shift=float(shift or s["shift"]), solver=solver or s["solver"])
        res = evaluate_model(model, held, **sampling, moga=mcfg, batch=batch, device=device, seed=seed,
                             dense_steps=warmup)
        row = {"model": Path(key).name, "mode": label, **res.summary,
               "attention_flops_ratio": round(res.flop_ratio, 4), "seconds": round(res.seconds, 1),
               **sampling, "seed": seed, "dense_steps": warmup, "training": info.get("training"),
               "capacity": mcfg.capacity if mcfg is not None and mode == "moga" else None,
               "capacity_split": mcfg.capacity_split if mcfg is not None and mcfg.capacity and mode == "moga"
               else None}
        rows.append(row)
        log(_row_text(row))
    return rows


def _fp8_copy(model, device, log):
    import copy

    from .. import fp8
    m8 = copy.deepcopy(model)
    rep = fp8.enable_fp8(m8, device, force=True)
    why = fp8.fp8_problem(device)
    log(f"# {rep.summary()}" + (f" (emulated: {why.split(';')[0]})" if why else ""))
    if not rep.enabled:
        raise SystemExit(f"--fp8: {rep.summary()}")
    return m8


def _row_text(row: dict) -> str:
    cells = " ".join(f"{row[c]:>6.1f}" if row[c] is not None else f"{'-':>6}" for c in COLUMNS)
    return f"{row['model'][:24]:<24} {row['mode']:<14} {cells} {row['attention_flops_ratio']:>7.3f}"


def header() -> str:
    return f"{'model':<24} {'mode':<14} " + " ".join(f"{c[:6]:>6}" for c in COLUMNS) + f" {'FLOPs':>7}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moga.eval demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="demo model file (default: the shipped one)")
    p.add_argument("--dense-checkpoint", default=None, help="a dense-trained demo model to compare")
    p.add_argument("--stories", type=int, default=32)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--dense-steps", type=float, default=None,
                   help="fraction of the first steps the MoGA mode runs dense (default: the file's dense warm-up)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the file's)")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default: the file's")
    p.add_argument("--seed", type=int, default=0,
                   help="held-out stories and noise (0: the reported set; tune settings on another)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--capacity", type=float, default=None,
                   help="group capacity for the MoGA modes (0: off; default: the file's setting)")
    p.add_argument("--capacity-split", choices=("runs", "stride"), default=None,
                   help="how over-capacity groups are cut (default: the file's setting)")
    p.add_argument("--fp8", action="store_true",
                   help="also every row with fp8 (e4m3) matmuls: on fp8 GPUs torch._scaled_mm, elsewhere the "
                        "dequantised reference (the same rounding, slower)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    print(header())
    rows = run(args.checkpoint, args.dense_checkpoint, args.stories, args.shots, modes, args.steps, args.cfg,
               args.seed, args.batch, args.device, args.capacity, args.capacity_split, args.shift, args.solver,
               args.dense_steps, args.fp8)
    if args.json:
        from ..outputs import write_json
        write_json(args.json, rows)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
