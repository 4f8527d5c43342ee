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
import step_profile  # noqa: E402

from moga import fp8, fused, fused_block  # noqa: E402

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


def build(name: str, groups: int, device, dtype, seed: int = 0, blocks: int = 0):
    spec = dict(CONFIGS[name], **({"num_layers": blocks} if blocks else {}))
    return build_random_model(spec, groups, device, dtype, seed)


class BlockClock:
    """CUDA events around every block's forward: the blocks' share of a step (to scale a few blocks to 40)."""

    def __init__(self, model, cuda: bool):
        self.cuda, self.pairs, self.handles = cuda, [], []
        if cuda:
            for b in model.blocks:
                self.handles.append(b.register_forward_pre_hook(self._start))
                self.handles.append(b.register_forward_hook(self._stop))

    def _start(self, module, args):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs.append([e, None])

    def _stop(self, module, args, out):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs[-1][1] = e

    def take_s(self) -> float:
        """Seconds spent in blocks since the last call (after a synchronize)."""
        s = sum(a.elapsed_time(b) for a, b in self.pairs if b is not None) / 1e3
        self.pairs = []
        return s


def block_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


VARIANTS = ("baseline", "fused-r1", "fused", "fp8-r1", "fp8", "fp8-tensor")


def use_variant(name: str, models: dict, chunk: int):
    """Switch the process to a variant; returns its model. baseline: fused kernels off; fused: on, with the
    residual updates fused into the next norm (moga.fused_block); fused-r1: the kernels of round one only
    (separate residual adds); fp8: fused + fp8 matmuls (per-row weights, per-token activations; the norms
    and GELU write e4m3); fp8-r1: fp8 on fused-r1 (a quantise pass per matmul input); fp8-tensor:
    per-tensor both."""
    fused.FUSED = name != "baseline"
    fused_block.ENABLED = not name.endswith("-r1")
    model = models["fp8" if name.startswith("fp8") else "bf16"]
    if name == "fp8-tensor":
        for m in model.modules():
            if isinstance(m, fp8.Fp8Linear):
                m.act_scaling = "tensor"
    elif name in ("fp8", "fp8-r1"):
        for m in model.modules():
            if isinstance(m, fp8.Fp8Linear):
                m.act_scaling = "token"
    model.chunk_tokens = chunk
    return model


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


def measure(model, tokens, moga, args, device, frame, clock=None, keep=False):
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
    block_s = []
    for rep in range(max(1, args.repeats)):
        if clock is not None:
            clock.take_s()
        t0 = time.perf_counter()
        out = step(model, x, t, ctx, shots, moga, sync)
        times.append(time.perf_counter() - t0)
        if clock is not None:
            block_s.append(clock.take_s())
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
    kept = out.float().cpu() if keep else None
    del out, x
    r = dict(tokens=frames * frame[0] * frame[1], frames=frames, shots=shots, time_s=statistics.median(times),
             times_s=times, peak_gib=peak, last_layer_group_sizes=sizes, last_layer_capped_sizes=capped)
    if block_s and clock.cuda:
        r["blocks_s"] = statistics.median(block_s)
    return (r, kept) if keep else r


def inputs(cfg, tokens, device, frame):
    frames, shots = layout_for(tokens, frame)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, frames, frame[0] * 2, frame[1] * 2, device=device, generator=g)
    ctx = [torch.randn(1, 120, cfg.text_dim, device=device, generator=g) * 0.1 for _ in shots]
    return x, torch.tensor([800.0], device=device), ctx, shots


def linear_params_per_block(cfg) -> int:
    """Weights of the matmuls a token goes through in one block (self q k v o, cross q o, FFN)."""
    return 6 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim


def run_variants(args, info, device, dtype, frame, name, tokens, groups, window, save):
    """--variants / --blocks / --profile: baseline vs fused vs fp8 on one model config (the last of --models)."""
    import copy

    from moga.model import WanModel
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = (args.variants or "fused").split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}: choose from {VARIANTS}")
    default_chunk = WanModel.chunk_tokens
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [default_chunk]
    models = {"bf16": build(name, max(groups), device, dtype, blocks=args.blocks)}
    if args.routers == "calibrated":
        t0 = time.perf_counter()
        calibrate(models["bf16"], max(groups), frame)
        print(f"# {name}: routers calibrated in {time.perf_counter() - t0:.1f} s", flush=True)
    if any(v.startswith("fp8") for v in variants):
        m8 = copy.deepcopy(models["bf16"])
        rep = fp8.enable_fp8(m8, device, force=args.smoke)
        info["fp8"] = dict(enabled=rep.enabled, summary=rep.summary(), layers=rep.layers,
                           reason=fp8.fp8_problem(device))
        print(f"# {rep.summary()}", flush=True)
        if rep.enabled:
            models["fp8"] = m8
        else:
            variants = [v for v in variants if not v.startswith("fp8")]
            del m8
    for m in models.values():
        m.blocks[-1].self_attn.record_routing = True
    cfg = models["bf16"].config
    blocks, full = len(models["bf16"].blocks), CONFIGS[name]["num_layers"]
    clocks = {k: BlockClock(m, cuda) for k, m in models.items()}
    weights = {k: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
               for k, m in models.items()}
    per_block = {k: block_bytes(m.blocks[0]) for k, m in models.items()}
    info.update(model=name, blocks=blocks, scaled_to=full, variants=variants, chunks=chunks,
                linear_params_per_block=linear_params_per_block(cfg), matmul_tflops=args.matmul_tflops)
    base = MoGAConfig(num_groups=max(groups), window=window, fusion=info["fusion"], capacity=info["capacity"],
                      capacity_split=args.capacity_split)
    pairs = list(zip(tokens, groups)) if args.groups_per_size else [(n, m) for n in tokens for m in groups]
    jobs = [(v, c) for v in variants for c in (chunks if v == "fused" else [default_chunk])]
    label = lambda v, c: v if c == default_chunk else f"{v} chunk {c}"  # noqa: E731
    modes = lambda m: [(f"moga M={m}", base.replace(num_groups=m))] + ([] if args.no_rest else [("rest", "rest")])  # noqa: E731
    started = time.perf_counter()
    for v, c in jobs:   # warm-up: kernels, fa4 / Triton compiles, router merges
        model = use_variant(v, models, c)
        for m in sorted({m for _, m in pairs}):
            for _, moga in modes(m):
                measure(model, tokens[0] // 8 if cuda else tokens[0], moga, argparse.Namespace(repeats=1),
                        device, frame)
    print(f"# warm-up {time.perf_counter() - started:.1f} s", flush=True)

    if args.profile:
        n, m = pairs[0] if not args.profile_tokens else next(p for p in pairs if p[0] == args.profile_tokens)
        x, t, ctx, shots = inputs(cfg, n, device, frame)
        info["profile"] = dict(tokens=n, groups=m, variants={})
        for v in variants:
            model = use_variant(v, models, default_chunk)
            moga = base.replace(num_groups=m)
            prof = step_profile.families(step_profile.profile_step(
                lambda: step(model, x, t, ctx, shots, moga, sync), device))
            info["profile"]["variants"][v] = prof
            print(step_profile.table(prof, f"profile {name} {blocks} blocks, {n:,} tokens, M={m}, {v}"), flush=True)
            save()
        del x, ctx

    for n, m in pairs:
        outs = {}
        for v, c in jobs:
            if time.perf_counter() - started > args.budget_s:
                print(f"budget spent: skipping {v} at {n} tokens", flush=True)
                info.setdefault("skipped", []).append([v, n])
                continue
            model = use_variant(v, models, c)
            kind = "fp8" if v.startswith("fp8") else "bf16"
            for mode, moga in modes(m):
                r, out = measure(model, n, moga, args, device, frame, clock=clocks[kind], keep=True)
                r.update(model=name, variant=label(v, c), mode=mode, groups=m, chunk=c)
                if "blocks_s" in r and cuda:
                    r["scaled_time_s"] = r["time_s"] + (full / blocks - 1) * r["blocks_s"]
                    other = sum(b for k, b in weights.items() if k != kind)
                    r["scaled_peak_gib"] = r["peak_gib"] - other / 2**30 + (full - blocks) * per_block[kind] / 2**30
                r["linear_flop_s"] = 2 * r["tokens"] * linear_params_per_block(cfg) * full / (args.matmul_tflops * 1e12)
                if mode != "rest":
                    outs[label(v, c)] = out
                    ref = outs.get("baseline", outs[label(*jobs[0])])
                    r["rel_err_vs_first"] = ((out - ref).norm() / ref.norm()).item()
                info["results"].append(r)
                print(f"{name:>5} {r['tokens']:>7} {label(v, c):>16} {mode:>9}: {r['time_s']:8.3f} s"
                      + (f" (x{full}/{blocks}: {r['scaled_time_s']:.2f} s, peak {r['scaled_peak_gib']:.1f} GiB)"
                         if "scaled_time_s" in r else f" peak {r['peak_gib']:6.1f} GiB")
                      + (f" err {r['rel_err_vs_first']:.2e}" if "rel_err_vs_first" in r else ""), flush=True)
                save()
    fused.FUSED, fused_block.ENABLED = True, True
    print_variants(info)


def print_variants(info):
    print("\n| tokens | M | variant | mode | step (s) | scaled to %s blocks (s) | linear FLOP time (s) | "
          "peak scaled (GiB) | rel. error vs baseline |" % info.get("scaled_to", "-"))
    print("|---|---|---|---|---|---|---|---|---|")
    for r in info["results"]:
        err = r.get("rel_err_vs_first")
        print(f"| {r['tokens']:,} | {r['groups']} | {r['variant']} | {r['mode']} | {r['time_s']:.2f} | "
              f"{r.get('scaled_time_s', float('nan')):.2f} | {r['linear_flop_s']:.2f} | "
              f"{r.get('scaled_peak_gib', r['peak_gib']):.1f} | {'-' if err is None else f'{err:.2e}'} |")


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
    ap.add_argument("--variants", default=None,
                    help=f"comma list of {VARIANTS}: time each (with --blocks, scaled to the full depth)")
    ap.add_argument("--blocks", type=int, default=0, help="build only this many blocks (0: all); times scaled")
    ap.add_argument("--groups-per-size", action="store_true", help="the i-th --groups goes with the i-th --tokens")
    ap.add_argument("--chunks", default=None, help="FFN / cross-attention chunk sizes to time for 'fused'")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table by op family, per variant")
    ap.add_argument("--profile-tokens", type=int, default=0, help="which --tokens to profile (default: first)")
    ap.add_argument("--matmul-tflops", type=float, default=790.0, help="bf16 matmul ceiling for the FLOP time")
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

    if args.variants or args.blocks or args.profile:
        run_variants(args, info, device, dtype, frame, models[-1], tokens, groups, window, save)
        info["wall_s"] = time.perf_counter() - started
        save()
        return

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
