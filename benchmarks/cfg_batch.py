"""CFG in one pass: one guided step (cond + uncond) as two batch-1 forwards vs one batch-2 forward. Table + JSON.

    python benchmarks/cfg_batch.py                       # CUDA: 14B, 32,760 / 65,520 / 131,040 tokens
    python benchmarks/cfg_batch.py --model 1.3B --tokens 32760,65520
    python benchmarks/cfg_batch.py --smoke               # a tiny config on the CPU: every code path, seconds

Random bf16 weights, routers in every layer (M = --groups, random rows, group capacity 1 so no group
is oversized), three-branch MoGA with the fastest varlen backend importable; per-shot texts of
512 tokens (umT5's padded length) differ per shot and from the negative, as in `moga generate`.
Time: wall clock around a synchronised guided step after a warm-up, the median of --repeats. Peak:
torch.cuda.max_memory_allocated over the step (weights included). `max_rel_diff` is the relative
difference of the guided velocity between the two ways (bf16 rounding only; the CPU tests check
float32 equality). The sampler batches by itself up to moga.sampling.CFG_BATCH_MAX_TOKENS tokens;
these rows say where that threshold belongs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import FRAME, WAN_CONFIGS, build_random_model, layout_for  # noqa: E402

from moga.attention import MoGAConfig  # noqa: E402
from moga.sampling import _pad_text  # noqa: E402

CONFIGS = {**WAN_CONFIGS, "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guided_step(model, x, t, pos, neg, batched: bool, moga, shots, cfg=5.0):
    if batched:
        both = model(torch.cat([x, x]), t.expand(2), [torch.cat([p, neg]) for p in pos], shot_frames=shots, moga=moga)
        c, u = both[:1].float(), both[1:].float()
    else:
        c = model(x, t, pos, shot_frames=shots, moga=moga).float()
        u = model(x, t, neg, shot_frames=shots, moga=moga).float()
    return u + cfg * (c - u)


def measure(model, tokens, args, device, frame, moga):
    frames, shots = layout_for(tokens, frame, args.shot)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(1, cfg.in_dim, frames, frame[0] * 2, frame[1] * 2, generator=g).to(device)
    t = torch.tensor([900.0], device=device)
    text_len = cfg.text_len
    pos = [_pad_text(torch.randn(1, 100 + 7 * s, cfg.text_dim, generator=g), text_len).to(device, model.dtype)
           for s in range(len(shots))]
    neg = _pad_text(torch.randn(1, 120, cfg.text_dim, generator=g), text_len).to(device, model.dtype)
    row = dict(tokens=frames * frame[0] * frame[1], latent_frames=frames, shots=len(shots))
    outs = {}
    with torch.inference_mode():
        for name, batched in (("two passes", False), ("one batch of 2", True)):
            guided_step(model, x, t, pos, neg, batched, moga, shots)  # warm-up
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.repeats):
                sync(device)
                t0 = time.perf_counter()
                outs[name] = guided_step(model, x, t, pos, neg, batched, moga, shots)
                sync(device)
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
            row[name] = dict(time_s=statistics.median(times), peak_gib=peak)
    a, b = outs["two passes"].double(), outs["one batch of 2"].double()
    row["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    row["speedup"] = row["two passes"]["time_s"] / row["one batch of 2"]["time_s"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="14B", choices=sorted(CONFIGS))
    ap.add_argument("--tokens", default="32760,65520,131040")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--shot", type=int, default=21, help="latent frames per shot")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/cfg_batch.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (float32)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.tokens, args.repeats, args.shot = "tiny", "48,96", 1, 2
        device, dtype, frame = torch.device("cpu"), torch.float32, (4, 6)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on a CPU")
        device, dtype, frame = torch.device("cuda"), torch.bfloat16, FRAME
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    model = build_random_model(CONFIGS[args.model], args.groups, device, dtype)
    moga = MoGAConfig(num_groups=args.groups, capacity=1.0)
    info = dict(benchmark="cfg_batch", device=name, torch=torch.__version__, model=args.model, groups=args.groups,
                date=datetime.date.today().isoformat(), command=" ".join(sys.argv), results=[])
    print(f"# {name}, torch {torch.__version__}, Wan {args.model}, M = {args.groups}, capacity 1", flush=True)
    for n in (int(v) for v in args.tokens.split(",")):
        try:
            r = measure(model, n, args, device, frame, moga)
        except torch.OutOfMemoryError:
            print(f"{n} tokens: out of memory (the batch of 2 doubles the activations)", flush=True)
            info["results"].append(dict(tokens=n, oom=True))
            torch.cuda.empty_cache()
            continue
        info["results"].append(r)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)
    with open(args.json, "w") as fh:
        json.dump(info, fh, indent=1)
    print("\n| tokens | two passes (s) | one batch of 2 (s) | speed-up | peak two / one (GiB) | max rel diff |")
    print("|---|---|---|---|---|---|")
    for r in info["results"]:
        if r.get("oom"):
            print(f"| {r['tokens']:,} | - | out of memory | - | - | - |")
            continue
        a, b = r["two passes"], r["one batch of 2"]
        print(f"| {r['tokens']:,} | {a['time_s']:.3f} | {b['time_s']:.3f} | {r['speedup']:.2f}x | "
              f"{a['peak_gib']:.1f} / {b['peak_gib']:.1f} | {r['max_rel_diff']:.1e} |")
    return info


if __name__ == "__main__":
    main()
