"""A minute of 480p video from the 14B model on one GPU: the whole few-step sampling, timed. Table + JSON.

    python benchmarks/minute.py                   # CUDA: 14B, 561,600 tokens, 4 steps, cfg 1 (a distill LoRA's settings)
    python benchmarks/minute.py --smoke           # a tiny config on the CPU: every code path, seconds

What a user with a step-distill LoRA runs (4 steps, cfg 1, so no negative pass): `moga.sampling.sample` over one
sequence of 360 latent frames of 30 x 52 tokens (1,440 frames at 24 fps, 832x480), cut into 12 shots of 30 latent
frames (5 s each), one umT5-shaped prompt per shot (512 x 4096). Random bf16 weights (a LoRA merged at load costs
nothing per step), routers calibrated as `moga patch` does (k-means, fusion lse, capacity 1, M = 20), the fastest
varlen backend importable there. Time: wall clock of the whole `sample` call after a warm-up sampling at 1/8 of the
tokens (kernels compiled, caches filled); per-step times from the sampler itself. Peak memory:
torch.cuda.max_memory_allocated over the sampling (weights included). `--decode-shot` also times the Wan VAE
(diffusers' AutoencoderKLWan with Wan2.1's config, random weights) decoding one 5-s shot, if diffusers imports;
a minute is 12 such shots (decoding is per shot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import FRAME, WAN_CONFIGS, build_random_model  # noqa: E402
from dit import calibrate  # noqa: E402

from moga.attention import MoGAConfig  # noqa: E402
from moga.attention.kernels import resolve_backend  # noqa: E402
from moga.sampling import sample  # noqa: E402

TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)


def run_sampling(model, moga, shots, frame, steps, cfg, shift, text_len, device, seed=0):
    cfg_model = model.config
    g = torch.Generator(device="cpu").manual_seed(seed)
    positive = [(torch.randn(1, text_len, cfg_model.text_dim, generator=g) * 0.1).to(device) for _ in shots]
    negative = (torch.randn(1, text_len, cfg_model.text_dim, generator=g) * 0.1).to(device) if cfg != 1 else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = sample(model, positive, negative, shot_frames=shots, latent_size=(sum(shots), frame[0] * 2, frame[1] * 2),
                 steps=steps, cfg=cfg, shift=shift, solver="euler", seed=seed, moga=moga, device=device,
                 return_result=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if not torch.isfinite(res.latent).all():
        raise RuntimeError("non-finite latent")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(tokens=sum(shots) * frame[0] * frame[1], latent_frames=sum(shots), shots=list(shots), steps=steps,
                cfg=cfg, shift=shift, sampling_s=wall, step_s=list(res.step_seconds), peak_gib=peak)


def time_decode(device, latent_frames, frame):
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # an optional measurement
        return dict(skipped=f"diffusers not importable: {type(e).__name__}: {e}")
    vae = AutoencoderKLWan().to(device=device, dtype=torch.bfloat16).eval()
    z = torch.randn(1, 16, latent_frames, frame[0] * 2, frame[1] * 2, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        vae.decode(z[:, :, :2]).sample  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = vae.decode(z).sample
        torch.cuda.synchronize()
    return dict(latent_frames=latent_frames, frames=int(out.shape[2]), decode_s=time.perf_counter() - t0,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=12)
    ap.add_argument("--shot-frames", type=int, default=30, help="latent frames per shot (30 = 117 frames = ~5 s)")
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--capacity", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--decode-shot", action="store_true", help="also time the Wan VAE decoding one shot")
    ap.add_argument("--json", default="benchmarks/results/minute.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec, frame, text_len = (TINY, (4, 6), 8) if args.smoke else (WAN_CONFIGS["14B"], FRAME, args.text_len)
    shots = [args.shot_frames] * args.shots
    started = time.perf_counter()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype), varlen_backend=resolve_backend("auto", device, dtype),
                model="tiny" if args.smoke else "14B", groups=args.groups, capacity=args.capacity,
                command=" ".join(sys.argv))
    print(f"# {info['device']}, torch {torch.__version__}, varlen {info['varlen_backend']}", flush=True)
    model = build_random_model(spec, args.groups, device, dtype)
    t0 = time.perf_counter()
    calibrate(model, args.groups, frame)
    info["calibrate_s"] = time.perf_counter() - t0
    moga = MoGAConfig(num_groups=args.groups, window=(0, 2, 2), fusion="lse", capacity=args.capacity)
    warm = [max(1, args.shot_frames // 8)] * max(1, args.shots // 4)
    run_sampling(model, moga, warm, frame, 1, args.cfg, args.shift, text_len, device)
    r = run_sampling(model, moga, shots, frame, args.steps, args.cfg, args.shift, text_len, device)
    info["sampling"] = r
    print(f"sampling: {r['tokens']:,} tokens, {args.steps} steps, cfg {args.cfg}: {r['sampling_s']:.1f} s "
          f"(steps {', '.join(f'{s:.1f}' for s in r['step_s'])} s), peak {r['peak_gib']:.1f} GiB", flush=True)
    if args.decode_shot and device.type == "cuda":
        del model
        torch.cuda.empty_cache()
        info["decode"] = time_decode(device, args.shot_frames, frame)
        print(f"decode: {info['decode']}", flush=True)
    info["wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(info, fh, indent=1)
    d = info.get("decode", {})
    print("\n| what | tokens | steps x passes | time (s) | peak (GiB) |")
    print("|---|---|---|---|---|")
    passes = 1 if args.cfg == 1 else 2
    print(f"| whole sampling | {r['tokens']:,} | {args.steps} x {passes} | {r['sampling_s']:.1f} | {r['peak_gib']:.1f} |")
    if "decode_s" in d:
        print(f"| decode one shot ({d['frames']} frames) | - | - | {d['decode_s']:.1f} | {d['peak_gib']:.1f} |")
        print(f"| decode {args.shots} shots (12 x one shot) | - | - | {d['decode_s'] * args.shots:.1f} | - |")


if __name__ == "__main__":
    main()
