"""The `sdpa` varlen backend with and without length-class padding, on demo-model sampling steps.

    python3 benchmarks/varlen_padding.py                       # CPU: 8 stories, 3 steps per timing
    python3 benchmarks/varlen_padding.py --device cuda --stories 64 --json out.json

`sdpa` is the backend wherever no varlen kernel applies (the CPU, and float32 on a GPU, which is how
the demo evaluator samples). It batches segments of equal (query, key) lengths into one
F.scaled_dot_product_attention call; routed groups come in dozens of sizes, so above
`kernels.PAD_BUCKETS` distinct sizes it pads them into length classes (at most 25% padding) with a
key mask instead. Rows: exact buckets (padding off) and length classes (the default), timed
alternately on the same stories and seeds; per row the median seconds per sampling step, the SDPA
calls per step and the largest difference of the outputs of one step from the exact row's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.attention import kernels  # noqa: E402
from moga.demo.generate import generate  # noqa: E402
from moga.demo.model import load_demo  # noqa: E402
from moga.demo.world import heldout_stories  # noqa: E402

MODES = {"exact buckets": 10 ** 9, "length classes": None}  # None: the library default


class _CallCounter:
    def __init__(self):
        self.calls = 0
        self._orig = F.scaled_dot_product_attention

    def __enter__(self):
        def counted(*a, **kw):
            self.calls += 1
            return self._orig(*a, **kw)
        kernels.F.scaled_dot_product_attention = counted
        return self

    def __exit__(self, *exc):
        kernels.F.scaled_dot_product_attention = self._orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stories", type=int, default=8, help="stories per batch (x2 with guidance)")
    ap.add_argument("--steps", type=int, default=3, help="sampling steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    default = kernels.PAD_BUCKETS
    model = load_demo(device=args.device)
    stories = heldout_stories(args.stories, seed=2)
    cfg = model.moga_config.replace(backend="sdpa")

    def run(pad_buckets, steps):
        kernels.PAD_BUCKETS = default if pad_buckets is None else pad_buckets
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = generate(model, stories, steps=steps, cfg=4.0, shift=3.0, moga=cfg)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, x

    try:
        ref = {name: run(pb, 1)[1] for name, pb in MODES.items()}  # warm-up + one step's outputs
        times = {name: [] for name in MODES}
        for _ in range(args.repeats):  # alternate, so drift hits both rows alike
            for name, pb in MODES.items():
                times[name].append(run(pb, args.steps)[0])
        calls = {}
        for name, pb in MODES.items():
            with _CallCounter() as counter:
                run(pb, 1)
            calls[name] = counter.calls
    finally:
        kernels.PAD_BUCKETS = default
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    base = statistics.median(times["exact buckets"])
    print(f"demo model, {args.stories} stories (+{args.stories} unconditional), {device}, torch {torch.__version__}")
    print(f"{'mode':<16} {'s/step':>8} {'speed-up':>9} {'SDPA calls/step':>16} {'max |diff| (1 step)':>20}")
    for name in MODES:
        med = statistics.median(times[name])
        diff = float((ref[name] - ref["exact buckets"]).abs().max())
        rows.append({"mode": name, "seconds_per_step": med, "all_seconds": times[name],
                     "speedup": base / med, "sdpa_calls_per_step": calls[name], "max_abs_diff_one_step": diff})
        print(f"{name:<16} {med:8.3f} {base / med:8.2f}x {calls[name]:16d} {diff:20.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                               "stories": args.stories, "steps": args.steps,
                                               "pad_buckets_default": default, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
