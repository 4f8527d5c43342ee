"""Training step of `moga train wan` on one GPU: routers-only, LoRA, full fine-tune. Table + JSON.

    python benchmarks/train.py                    # CUDA: Wan2.1 1.3B config, 62,400 tokens
    python benchmarks/train.py --smoke            # a tiny config on the CPU: every code path, seconds

What is timed is `WanTrainer.train_step` exactly as `moga train wan` runs it: a clip of 62,400 tokens
(480p latent frames of 30 x 52 tokens, 40 latent frames in 4 shots of 10 = the paper's 10-s clip),
random timestep and noise, forward + backward with gradient checkpointing per block, the
group-balancing loss, gradient clipping and an AdamW step. Weights: the 1.3B config with random bf16
values (no checkpoint is read); routers in every layer (M = 5, 2x2 window, mean fusion), calibrated by
k-means as `moga patch` does (random rows on a random model give very unbalanced groups). Trained
weights are float32 masters, the rest bf16; compute in bf16. Per mode: a fresh model, one warm-up step,
then the median of --steps timed steps (synchronised wall clock). Peak memory:
torch.cuda.max_memory_allocated from the model's creation on (weights, AdamW moments included).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moga.attention.kernels import resolve_backend  # noqa: E402
from moga.model import WanConfig, WanModel  # noqa: E402
from moga.testing import init_random_  # noqa: E402
from moga.train.data import Sample  # noqa: E402
from moga.train.wan import TrainSettings, WanTrainer  # noqa: E402

CONFIGS = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
}


class SyntheticClip:
    """One random clip in the shape `ShardDataset` gives (latent [C, F, h, w], per-shot text)."""

    def __init__(self, cfg: WanConfig, frames: int, shots: int, height: int, width: int, text_tokens: int = 64):
        g = torch.Generator().manual_seed(0)
        self.latent = torch.randn(cfg.in_dim, frames, height * 2, width * 2, generator=g)
        self.texts = [torch.randn(1, text_tokens, cfg.text_dim, generator=g) for _ in range(shots)]
        self.shot_frames = tuple([frames // shots] * (shots - 1) + [frames - (frames // shots) * (shots - 1)])
        self.tokens = frames * height * width
        self.settings = {"latent_channels": cfg.in_dim, "text_dim": cfg.text_dim}
        self.samples = [{"name": "synthetic", "latent_shape": list(self.latent.shape)}]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return Sample("synthetic", self.latent, self.texts, self.shot_frames, self.tokens)


def build(cfg: WanConfig, device, seed=0) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to_empty(device=device)
    init_random_(model, seed)
    for n, p in model.named_parameters():
        if not n.endswith("router.weight"):
            p.data = p.data.to(torch.bfloat16)
    model.compute_dtype = torch.bfloat16
    return model.eval().requires_grad_(False)


def measure(mode: str, cfg: WanConfig, clip: SyntheticClip, device, steps: int, out_dir: str, lora_rank: int):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build(cfg, device)
    settings = TrainSettings(mode=mode, steps=steps + 1, dtype="bfloat16", routers="calibrate",
                             num_groups=cfg.num_groups, lora_rank=lora_rank, save_every=0)
    tr = WanTrainer(model, clip, settings, os.path.join(out_dir, mode), log=None, progress=False)
    setup_s = time.perf_counter() - t0
    warm = tr.train_step()
    times, stats = [], []
    for _ in range(steps):
        st = tr.train_step()
        times.append(st.seconds)
        stats.append(st)
    n_train = sum(p.numel() for p in tr.trainable.values())
    row = dict(mode=mode, tokens=clip.tokens, s_per_step=statistics.median(times), times=times,
               warmup_s=warm.seconds, setup_s=setup_s, tokens_per_s=clip.tokens / statistics.median(times),
               trained_params=n_train, loss=[s.loss for s in [warm] + stats],
               group_ratio_max=max(stats[-1].group_ratio), group_ratio_mean=sum(stats[-1].group_ratio) / len(stats[-1].group_ratio))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del tr, model
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.3B", choices=sorted(CONFIGS))
    ap.add_argument("--modes", default="routers,lora,full")
    ap.add_argument("--frames", type=int, default=40, help="latent frames (40 x 30 x 52 = 62,400 tokens)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--frame-tokens", default="30x52", help="tokens of one latent frame (480p: 30x52)")
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny config, CPU, 2 latent frames of 4x4 tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.frames, args.shots, args.frame_tokens, args.steps = "tiny", 4, 2, "4x4", 1
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w = (int(x) for x in args.frame_tokens.split("x"))
    cfg = WanConfig(**CONFIGS[args.model], num_groups=args.groups,
                    moga_layers=tuple(range(CONFIGS[args.model]["num_layers"])))
    clip = SyntheticClip(cfg, args.frames, args.shots, h, w)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, date=datetime.date.today().isoformat(), python=platform.python_version(),
               backend=resolve_backend("auto", device, torch.bfloat16))
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            try:
                rows.append(measure(mode, cfg, clip, device, args.steps, tmp, args.lora_rank))
            except torch.cuda.OutOfMemoryError as e:
                rows.append(dict(mode=mode, tokens=clip.tokens, error=f"out of memory: {str(e).splitlines()[0]}"))
            except Exception as e:  # one failing mode must not lose the others' numbers
                import traceback
                traceback.print_exc()
                rows.append(dict(mode=mode, tokens=clip.tokens, error=f"{type(e).__name__}: {e}"))
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    result = dict(env=env, model=args.model, config=dict(CONFIGS[args.model], num_groups=args.groups),
                  frames=args.frames, shots=args.shots, frame_tokens=[h, w], lora_rank=args.lora_rank, rows=rows)
    print(f"\n{args.model} config, {clip.tokens:,} tokens ({args.frames} latent frames of {h}x{w}, {args.shots} shots), "
          f"{env['device']}, torch {env['torch']}, varlen backend {env['backend']}")
    print("| mode | trained params | s/step | tokens/s | peak GiB | max/mean group size |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | - | {r['error']} | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(f"| {r['mode']} | {r['trained_params'] / 1e6:,.1f} M | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{peak} | {r['group_ratio_max']:.2f} |")
    path = args.json or (os.path.join(os.environ["OUT"], "train.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
