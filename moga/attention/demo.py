"""A CPU demonstration of MoGA attention against dense attention (time, FLOPs, output difference).

`python -m moga.attention.demo` (and `python -m moga demo` until the demo model exists). Random
weights and inputs: it shows the mechanism and its cost, not video quality.
"""
from __future__ import annotations

import argparse
import time

import torch

from .config import MoGAConfig
from .layer import MoGAAttention
from .layout import TokenLayout
from .mixture import attention_pairs


def _time(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MoGA vs dense attention on the CPU")
    ap.add_argument("--frames", type=int, default=24, help="latent frames")
    ap.add_argument("--size", type=int, default=16, help="tokens per side of a latent frame")
    ap.add_argument("--shots", type=int, default=3, help="equal shots")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.frames % args.shots:
        raise SystemExit(f"--frames {args.frames} is not divisible by --shots {args.shots}")
    torch.manual_seed(args.seed)
    layout = TokenLayout(args.frames, args.size, args.size, (args.frames // args.shots,) * args.shots)
    dim = args.heads * args.head_dim
    layer = MoGAAttention(dim, args.heads, num_groups=args.groups).eval()
    x = torch.randn(1, layout.num_tokens, dim)
    cfg = layer.config.replace(num_groups=args.groups)
    with torch.no_grad():
        routing = layer.router(x)
        sizes = torch.bincount(routing.group_ids.flatten(), minlength=args.groups).tolist()
        pairs = attention_pairs(layout, cfg, sizes)
        per_pair = 4 * dim  # multiply-adds of q.k and p.v, two FLOPs each, over all heads
        dense = layer(x, layout, config=cfg.replace(dense=True))
        rows = [("dense", cfg.replace(dense=True), pairs["dense"])]
        moga_pairs = pairs["routed"] + pairs["window"] + pairs["frame"]
        rows += [("MoGA mean (paper)", cfg, moga_pairs), ("MoGA lse", cfg.replace(fusion="lse"), moga_pairs)]
        print(f"MoGA attention demo on the CPU: layout {layout} = {layout.num_tokens} tokens, "
              f"{args.heads} heads x {args.head_dim}, M = {args.groups} groups (sizes {sizes}), "
              f"window {cfg.window}, context frames {cfg.context_frames}; random weights\n")
        print(f"{'variant':<18} {'time ms':>9} {'GFLOP':>8} {'FLOP ratio':>10} {'rel. diff vs dense':>19}")
        for name, c, p in rows:
            ms = _time(lambda: layer(x, layout, config=c))
            out = layer(x, layout, config=c)
            diff = ((out - dense).norm() / dense.norm()).item()
            print(f"{name:<18} {ms:>9.1f} {p * per_pair / 1e9:>8.2f} {pairs['dense'] / p:>10.2f} "
                  f"{diff:>19.3f}")
        one = layer(x, layout, config=MoGAConfig(num_groups=1, windowed=False, per_frame=False))
        print(f"\none group (the router's rows merged), static branches off: max |MoGA - dense| = "
              f"{(one - dense).abs().max().item():.1e} (the gate is a sum of probabilities: 1 up "
              f"to rounding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
