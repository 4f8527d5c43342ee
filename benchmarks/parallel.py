"""Ulysses sequence parallelism: one denoising step of Wan2.1 1.3B with MoGA on 1 vs 2 GPUs. Table + JSON.

    python benchmarks/parallel.py                       # CUDA, 2 GPUs (NCCL)
    python benchmarks/parallel.py --smoke               # tiny config, 2 CPU ranks (gloo): every code path

Random bf16 weights (meta init, then seeded random values on each GPU: the same on both), routers in
every layer (M = 5, 2x2 window, mean fusion), 480p latent frames (30 x 52 tokens) in shots of 21
latent frames. A step = one forward of the model (one CFG branch, batch 1) under inference_mode plus
the Euler update, on the full latent as `sample` runs it.

Both ranks are spawned once and build the model once. For the 1-GPU number rank 0 runs the step
alone (parallel=None) while rank 1 waits; then both run it with the exchange. Per size: a warm-up
step, then the median of --repeats timed steps (wall clock, synchronised). The all-to-all share comes
from one extra step where every collective is timed between two synchronisations (so it counts
communication only, not the compute queued before it). Peak memory: max_memory_allocated on each GPU
over the timed steps (weights included). Agreement: ||out_2 - out_1|| / ||out_1|| of the model's
output (velocity) for the same input, bf16 both.
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

from common import FRAME, SHOT, WAN_CONFIGS, build_random_model, layout_for  # noqa: E402

from moga.parallel.group import run_on_ranks  # noqa: E402

CONFIGS = {**WAN_CONFIGS, "tiny": dict(dim=96, ffn_dim=192, num_heads=6, num_layers=2, text_dim=32, freq_dim=32)}


def build(name: str, groups: int, device, dtype, seed: int = 0):
    return build_random_model(CONFIGS[name], groups, device, dtype, seed)


def _rank(ex, opts):
    """Runs on every rank; returns rank 0's measurements (and every rank's peak memory)."""
    import torch.distributed as dist

    from moga.attention import MoGAConfig
    from moga.attention.kernels import resolve_backend

    rank, p = ex.rank, ex.world_size
    cuda = torch.cuda.is_available() and not opts["smoke"]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(opts["model"], opts["groups"], device, dtype)
    moga = MoGAConfig(num_groups=opts["groups"], window=(0, 2, 2))
    frame = tuple(opts["frame"])
    out = dict(rank=rank, device=torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
               varlen_backend=resolve_backend("auto", device, dtype), dtype=str(dtype), sizes=[])

    # the fused Triton merge is the CUDA default; if it fails on this device, both ranks fall back
    # to plain torch ops (agreed, so they run the same code)
    from moga.attention import mixture

    def probe():
        frames, shots = layout_for(4 * frame[0] * frame[1], frame)
        xs = torch.randn(1, model.config.in_dim, frames, frame[0] * 2, frame[1] * 2, device=device)
        cs = [torch.randn(1, 16, model.config.text_dim, device=device) for _ in shots]
        with torch.inference_mode():
            model(xs.to(dtype), torch.tensor([500.0], device=device), cs, shot_frames=shots, moga=moga)
        sync()

    try:
        probe()
        ok = 1.0
    except Exception as err:  # noqa: BLE001 - recorded, then the fallback
        ok, out["fused_merge_error"] = 0.0, str(err)[:300]
    if ex.all_reduce_max(1.0 - ok) > 0:
        mixture.FUSED_MERGE = False
        probe()
    out["fused_merge"] = bool(mixture.FUSED_MERGE and cuda)

    def step(x, t, ctx, shots, parallel):
        with torch.inference_mode():
            v = model(x.to(dtype), t, ctx, shot_frames=shots, moga=moga, parallel=parallel)
            x_next = x + (-0.05) * v.float()  # the Euler update sample() does
        sync()
        return v, x_next

    def timed(x, t, ctx, shots, parallel, repeats):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            v, _ = step(x, t, ctx, shots, parallel)
            times.append(time.perf_counter() - t0)
        return v, times

    def peak_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    from moga.parallel.ulysses import UlyssesExchange

    subgroups = []
    for q in opts.get("also", []):
        group = dist.new_group(list(range(q)))  # every rank must call new_group
        subgroups.append((q, UlyssesExchange(group) if rank < q else None))

    for n in opts["tokens"]:
        frames, shots = layout_for(n, frame)
        g = torch.Generator().manual_seed(1)  # same input on every rank and for both runs
        x = torch.randn(1, model.config.in_dim, frames, frame[0] * 2, frame[1] * 2, generator=g).to(device)
        ctx = [(torch.randn(1, 120, model.config.text_dim, generator=g) * 0.1).to(device) for _ in shots]
        t = torch.tensor([800.0], device=device)
        rec = dict(tokens=frames * frame[0] * frame[1], frames=frames, shots=shots)
        try:
            # 1 GPU: rank 0 alone; the others wait at the barrier
            if rank == 0:
                peak_reset()
                step(x, t, ctx, shots, None)  # warm-up
                v1, times1 = timed(x, t, ctx, shots, None, opts["repeats"])
                rec.update(s_per_step_1=statistics.median(times1), times_1=times1, peak_gib_1=peak())
                v1 = v1.float().cpu()
                torch.cuda.empty_cache() if cuda else None
            dist.barrier()
            # intermediate GPU counts (e.g. 2 of 4): a sub-group of the first q ranks, the rest wait
            for q, sub in subgroups:
                if rank < q:
                    peak_reset()
                    step(x, t, ctx, shots, sub)  # warm-up
                    vq, times_q = timed(x, t, ctx, shots, sub, opts["repeats"])
                    if rank == 0:
                        vq = vq.float().cpu()
                        rec[f"s_per_step_{q}"] = statistics.median(times_q)
                        rec[f"peak_gib_{q}"] = peak()
                        rec[f"rel_err_{q}"] = float((vq - v1).norm() / v1.norm())
                    del vq
                dist.barrier()
            # P GPUs
            peak_reset()
            step(x, t, ctx, shots, ex)  # warm-up
            vp, times_p = timed(x, t, ctx, shots, ex, opts["repeats"])
            pk = peak()
            ex.comm_seconds, ex.timed = 0.0, True
            t0 = time.perf_counter()
            step(x, t, ctx, shots, ex)
            instrumented = time.perf_counter() - t0
            ex.timed = False
            peaks = [None] * p
            dist.all_gather_object(peaks, pk)
            rec.update(s_per_step_p=statistics.median(times_p), times_p=times_p, peak_gib_p=peaks,
                       comm_s=ex.comm_seconds, instrumented_step_s=instrumented,
                       comm_share=ex.comm_seconds / instrumented)
            if rank == 0:
                vp = vp.float().cpu()
                rec["speedup"] = rec["s_per_step_1"] / rec["s_per_step_p"]
                rec["rel_err"] = float((vp - v1).norm() / v1.norm())
                rec["max_abs_err"] = float((vp - v1).abs().max())
                rec["out_rms"] = float(v1.pow(2).mean().sqrt())
                del v1
            del vp
        except Exception as err:  # noqa: BLE001 - recorded; the ranks may be out of step after it
            rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            out["sizes"].append(rec)
            print(f"rank {rank}: {rec['error']}", flush=True)
            break
        out["sizes"].append(rec)
        if rank == 0:
            print(_row(rec, p), flush=True)
            if opts.get("partial"):
                with open(opts["partial"], "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
        del x, ctx
        peak_reset()
    return out


def _row(r, p):
    if "error" in r:
        return f"| {r['tokens']:,} | {r['error']} |"
    pk = " / ".join(f"{g:.1f}" for g in r["peak_gib_p"])
    for key in sorted(k for k in r if k.startswith("s_per_step_") and k[11:].isdigit() and k[11:] not in ("1",)):
        q = key[11:]
        pk += f" (x{q}: {r[key]:.3f} s/step, {r['s_per_step_1'] / r[key]:.2f}x, {r[f'peak_gib_{q}']:.1f} GiB)"
    return (f"| {r['tokens']:,} | {r['s_per_step_1']:.3f} | {r['s_per_step_p']:.3f} | {r['speedup']:.2f}x | "
            f"{r['peak_gib_1']:.1f} | {pk} | {100 * r['comm_share']:.1f}% | {r['rel_err']:.2e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="65536,262144")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--also", default="", help="intermediate GPU counts to time in the same run, e.g. '2'")
    ap.add_argument("--model", default="1.3B", choices=sorted(k for k in CONFIGS if k != "tiny"))
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--json", default="benchmarks/results/parallel-h200x2.json")
    ap.add_argument("--partial", default=None, help="append each size's record here as it completes (JSON lines)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on 2 CPU ranks (gloo)")
    args = ap.parse_args()

    opts = dict(model=args.model, tokens=[int(t) for t in args.tokens.split(",")], groups=args.groups,
                repeats=args.repeats, frame=FRAME,
                also=[int(q) for q in args.also.split(",") if q], smoke=args.smoke, partial=args.partial)
    devices = [f"cuda:{i}" for i in range(args.gpus)]
    if args.smoke:
        opts.update(model="tiny", tokens=[60, 250], frame=(5, 6))
        devices = ["cpu"] * args.gpus
    elif torch.cuda.device_count() < args.gpus:
        sys.exit(f"this needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    started = time.perf_counter()
    print(f"| tokens | 1 GPU s/step | {args.gpus} GPUs s/step | speed-up | peak GiB (1) | peak GiB per GPU "
          f"({args.gpus}) | all-to-all share | rel. diff |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = run_on_ranks(_rank, args.gpus, args=(opts,), devices=devices, timeout=args.timeout)
    r0 = results[0]
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=r0["device"], gpus=args.gpus, torch=torch.__version__,
                nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                model=opts["model"], dtype=r0["dtype"], varlen_backend=r0["varlen_backend"],
                fused_merge=r0["fused_merge"], fused_merge_error=r0.get("fused_merge_error"),
                moga=dict(num_groups=args.groups, window=[0, 2, 2], fusion="mean"), frame_tokens=list(opts["frame"]),
                shot_frames=SHOT, step="one model forward (one CFG branch) + Euler update", repeats=args.repeats,
                command=" ".join(sys.argv), wall_s=time.perf_counter() - started, results=r0["sizes"])
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"\n# {info['device']} x{args.gpus}, torch {info['torch']}, varlen {info['varlen_backend']}, "
          f"{info['wall_s']:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
