"""One denoising step of the Wan2.1 T2V DiT (1.3B and 14B configs): dense vs MoGA. Table + JSON.

    python benchmarks/dit.py                      # CUDA (an H200 for 14B at 256k tokens)
    python benchmarks/dit.py --smoke              # a tiny config on the CPU: every code path, seconds

Random bf16 weights (meta init, then random values on the device). Routers in every layer with
max(--groups) rows (merged at run time for smaller M), by default calibrated as `moga patch` does
(k-means of each layer's self-attention inputs over a short seeded pass, fusion "lse"): random
router rows on a random model send most tokens to a few groups (measured: the largest of 8 groups
held 42% of 262k tokens), which measures the imbalance, not MoGA. `--routers random` keeps them. A step = one forward of the model with a
batch of 1 (one CFG branch) under torch.inference_mode, on a latent of 480p frames (30 x 52 tokens
a latent frame) cut into shots of 21 latent frames (~5 s each). Dense = the same model with
MoGAConfig(dense=True): PyTorch SDPA forced to the cuDNN backend (--dense-backend). MoGA = the
three-branch layer (routed + 2x2 window + per-frame, mean fusion) with the fastest varlen backend
importable there. Time: wall clock around a synchronised step after a warm-up step at a small
size; the median of --repeats steps where the step is short (< 20 s), else one step. Peak memory:
torch.cuda.max_memory_allocated over the step (weights included). `--capacity 1` cuts oversized routed
groups as the files `moga patch` writes do (docs/training-free.md); the JSON then also holds the last
layer's group sizes after the cut.
"""
from __future__ import annotations

import argparse
import contextlib
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

from common import FRAME, SHOT, WAN_CONFIGS, build_random_model, layout_for  # noqa: E402

from moga.attention import MoGAConfig  # noqa: E402
from moga.attention import layer as attention_layer  # noqa: E402
from moga.attention.router import cap_routing  # noqa: E402
from moga.checkpoint import calibrate_routers  # noqa: E402
from moga.attention.kernels import resolve_backend  # noqa: E402

CONFIGS = {**WAN_CONFIGS, "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)}


def sdpa_context(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]])


def build(name: str, groups: int, device, dtype, seed: int = 0):
    return build_random_model(CONFIGS[name], groups, device, dtype, seed)


def step(model, x, t, ctx, shots, moga, sync):
    skip = moga == "rest"
    real = attention_layer.dense_attention
    if skip:
        attention_layer.dense_attention = lambda q, k, v: v
        moga = model.moga_config.replace(dense=True)
    try:
        with torch.inference_mode():
            out = model(x, t, ctx, shot_frames=shots, moga=moga)
        sync()
    finally:
        attention_layer.dense_attention = real
    return out


@torch.no_grad()
def calibrate(model, groups, frame, seed=0):
    """Routers as `moga patch` makes them: a 3-step pass on 9 latent frames, k-means per layer."""
    layers = range(model.config.num_layers)
    size = (9, frame[0] * 2, frame[1] * 2)
    cents = calibrate_routers(None, groups, layers, size=size, steps=3, max_tokens=8192, seed=seed,
                              model=model)
    for i, c in cents.items():
        model.blocks[i].self_attn.router.weight.copy_(c.to(model.blocks[i].self_attn.router.weight))


def use_balanced_routing(seed: int = 0):
    """Replace every router's choice by equal-size groups (a seeded random permutation of the tokens
    dealt round-robin), after the router's own matmul and softmax ran, so its cost stays counted."""
    from moga.attention import router as router_mod

    real = router_mod.Router.forward
    cache = {}

    def forward(self, x, num_groups=None):
        r = real(self, x, num_groups)
        b, n, m = r.probs.shape
        key = (b, n, m, str(x.device))
        if key not in cache:
            g = torch.Generator().manual_seed(seed)
            cache[key] = torch.stack([torch.randperm(n, generator=g) % m for _ in range(b)]).to(x.device)
        ids = cache[key]
        return router_mod.Routing(ids, r.probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), r.probs)

    router_mod.Router.forward = forward


def measure(model, tokens, moga, args, device, frame):
    cfg = model.config
    frames, shots = layout_for(tokens, frame)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, frames, frame[0] * 2, frame[1] * 2, device=device, generator=g, dtype=torch.float32)
    ctx = [torch.randn(1, 120, cfg.text_dim, device=device, generator=g) * 0.1 for _ in shots]
    t = torch.tensor([800.0], device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for rep in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        out = step(model, x, t, ctx, shots, moga, sync)
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"non-finite output at {tokens} tokens")
        if times[-1] > 20:
            break
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    routed = model.blocks[-1].self_attn.last_routing
    sizes = capped = None
    if routed is not None:
        sizes = torch.bincount(routed.group_ids.flatten(), minlength=routed.num_groups).tolist()
        if moga != "rest" and moga.capacity:  # the segments the routed branch actually attends over
            capped = cap_routing(routed, moga.capacity, moga.capacity_split).group_sizes()
    del out, x
    return dict(tokens=frames * frame[0] * frame[1], frames=frames, shots=shots, time_s=statistics.median(times),
                times_s=times, peak_gib=peak, last_layer_group_sizes=sizes, last_layer_capped_sizes=capped)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1.3B,14B")
    ap.add_argument("--tokens", default="32768,131072,262144")
    ap.add_argument("--groups", default="8,16")
    ap.add_argument("--window", default="0,2,2")
    ap.add_argument("--dense-backend", default="cudnn", choices=["cudnn", "flash", "efficient", "auto"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--routers", default="calibrated", choices=["calibrated", "random", "balanced"],
                    help="balanced: the router runs, then its choice is replaced by an equal-size random "
                         "assignment (what the balance loss trains a router towards; a random-weight model "
                         "cannot route evenly by itself)")
    ap.add_argument("--fusion", default=None, choices=["mean", "lse"],
                    help="default: lse for calibrated routers (as moga patch), mean for random ones")
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="group capacity of the routed branch (units of N / M; 0: off, the paper's routing). "
                         "Calibrated k-means groups are uneven; `moga patch` writes capacity 1")
    ap.add_argument("--capacity-split", default="runs", choices=["runs", "stride"])
    ap.add_argument("--no-dense", action="store_true", help="skip the dense step (already measured)")
    ap.add_argument("--no-rest", action="store_true", help="skip the attention-free 'rest' timing")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what remains after this many seconds")
    ap.add_argument("--json", default="benchmarks/results/dit.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frame = FRAME
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.smoke:
        models, tokens, frame = ["tiny"], [48, 96], (4, 6)
    groups = [int(m) for m in args.groups.split(",")]
    window = MoGAConfig.parse_window(args.window)
    varlen = resolve_backend("auto", device, dtype)
    started = time.perf_counter()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype), varlen_backend=varlen,
                dense_backend=args.dense_backend, window=list(window), routers=args.routers,
                fusion=args.fusion or ("lse" if args.routers == "calibrated" else "mean"),
                capacity=args.capacity or None, capacity_split=args.capacity_split, shot_frames=SHOT, frame_tokens=list(frame),
                command=" ".join(sys.argv), results=[])
    print(f"# {info['device']}, torch {torch.__version__}, varlen {varlen}, dense SDPA {args.dense_backend}", flush=True)

    def save():
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)

    # the target first (the largest model at the most tokens), then the small model, then the rest
    target, desc = models[-1], sorted(tokens, reverse=True)
    jobs = [(target, desc[0])] + [(m, n) for m in models[:-1] for n in desc] + [(target, n) for n in desc[1:]]
    if args.routers == "balanced":
        use_balanced_routing()
    built = {}
    for name, n in jobs:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget spent: skipping {name} at {n} tokens", flush=True)
            info.setdefault("skipped", []).append([name, n])
            continue
        if name not in built:
            model = build(name, max(groups), device, dtype)
            t0 = time.perf_counter()
            if args.routers == "calibrated":
                calibrate(model, max(groups), frame)
                print(f"# {name}: routers calibrated in {time.perf_counter() - t0:.1f} s", flush=True)
            model.blocks[-1].self_attn.record_routing = True
            base = MoGAConfig(num_groups=max(groups), window=window, fusion=info["fusion"],
                              capacity=info["capacity"], capacity_split=args.capacity_split)
            modes = ([] if args.no_dense else [("dense", base.replace(dense=True))]) + [(f"moga M={m}", base.replace(num_groups=m)) for m in groups]
            if not args.no_rest:
                modes.append(("rest", "rest"))
            with sdpa_context(args.dense_backend if device.type == "cuda" else "auto"):
                for _, moga in modes:   # warm-up: kernels, cuDNN graphs, router merges
                    measure(model, tokens[0] // 8 if device.type == "cuda" else tokens[0], moga,
                            argparse.Namespace(repeats=1), device, frame)
            built[name] = (model, modes)
        model, modes = built[name]
        with sdpa_context(args.dense_backend if device.type == "cuda" else "auto"):
            for mode, moga in modes:
                r = measure(model, n, moga, args, device, frame)
                r.update(model=name, mode=mode)
                info["results"].append(r)
                print(f"{name:>5} {r['tokens']:>7} {mode:>9}: {r['time_s']:8.3f} s  peak {r['peak_gib']:6.1f} GiB",
                      flush=True)
                save()
    info["wall_s"] = time.perf_counter() - started
    save()
    print_table(info)


def print_table(info):
    rows = sorted(info["results"], key=lambda r: (r["model"], r["tokens"]))
    print(f"\n| model | tokens | mode | step (s) | speed-up vs dense | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    dense = {(r["model"], r["tokens"]): r["time_s"] for r in rows if r["mode"] == "dense"}
    for r in rows:
        d = dense.get((r["model"], r["tokens"]))
        speed = f"{d / r['time_s']:.2f}x" if d and r["mode"] != "rest" else "-"
        sizes = r.get("last_layer_group_sizes")
        big = f" (largest group {max(sizes) / sum(sizes):.0%})" if sizes and r["mode"].startswith("moga") else ""
        capped = r.get("last_layer_capped_sizes")
        if capped and big:
            big = f"{big[:-1]}, capped {max(capped) / sum(capped):.0%})"
        print(f"| {r['model']} | {r['tokens']:,} | {r['mode']}{big} | {r['time_s']:.2f} | {speed} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
