"""`torchrun ... -m moga generate ...`: sequence-parallel generation, one process per GPU, any number
of machines (torchrun's rendezvous sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Every rank reads the same checkpoint, encodes the same prompts and runs the whole sampler on the full
latent with the Ulysses exchange (the transformer blocks only see its 1/P of the tokens); rank 0
decodes and writes the video. `moga.cli.cmd_generate` calls `run_distributed_generate` when
WORLD_SIZE > 1. See docs/parallel.md for the commands.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

DEFAULT_TIMEOUT_S = 3600  # a collective may wait this long (rank 0 loading or a long first step)


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except KeyError as e:
        raise ValueError(f"{e.args[0]} is not set: start this with torchrun (see docs/parallel.md)") from None


def init_from_env(device=None, timeout_s: float | None = None):
    """Join torchrun's group: NCCL on CUDA (GPU LOCAL_RANK), gloo on the CPU. Returns (exchange, device)."""
    import torch
    import torch.distributed as dist

    from .group import NVLS_OFF
    from .ulysses import UlyssesExchange

    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)
    rank, world, local = env_ranks()
    if device is None or str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            if device is not None:
                raise ValueError(f"--device {device} asked for but CUDA is not available: use --device cpu")
            device = "cpu"
        else:
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs: "
                                 f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
            device = f"cuda:{local}"  # one GPU per local rank, whatever --device named
    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("MOGA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    kwargs = dict(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if not dist.is_initialized():
        dist.init_process_group(**kwargs)
    return UlyssesExchange(), device


def run_distributed_generate(args) -> int:
    """`moga generate` under torchrun. Checks the request on every rank before any collective (so a
    bad flag is one clear error, not a hang), then samples with the exchange; rank 0 writes."""
    from moga import cli
    from moga.cli import CliError

    width, height = cli.parse_size(args.size)
    plan = cli.load_plan(args)
    cli._check_exists(args.model, "model checkpoint")
    cli._check_exists(args.text_encoder, "text encoder")
    cli._check_exists(args.vae, "VAE")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.dense_steps is not None and not 0.0 <= args.dense_steps <= 1.0:
        raise CliError(f"--dense-steps is a fraction of the steps in [0, 1], got {args.dense_steps}")

    import torch
    import torch.distributed as dist

    from moga import checkpoint as ckpt
    from moga.sampling import DEFAULT_CFG, DEFAULT_SHIFT, DEFAULT_SOLVER, DEFAULT_STEPS, sample

    from .ulysses import check_heads

    rank, world, _ = env_ranks()
    info = ckpt.inspect_checkpoint(args.model)
    num_heads = info.config.get("num_heads") if isinstance(info.config, dict) else None
    if num_heads:
        check_heads(int(num_heads), world)
    moga = cli.moga_settings(args, info)
    dense_layers = ckpt.parse_layers(args.dense_layers) if args.dense_layers else ()
    if any(i >= info.config["num_layers"] for i in dense_layers):
        raise CliError(f"--dense-layers {args.dense_layers}: the model has {info.config['num_layers']} layers")
    exchange, device = init_from_env(None if args.device in (None, "cuda") else args.device)
    try:
        _, dtype = cli.resolve_device_dtype(str(device), args.dtype)
        lead = rank == 0
        say = (lambda *a: print(*a, file=sys.stderr)) if (lead and not args.quiet) else (lambda *a: None)
        if info.extras:
            cli._import_extras(info.extras)
        say(plan.describe())
        say(f"sequence parallel: {world} ranks ({exchange.backend}), this one on {device}")
        t_load = time.perf_counter()
        model = ckpt.load_model(args.model, device=device, dtype=dtype)
        check_heads(model.config.num_heads, world)
        te, vae, umt5 = cli.load_encoders(args, model, device, dtype)
        positive, negative = cli.encode_plan(te, plan, use_wan_negative=umt5)
        del te
        if not lead:
            vae = None  # only rank 0 decodes
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"loaded {info.architecture} in {time.perf_counter() - t_load:.1f} s")

        latent_size = plan.latent_size(width, height)
        shot_frames = plan.latent_shot_frames()
        layout = plan.token_layout(width, height)
        steps = args.steps or DEFAULT_STEPS
        dense_steps = getattr(model, "dense_warmup", 0.0) if args.dense_steps is None else args.dense_steps
        if model.config.num_groups == 0:
            dense_steps = 0.0
        bar = None
        if lead and not args.quiet:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"denoising on {world} ranks", unit="step", file=sys.stderr)

        def progress(step, total, latent):
            if bar is not None:
                bar.update(1)

        try:
            result = sample(model, positive, negative, shot_frames=shot_frames, latent_size=latent_size,
                            steps=steps, cfg=DEFAULT_CFG if args.cfg is None else args.cfg,
                            shift=DEFAULT_SHIFT if args.shift is None else args.shift,
                            solver=args.solver or DEFAULT_SOLVER, seed=args.seed, moga=moga,
                            dense_steps=dense_steps, dense_layers=dense_layers, callback=progress,
                            device=device, dtype=dtype, parallel=exchange, return_result=True)
        finally:
            if bar is not None:
                bar.close()
        if not lead:
            return 0
        from moga.video import video_to_frames, write_video
        from moga.wan_io import decode_shots

        t_dec = time.perf_counter()
        frames = video_to_frames(decode_shots(vae, result.latent, shot_frames))
        if frames.shape[0] != plan.total_frames or frames.shape[1:3] != (height, width):
            raise RuntimeError(f"the VAE returned {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}, "
                               f"the plan asks for {plan.total_frames} of {width}x{height}")
        out = write_video(args.out, frames, fps=plan.fps)
        if args.save_latent:
            from safetensors.torch import save_file
            save_file({"latent": result.latent.contiguous().cpu(),
                       "shot_frames": torch.tensor(shot_frames, dtype=torch.int64)}, args.save_latent,
                      metadata={"fps": str(plan.fps), "size": f"{width}x{height}", "world_size": str(world)})
        print(f"wrote {out}: {plan.num_shots} shots, {plan.total_frames} frames {width}x{height} at "
              f"{plan.fps:g} fps ({plan.seconds:.1f} s)")
        print(f"tokens {layout.num_tokens:,} over {world} ranks, {result.steps} steps at "
              f"{result.seconds_per_step:.2f} s/step, decode {time.perf_counter() - t_dec:.1f} s")
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
