"""MoGA attention vs dense attention: time, achieved TFLOP/s, FLOP ratio. Prints a table, writes JSON.

    python benchmarks/attention.py                 # CUDA: Wan shapes (needs ~40 GB, an H100 or more)
    python benchmarks/attention.py --device cpu    # CPU table: 8k and 32k tokens, sdpa backend
    python benchmarks/attention.py --smoke         # tiny shapes, every code path, seconds on a CPU

Variants per shape (tokens, heads, M groups):
  dense_cudnn / dense_flash   F.scaled_dot_product_attention forced to the cuDNN / flash backend
  dense_fa4                   flash_attn.cute.flash_attn_func (flash-attn-4), when importable
  dense_sdpa                  SDPA's own choice (CPU)
  moga                        the MoGA layer's attention: router + moga_attention (three branches,
                              permutations, merge), once per varlen backend (fa4 / torch / sdpa)
  routed / window / frame     one branch alone (its gathers and unsort included)
  routing                     the router alone (linear + softmax + top-1)
  permutation                 moga_attention with the attention kernel replaced by the identity:
                              group sort, size sync, gathers, unsorts, merge
--peers: one table of dense flash-attn-4, MoGA (fa4 backend) and, when `comfy_kitchen` imports, its
Sol-Attn (`sol_attn`: tau 1.3 with 256 extra tokens per query block, ComfyUI's default; tau 1.0; SLA top-k
10%) and its dense INT8 attention, at 187,200 and 561,600 tokens with 40 heads (each output's relative
error against dense fa4 in the JSON).
Routing: a Router with random weights on random hidden states: each token's logits are independent
draws, so the groups come out roughly balanced (their sizes are in the JSON). FLOPs are the ones a
variant does: 4 * (query-key pairs) * heads * head_dim (forward). Times: median of CUDA-event timed
runs after warm-up (wall clock on the CPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moga.attention import MoGAConfig, TokenLayout, mixture  # noqa: E402
from moga.attention.kernels import backend_problem, varlen_attention  # noqa: E402
from moga.attention.router import Router  # noqa: E402


def timer(device, warmup, reps):
    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def dense_fns(device):
    """name -> fn(q, k, v) on [1, N, H, D] for the dense baselines available here."""
    fns = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_with(backend):
            def fn(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            return fn
        fns["dense_cudnn"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        fns["dense_flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        try:
            from flash_attn.cute import flash_attn_func
            # this release returns (out, lse)
            fns["dense_fa4"] = lambda q, k, v: _first(flash_attn_func(q, k, v))
        except Exception as err:
            print(f"# dense_fa4 skipped: {err}", flush=True)
    else:
        fns["dense_sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)))
    return fns


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def moga_backends(device, dtype, wanted):
    out = []
    for b in wanted:
        problem = backend_problem(b, device, dtype)
        if problem:
            print(f"# moga backend {b} skipped: {problem}", flush=True)
        else:
            out.append(b)
    return out


def _identity_kernel(q, k, v, cu_q, cu_k, max_q, max_k, backend="auto", return_lse=False):
    return (q, q.new_zeros(q.shape[:2], dtype=torch.float32)) if return_lse else q


def bench_shape(spec, device, dtype, backends, warmup, reps, dense_reps, run_dense=True):
    frames, hh, ww, shot, heads, head_dim, groups = (spec[k] for k in (
        "frames", "height", "width", "shot", "heads", "head_dim", "groups"))
    shots = [shot] * (frames // shot) + ([frames % shot] if frames % shot else [])
    layout = TokenLayout(frames, hh, ww, tuple(shots))
    n, dim = layout.num_tokens, heads * head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, n, dim, device=device, dtype=dtype, generator=gen)
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    rows, base = [], dict(tokens=n, layout=str(layout), heads=heads, head_dim=head_dim)
    tm, tm_dense = timer(device, warmup, reps), timer(device, min(warmup, 1), dense_reps)
    dense_flops = 4.0 * n * n * heads * head_dim
    if run_dense:
        for name, fn in dense_fns(device).items():
            try:
                with torch.no_grad():
                    ms = tm_dense(lambda: fn(q, k, v))
                rows.append(dict(base, groups=None, variant=name, backend=name.split("_")[1], ms=ms,
                                 flops=dense_flops))
            except Exception as err:  # a backend that cannot run this shape is reported, not fatal
                print(f"# {name} failed at {n} tokens: {err}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for m in groups:
        router = Router(dim, m).to(device, dtype)
        with torch.no_grad():
            router.weight.normal_(0, 1 / math.sqrt(dim), generator=gen)
            routing = router(x)
        sizes = torch.bincount(routing.group_ids.flatten(), minlength=m).tolist()
        cfg = MoGAConfig(num_groups=m)
        pairs = mixture.attention_pairs(layout, cfg, sizes)
        moga_flops = 4.0 * heads * head_dim * (pairs["routed"] + pairs["window"] + pairs["frame"])
        extra = dict(base, groups=m, group_sizes=sizes, flop_ratio=pairs["dense"] / (
            pairs["routed"] + pairs["window"] + pairs["frame"]))
        with torch.no_grad():
            for b in backends:
                c = cfg.replace(backend=b)

                def layer():
                    return mixture.moga_attention(q, k, v, router(x), layout, c)
                try:
                    rows.append(dict(extra, variant="moga", backend=b, ms=tm(layer), flops=moga_flops))
                except Exception as err:
                    print(f"# moga/{b} failed at {n} tokens, M={m}: {err}", flush=True)
                    continue
                if b != backends[0]:
                    continue
                for branch, key, flags in (("routed", "routed", (1, 0, 0)), ("window", "window", (0, 1, 0)),
                                           ("frame", "frame", (0, 0, 1))):
                    cb = c.replace(routed=bool(flags[0]), windowed=bool(flags[1]), per_frame=bool(flags[2]))
                    ms = tm(lambda: mixture.moga_attention(q, k, v, routing, layout, cb))
                    rows.append(dict(extra, variant=branch, backend=b, ms=ms,
                                     flops=4.0 * heads * head_dim * pairs[key]))
                rows.append(dict(extra, variant="routing", backend="-", ms=tm(lambda: router(x)),
                                 flops=0.0))
                real = mixture.varlen_attention
                mixture.varlen_attention = _identity_kernel
                try:
                    ms = tm(lambda: mixture.moga_attention(q, k, v, routing, layout, c))
                finally:
                    mixture.varlen_attention = real
                rows.append(dict(extra, variant="permutation", backend="-", ms=ms, flops=0.0))
                if device.type == "cuda" and mixture.FUSED_MERGE:  # the same without the fused merge
                    mixture.FUSED_MERGE = False
                    try:
                        ms = tm(layer)
                    finally:
                        mixture.FUSED_MERGE = True
                    rows.append(dict(extra, variant="moga_torchmerge", backend=b, ms=ms, flops=moga_flops))
        for r in rows:
            if r.get("groups") == m and r["variant"] == "moga":
                r.setdefault("dense_flops", dense_flops)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def derive(rows):
    """TFLOP/s; speedups of moga over each dense baseline of the same shape and heads."""
    for r in rows:
        r["tflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e12 if r["flops"] else None
    for r in rows:
        if r["variant"] != "moga":
            continue
        same = [d for d in rows if d["tokens"] == r["tokens"] and d["heads"] == r["heads"]
                and d["variant"].startswith("dense")]
        for d in same:
            r[f"speedup_vs_{d['variant']}"] = d["ms"] / r["ms"]
        over = [o["ms"] for o in rows if o["tokens"] == r["tokens"] and o["heads"] == r["heads"]
                and o.get("groups") == r["groups"] and o["variant"] in ("routing", "permutation")]
        if len(over) == 2:
            r["routing_permutation_share"] = sum(over) / r["ms"]
    return rows


def table(rows):
    lines = [f"{'tokens':>8} {'heads':>5} {'M':>3} {'variant':<12} {'backend':<9} {'ms':>10} "
             f"{'TFLOP/s':>8} {'FLOP ratio':>10} {'vs fa4':>7} {'vs cuDNN':>8} {'vs flash':>8} "
             f"{'vs sdpa':>7} {'overhead':>8}"]
    fmt = lambda v, f: (f.format(v) if v is not None else "-")  # noqa: E731
    for r in rows:
        lines.append(
            f"{r['tokens']:>8} {r['heads']:>5} {r['groups'] or '-':>3} {r['variant']:<12} "
            f"{r['backend']:<9} {r['ms']:>10.2f} {fmt(r.get('tflops'), '{:.1f}'):>8} "
            f"{fmt(r.get('flop_ratio') if r['variant'] == 'moga' else None, '{:.2f}'):>10} "
            f"{fmt(r.get('speedup_vs_dense_fa4'), '{:.2f}x'):>7} "
            f"{fmt(r.get('speedup_vs_dense_cudnn'), '{:.2f}x'):>8} "
            f"{fmt(r.get('speedup_vs_dense_flash'), '{:.2f}x'):>8} "
            f"{fmt(r.get('speedup_vs_dense_sdpa'), '{:.2f}x'):>7} "
            f"{fmt(r.get('routing_permutation_share'), '{:.1%}'):>8}")
    return "\n".join(lines)


def check_backends(device, dtype, backends):
    """Small correctness check of each backend against the float32 reference, lse and backward."""
    out = []
    lay = TokenLayout(6, 5, 7, (2, 4))
    gen = torch.Generator(device=device).manual_seed(1)
    # head dim 128 as in the timed shapes: fa4 compiles once per head dim
    q, k, v = (torch.randn(2, lay.num_tokens, 2, 128, device=device, generator=gen) for _ in range(3))
    router = Router(64, 4).to(device)
    routing = router(torch.randn(2, lay.num_tokens, 64, device=device, generator=gen))
    for b in backends:
        for fusion in ("mean", "lse"):
            cfg = MoGAConfig(num_groups=4, fusion=fusion, backend=b)
            try:
                with torch.no_grad():
                    ref = mixture.moga_attention(q, k, v, routing, lay, cfg.replace(backend="reference"))
                    got = mixture.moga_attention(q.to(dtype), k.to(dtype), v.to(dtype), routing, lay, cfg)
                err = ((got.float() - ref).norm() / ref.norm()).item()
                out.append(dict(backend=b, fusion=fusion, check="forward", rel_err=err, ok=err < 2e-2))
            except Exception as e:
                out.append(dict(backend=b, fusion=fusion, check="forward", error=str(e)[:300], ok=False))
        try:  # training: gradients of q, k, v against sdpa in float32
            grads = {}
            for name, dt in ((b, dtype), ("sdpa", torch.float32)):
                qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
                o = mixture.moga_attention(qq, kk, vv, routing.gather(lambda t: t.detach()), lay,
                                           MoGAConfig(num_groups=4, backend=name))
                o.float().square().sum().backward()
                grads[name] = torch.cat([t.grad.float().flatten() for t in (qq, kk, vv)])
            err = ((grads[b] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item()
            out.append(dict(backend=b, fusion="mean", check="backward", rel_err=err, ok=err < 3e-2))
        except Exception as e:
            out.append(dict(backend=b, fusion="mean", check="backward", error=str(e)[:300], ok=False))
    return out


def check_fused_merge(device, dtype):
    """The Triton merge against the torch merge on this device (off for the run if it fails)."""
    lay = TokenLayout(6, 5, 7, (2, 4))
    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(2, lay.num_tokens, 2, 128, device=device, generator=gen).to(dtype)
               for _ in range(3))
    routing = Router(32, 4).to(device)(torch.randn(2, lay.num_tokens, 32, device=device, generator=gen))
    try:
        errs = []
        with torch.no_grad():
            for fusion in ("mean", "lse"):
                cfg = MoGAConfig(num_groups=4, fusion=fusion, backend="sdpa")
                mixture.FUSED_MERGE = False
                plain = mixture.moga_attention(q, k, v, routing, lay, cfg).float()
                mixture.FUSED_MERGE = True
                fused = mixture.moga_attention(q, k, v, routing, lay, cfg).float()
                errs.append(((fused - plain).norm() / plain.norm()).item())
        return dict(check="fused_merge", rel_err=max(errs), ok=max(errs) < 1e-2)
    except Exception as e:
        return dict(check="fused_merge", error=str(e)[:300], ok=False)


def peer_fns(device):
    """name -> fn(q, k, v) on [1, N, H, 128] for comfy-kitchen's attention kernels, when importable."""
    try:
        import comfy_kitchen as ck
    except Exception as err:
        print(f"# comfy_kitchen peers skipped: {err}", flush=True)
        return {}, f"not importable: {err}"
    fns = {}
    if ck.sol_attn_is_available(device):
        fns["sol_attn tau1.3+256"] = lambda q, k, v: ck.sol_attn(q, k, v, tau=1.3, token_aug=256)
        fns["sol_attn tau1.0"] = lambda q, k, v: ck.sol_attn(q, k, v, tau=1.0)
        fns["sol_attn SLA top-k 10%"] = lambda q, k, v: ck.sol_attn(q, k, v, topk_ratio=0.1)
    else:
        print("# sol_attn skipped: comfy_kitchen.sol_attn_is_available() is False here", flush=True)
    if ck.int8_attention_is_available(device):
        fns["int8 dense"] = lambda q, k, v: ck.int8_attention(
            *(t.transpose(1, 2).contiguous() for t in (q, k, v))).transpose(1, 2)
    else:
        print("# int8 attention skipped: comfy_kitchen.int8_attention_is_available() is False here", flush=True)
    return fns, getattr(ck, "__version__", "?")


PEER_SHAPES = [dict(frames=120, height=30, width=52, shot=20, heads=40, head_dim=128, groups=(5, 20)),
               dict(frames=360, height=30, width=52, shot=20, heads=40, head_dim=128, groups=(20,))]


def bench_peers(device, dtype, backend, budget_s=1e9):
    """Dense fa4, MoGA and comfy-kitchen's kernels on the same q, k, v; rows with ms and error vs dense."""
    peers, version = peer_fns(device)
    dense = {k: v for k, v in dense_fns(device).items() if k == "dense_fa4"} or \
        {k: v for k, v in dense_fns(device).items() if k == "dense_cudnn"}
    rows, start = [], time.time()
    for spec in PEER_SHAPES:
        if time.time() - start > budget_s:
            print(f"# peers at {spec['frames']} frames skipped: over the budget", flush=True)
            continue
        frames, shot, heads = spec["frames"], spec["shot"], spec["heads"]
        shots = [shot] * (frames // shot)
        layout = TokenLayout(frames, spec["height"], spec["width"], tuple(shots))
        n = layout.num_tokens
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, n, heads, spec["head_dim"], device=device, dtype=dtype, generator=gen)
                   for _ in range(3))
        x = torch.randn(1, n, heads * spec["head_dim"], device=device, dtype=dtype, generator=gen)
        # one warm-up call at every shape: a first call includes flash-attn-4's compile for new segment sizes (timed
        # cold at 561,600 tokens, MoGA M=20 read 3.1 s, where 0.73 s was measured warm); one timed call there
        big = n > 300_000
        tm = timer(device, 1, 1 if big else 3)
        ref = None
        fns = dict(dense)
        for m in spec["groups"]:
            router = Router(heads * spec["head_dim"], m).to(device, dtype)
            with torch.no_grad():
                router.weight.normal_(0, 1 / math.sqrt(heads * spec["head_dim"]), generator=gen)
            cfg = MoGAConfig(num_groups=m, backend=backend)
            fns[f"moga M={m}"] = (lambda r, c: lambda q, k, v: mixture.moga_attention(q, k, v, r(x), layout, c))(router, cfg)
        fns.update(peers)
        for name, fn in fns.items():
            try:
                held = {}
                with torch.no_grad():
                    ms = tm(lambda: held.__setitem__("out", fn(q, k, v)))
                out = held.pop("out")
                err = None
                if ref is None:
                    ref = out.float()
                else:
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                rows.append(dict(tokens=n, heads=heads, variant=name, ms=ms, rel_err_vs_dense=err))
                print(f"# peers {n:>7} {name:<24} {ms:10.1f} ms" + (f"  err {err:.3f}" if err is not None else ""),
                      flush=True)
                del out
            except Exception as e:
                rows.append(dict(tokens=n, heads=heads, variant=name, error=str(e)[:300]))
                print(f"# peers {n} {name} failed: {str(e)[:200]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del q, k, v, x, ref
    return rows, version


def peers_table(rows):
    lines = ["| tokens | heads | kernel | ms | vs dense | rel. error vs dense |", "|---|---|---|---|---|---|"]
    dense = {r["tokens"]: r["ms"] for r in rows if r["variant"].startswith("dense") and "ms" in r}
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['tokens']:,} | {r['heads']} | {r['variant']} | failed | - | - |")
            continue
        d = dense.get(r["tokens"])
        e = r.get("rel_err_vs_dense")
        lines.append(f"| {r['tokens']:,} | {r['heads']} | {r['variant']} | {r['ms']:.1f} | "
                     f"{d / r['ms']:.2f}x | {'-' if e is None else f'{e:.3f}'} |" if d else "")
    return "\n".join(lines)


SHAPES = {
    "cuda": [  # Wan: 30x52 tokens a latent frame, head dim 128, shots of 20 latent frames
        dict(frames=120, height=30, width=52, shot=20, heads=40, head_dim=128, groups=(5, 20)),
        dict(frames=120, height=30, width=52, shot=20, heads=12, head_dim=128, groups=(5, 20)),
        dict(frames=21, height=30, width=52, shot=21, heads=40, head_dim=128, groups=(5,)),
        dict(frames=21, height=30, width=52, shot=21, heads=12, head_dim=128, groups=(5,)),
        dict(frames=360, height=30, width=52, shot=20, heads=40, head_dim=128, groups=(20,),
             dense_reps=1),
    ],
    "cpu": [
        dict(frames=8, height=32, width=32, shot=4, heads=4, head_dim=64, groups=(4,)),
        dict(frames=32, height=32, width=32, shot=8, heads=4, head_dim=64, groups=(4,), dense_reps=1),
    ],
    "smoke": [
        dict(frames=6, height=4, width=6, shot=3, heads=2, head_dim=16, groups=(2, 3)),
    ],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check that everything runs")
    ap.add_argument("--backends", default=None,
                    help="MoGA varlen backends, comma-separated (default: fa4,torch on CUDA; sdpa on CPU)")
    ap.add_argument("--json", default=None, help="where to write the JSON (default: benchmarks/results/)")
    ap.add_argument("--max-tokens", type=int, default=None, help="skip shapes above this many tokens")
    ap.add_argument("--no-check", action="store_true", help="skip the small correctness check")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this long")
    ap.add_argument("--peers", action="store_true",
                    help="only the peers table: dense fa4, MoGA, comfy-kitchen sol_attn / INT8 (CUDA)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kind = "smoke" if args.smoke else device.type
    wanted = (args.backends.split(",") if args.backends
              else ["fa4", "torch"] if device.type == "cuda" else ["sdpa"])
    backends = moga_backends(device, dtype, wanted)
    if device.type == "cuda" and not backends:
        backends = ["sdpa"]
    warmup, reps = (1, 1) if kind in ("smoke", "cpu") else (2, 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), torch=torch.__version__, dtype=str(dtype),
                backends=backends, warmup=warmup, reps=reps)
    print(f"# {meta}", flush=True)
    if args.peers:
        if device.type != "cuda":
            raise SystemExit("--peers needs a CUDA GPU (fa4, comfy-kitchen)")
        rows, version = bench_peers(device, dtype, backends[0], args.budget_s)
        path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention-peers.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(meta=dict(meta, comfy_kitchen=version), rows=rows), f, indent=1)
        print(peers_table(rows))
        print(f"# wrote {path}")
        return rows
    checks = [] if args.no_check else check_backends(device, dtype, backends)
    if device.type == "cuda":
        checks.append(check_fused_merge(device, dtype))
        if not checks[-1]["ok"]:
            mixture.FUSED_MERGE = False
        meta["fused_merge"] = mixture.FUSED_MERGE
    for c in checks:
        print(f"# check {c}", flush=True)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"attention-{kind}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows, start = [], time.time()
    for spec in SHAPES[kind]:
        n = spec["frames"] * spec["height"] * spec["width"]
        if args.max_tokens and n > args.max_tokens:
            continue
        if time.time() - start > args.budget_s:
            print(f"# {n} tokens, {spec['heads']} heads skipped: over --budget-s", flush=True)
            continue
        t0 = time.time()
        try:
            rows += bench_shape(spec, device, dtype, backends, warmup, reps,
                                spec.get("dense_reps", 1 if kind == "cpu" else 3))
        except Exception as err:  # e.g. out of memory: keep what the other shapes measured
            print(f"# {n} tokens, {spec['heads']} heads failed: {err}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"# {n} tokens, {spec['heads']} heads: {time.time() - t0:.1f} s", flush=True)
        derive(rows)
        print(table([r for r in rows if r["tokens"] == n and r["heads"] == spec["heads"]]), flush=True)
        with open(path, "w") as f:  # after every shape: a run cut short keeps its numbers
            json.dump(dict(meta=meta, checks=checks, rows=rows), f, indent=1)
    print(table(rows))
    print(f"# wrote {path}")
    return rows


if __name__ == "__main__":
    main()
