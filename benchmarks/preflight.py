"""The preflight's memory estimate against the measured peak of one sampling step on a GPU.

    python3 benchmarks/preflight.py --models 1.3B,14B --tokens 32760,131040,262080 --modes dense,moga --fused 0,1

For each row: a random-weight Wan2.1 DiT (bf16, routers in every layer), one model call at that length
under inference mode, `torch.cuda.max_memory_allocated` after a reset, and `moga.preflight.estimate_memory`
for the same run (weights, the largest block phase, chunk workspaces, head, sampler latents). Prints a
table and writes JSON (device named) to benchmarks/results/preflight-<device>.json. A row that runs out
of memory is recorded as such (that is the preflight's job to predict).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WAN_CONFIGS, build_random_model, layout_for  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="1.3B,14B")
    p.add_argument("--tokens", default="32760,131040,262080")
    p.add_argument("--modes", default="dense,moga")
    p.add_argument("--fused", default="0,1", help="moga.fused off/on (0,1)")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/preflight.py measures a GPU: no CUDA device here")
    from moga import fused
    from moga.attention import MoGAConfig
    from moga.preflight import estimate_memory, model_bytes

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    rows, t0 = [], time.perf_counter()
    for model_name in args.models.split(","):
        model = build_random_model(WAN_CONFIGS[model_name], args.groups, dev, torch.bfloat16)
        weights = model_bytes(model)
        for tokens in (int(t) for t in args.tokens.split(",")):
            frames, shots = layout_for(tokens)
            n = frames * 30 * 52
            for mode in args.modes.split(","):
                for fz in (bool(int(f)) for f in args.fused.split(",")):
                    fused.FUSED = fz
                    cfg = MoGAConfig(num_groups=args.groups, dense=mode == "dense")
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(1, 16, frames, 60, 104, generator=g).to(dev)
                    ctx = [torch.randn(1, 512, 4096, generator=g).to(dev, torch.bfloat16) for _ in shots]
                    t = torch.tensor([900.0], device=dev)
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        with torch.inference_mode():
                            model(x, t, ctx, shot_frames=shots, moga=cfg)
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() / 2**30
                    except torch.cuda.OutOfMemoryError:
                        peak = None
                    del x, ctx
                    est = estimate_memory(model.config, n, frames, device_type="cuda", dtype=torch.bfloat16,
                                          weight_bytes=weights, moga=mode != "dense", fused_elementwise=fz)
                    # one model call: the sampler's latents are not there; compare without them
                    est_gib = (est.per_device - est.latent) / 2**30
                    rows.append(dict(model=model_name, tokens=n, mode=mode, fused=fz, peak_gib=peak,
                                     estimate_gib=est_gib, ratio=None if peak is None else est_gib / peak))
                    measured = "   OOM" if peak is None else f"{peak:6.1f}"
                    ratio = "-" if peak is None else f"{est_gib / peak:.3f}"
                    print(f"{model_name:5s} {n:8,d} {mode:5s} fused={int(fz)} peak {measured} GiB  "
                          f"estimate {est_gib:6.1f} GiB  ratio {ratio}", flush=True)
        del model
        torch.cuda.empty_cache()
    out = Path(args.out or Path(__file__).resolve().parent / "results" /
               f"preflight-{name.replace(' ', '-').lower()}.json")
    out.write_text(json.dumps(dict(device=name, torch=torch.__version__, command=" ".join(sys.argv),
                                   wall_s=time.perf_counter() - t0, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
