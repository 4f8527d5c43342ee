"""Training step of `moga train wan`: routers-only, LoRA, full fine-tune, on one GPU or sequence
parallel over all torchrun ranks. Table + JSON.

    python benchmarks/train.py                    # CUDA: Wan2.1 1.3B config, 62,400 tokens, one GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/train.py --modes routers,lora,full,full-fsdp
                                                  # the same clip split over 2 GPUs (sequence parallel)
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

Under torchrun (WORLD_SIZE > 1) every rank joins the process group the way `moga train wan` does
(`moga.train.wan.init_distributed`: NCCL on CUDA, gloo on the CPU, every collective wait bounded by
--timeout) and the trainer runs with `sp` = the world size: one clip per step, split over all ranks by
the library's sequence-parallel exchange (`moga.train.sp.TrainExchange`), gradients averaged over the
ranks. A step's time is the slowest rank's; peak memory is the largest rank's. The extra mode
`full-fsdp` is the full fine-tune with `--fsdp` (`moga train wan --sp P --fsdp`: weights, gradients and
AdamW state sharded over the ranks); like that command it takes routers from the model, so they are
calibrated first exactly as `moga patch` does. Rank 0 prints and writes the JSON (after every mode,
so a later failure keeps the earlier rows). A mode that runs out of memory is reported and the next
one runs (when every rank fails at the same allocation, as equal shards do; a rank left waiting in a
collective ends the run after --timeout).
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
from moga.train.wan import TrainSettings, WanTrainer, add_routers, init_distributed, routed_layers  # noqa: E402

CONFIGS = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
}
MODES = ("routers", "lora", "full", "full-fsdp")   # full-fsdp: sequence parallel runs only


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


def calibrate_as_patch(model: WanModel, clip: SyntheticClip, num_groups: int, seed: int = 0) -> None:
    """Routers from k-means on the first clip, put into the model the way `moga patch` writes them (for
    `--fsdp`, which takes the checkpoint's routers). The same call the trainer's `--routers calibrate` makes."""
    from moga.checkpoint import calibrate_routers
    for i in routed_layers(model):
        model.blocks[i].self_attn.router = None
    model.config = model.config.replace(num_groups=0, moga_layers=())
    first = clip[0]
    weights = calibrate_routers(None, num_groups, range(len(model.blocks)), size=tuple(first.latent.shape[1:]),
                                steps=3, context=first.texts[0], seed=seed, model=model)
    add_routers(model, weights)


def measure(mode: str, cfg: WanConfig, clip: SyntheticClip, device, steps: int, out_dir: str, lora_rank: int,
            sp: int = 1):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_gib = torch.cuda.memory_allocated(device) / 2**30   # left over from earlier modes: ~0
    fsdp = mode == "full-fsdp"
    if fsdp and sp == 1:
        raise ValueError("full-fsdp shards over torchrun ranks: run it under torchrun with 2 or more processes")
    t0 = time.perf_counter()
    model = build(cfg, device)
    if fsdp:
        calibrate_as_patch(model, clip, cfg.num_groups)
    settings = TrainSettings(mode="full" if fsdp else mode, steps=steps + 1, dtype="bfloat16",
                             routers="checkpoint" if fsdp else "calibrate", num_groups=cfg.num_groups,
                             lora_rank=lora_rank, save_every=0, sp=sp, fsdp=fsdp)
    tr = WanTrainer(model, clip, settings, os.path.join(out_dir, mode), log=None, progress=False)
    setup_s = time.perf_counter() - t0
    warm = tr.train_step()
    times, stats = [], []
    for _ in range(steps):
        st = tr.train_step()
        times.append(st.seconds)
        stats.append(st)
    n_train = sum(p.numel() for p in tr.trainable.values())   # FSDP: DTensors count their whole shape
    row = dict(mode=mode, tokens=clip.tokens, s_per_step=statistics.median(times), times=times,
               warmup_s=warm.seconds, setup_s=setup_s, tokens_per_s=clip.tokens / statistics.median(times),
               trained_params=n_train, loss=[s.loss for s in [warm] + stats],
               group_ratio_max=max(stats[-1].group_ratio), group_ratio_mean=sum(stats[-1].group_ratio) / len(stats[-1].group_ratio))
    if sp > 1:
        row.update(sp=sp, fsdp=fsdp)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        row["start_gib"] = start_gib
    del tr, model
    return row


def run_mode(mode, cfg, clip, device, steps, out_dir, lora_rank, sp) -> dict:
    """One mode on this rank; never raises (an out-of-memory or any other failure becomes an error row)."""
    try:
        return measure(mode, cfg, clip, device, steps, out_dir, lora_rank, sp)
    except torch.cuda.OutOfMemoryError as e:
        return dict(mode=mode, tokens=clip.tokens, error=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # one failing mode must not lose the others' numbers
        import traceback
        traceback.print_exc()
        return dict(mode=mode, tokens=clip.tokens, error=f"{type(e).__name__}: {e}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def combine(rows: list[dict]) -> dict:
    """Rank 0's row from every rank's: the slowest rank per step (ranks wait for each other in the
    exchange, so they differ little), the largest peak memory; an error on any rank is the mode's."""
    bad = [(r, row) for r, row in enumerate(rows) if "error" in row]
    if bad:
        r, row = bad[0]
        return dict(mode=row["mode"], tokens=row["tokens"], error=f"rank {r}: {row['error']}")
    out = dict(rows[0])
    times = [max(col) for col in zip(*(row["times"] for row in rows))]
    out.update(times=times, s_per_step=statistics.median(times), tokens_per_s=out["tokens"] / statistics.median(times),
               times_per_rank=[row["times"] for row in rows], warmup_s=max(row["warmup_s"] for row in rows),
               setup_s=max(row["setup_s"] for row in rows))
    out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / len(rows)
    for key in ("peak_gib", "peak_reserved_gib", "start_gib"):
        if key in out:
            out[key + "_per_rank"] = [row[key] for row in rows]
            out[key] = max(out[key + "_per_rank"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.3B", choices=sorted(CONFIGS))
    ap.add_argument("--modes", default="routers,lora,full",
                    help=f"comma-separated, of {', '.join(MODES)} (full-fsdp: under torchrun only)")
    ap.add_argument("--frames", type=int, default=40, help="latent frames (40 x 30 x 52 = 62,400 tokens)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--frame-tokens", default="30x52", help="tokens of one latent frame (480p: 30x52)")
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--device", default=None, help="one process only (under torchrun: GPU LOCAL_RANK, or the CPU)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="torchrun: seconds any collective may wait before the run fails (default 300)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny config, CPU, 2 latent frames of 4x4 tokens")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(MODES)}")
    if args.smoke:
        args.model, args.frames, args.shots, args.frame_tokens, args.steps = "tiny", 4, 2, "4x4", 1
        args.device = args.device or "cpu"

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if "full-fsdp" in modes and not distributed:
        ap.error("full-fsdp shards over ranks: run it under torchrun with 2 or more processes")
    if distributed:
        if args.device is not None and not args.smoke:
            ap.error("--device is for one process: under torchrun each rank takes GPU LOCAL_RANK (or the CPU)")
        if args.smoke:      # the CPU even where there are GPUs: gloo
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        init_distributed(timeout_s=args.timeout)
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        rank, world = 0, 1
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main_rank = rank == 0
    sp = world
    try:
        return _run(args, modes, device, rank, world, sp, main_rank, distributed)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _run(args, modes, device, rank, world, sp, main_rank, distributed) -> int:
    h, w = (int(x) for x in args.frame_tokens.split("x"))
    cfg = WanConfig(**CONFIGS[args.model], num_groups=args.groups,
                    moga_layers=tuple(range(CONFIGS[args.model]["num_layers"])))
    clip = SyntheticClip(cfg, args.frames, args.shots, h, w)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, date=datetime.date.today().isoformat(), python=platform.python_version(),
               backend=resolve_backend("auto", device, torch.bfloat16), world_size=world, sp=sp)
    if distributed:
        env["process_group"] = torch.distributed.get_backend()
        if device.type == "cuda":
            env["gpus"] = world
            try:
                env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
            except Exception:  # noqa: BLE001 - informational only
                pass
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    result = dict(env=env, model=args.model, config=dict(CONFIGS[args.model], num_groups=args.groups),
                  frames=args.frames, shots=args.shots, frame_tokens=[h, w], lora_rank=args.lora_rank,
                  world_size=world, sp=sp, rows=[])
    path = args.json or (os.path.join(os.environ["OUT"], f"train{'-sp' + str(sp) if sp > 1 else ''}.json")
                         if os.environ.get("OUT") else None)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            row = run_mode(mode, cfg, clip, device, args.steps, tmp, args.lora_rank, sp)
            if distributed:
                rows = [None] * world
                torch.distributed.all_gather_object(rows, row)   # bounded by the group's timeout
                row = combine(rows)
            if not main_rank:
                continue
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if path:
                _write(path, result)
    if not main_rank:
        return 0
    par = f", sequence parallel over {world} ranks ({env['process_group']})" if distributed else ""
    print(f"\n{args.model} config, {clip.tokens:,} tokens ({args.frames} latent frames of {h}x{w}, {args.shots} shots), "
          f"{env['device']}{par}, torch {env['torch']}, varlen backend {env['backend']}")
    peak = "peak GiB" + (" (max over ranks)" if distributed else "")
    print(f"| mode | trained params | s/step | tokens/s | {peak} | max/mean group size |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['mode']} | - | {r['error']} | | | |")
            continue
        pk = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(f"| {r['mode']} | {r['trained_params'] / 1e6:,.1f} M | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{pk} | {r['group_ratio_max']:.2f} |")
    if path:
        print(f"wrote {path}")
    return 0


def _write(path: str, result: dict) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
