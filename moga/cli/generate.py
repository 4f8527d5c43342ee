"""`moga generate`: check the request, load, sample every shot as one sequence, decode, write the
video and say what ran (one process, or one rank of a torchrun launch)."""
from __future__ import annotations

import os
import sys
import time

from .device import resolve_device_dtype
from .errors import CliError, check_exists
from .loading import encode_images, encode_plan, import_extras, load_dit, load_encoders, parse_shot_images
from .settings import checkpoint_defaults, load_plan, lora_list, moga_settings, parse_size, run_settings


def cmd_generate(args) -> int:
    """One process, or one rank of a torchrun launch (WORLD_SIZE > 1): every rank checks the request
    before any collective (a bad flag is one clear error, not a hang), reads the same checkpoint,
    encodes the same prompts and samples the full latent with the Ulysses exchange; rank 0 decodes
    and writes."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.size is not None:
        parse_size(args.size)
    shots_only = load_plan(args)  # the shot list's own errors first (no torch yet)
    check_exists(args.model, "model checkpoint")
    check_exists(args.model_low, "low-noise expert")
    check_exists(args.clip_vision, "CLIP vision encoder")
    images = parse_shot_images(args, shots_only.num_shots)
    check_exists(args.text_encoder, "text encoder")
    check_exists(args.vae, "VAE")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.dense_steps is not None and not 0.0 <= args.dense_steps <= 1.0:
        raise CliError(f"--dense-steps is a fraction of the steps in [0, 1], got {args.dense_steps}")
    _check_outputs(args)  # before any model is loaded: a bad --out must not cost the run

    import torch

    from .. import checkpoint as ckpt
    from ..outputs import save_safetensors
    from ..preflight import wants_block_progress
    from ..sampling import sample, sampler_settings
    from ..video import video_to_frames, write_video
    from ..wan_io import decode_shots

    found = (args.model, args.model_low) if args.model_low else ckpt.find_experts(args.model)
    info = ckpt.inspect_checkpoint(found[0] if found else args.model)
    loras = lora_list(args.lora)
    loras_low = lora_list(args.lora_low) if args.lora_low else None
    if loras_low is not None and not found:
        raise CliError("--lora-low is the low-noise expert's LoRA: it needs a Wan2.2 A14B pair (--model-low, "
                       "or a folder holding both experts)")
    defaults = checkpoint_defaults(info.metadata)
    run, from_ckpt = run_settings(args, defaults)
    width, height = parse_size(run["size"])
    plan = load_plan(args, fps=defaults.get("fps"), seconds=defaults.get("seconds"))
    moga = moga_settings(args, info)
    dense_layers = ckpt.parse_layers(args.dense_layers) if args.dense_layers else ()
    if any(i >= info.config["num_layers"] for i in dense_layers):
        raise CliError(f"--dense-layers {args.dense_layers}: the model has {info.config['num_layers']} layers "
                       f"(0..{info.config['num_layers'] - 1})")
    if not info.extras and not (args.text_encoder and args.vae):
        missing = " and ".join(n for n, v in (("--text-encoder DIR", args.text_encoder), ("--vae PATH", args.vae))
                               if not v)
        raise CliError(f"{args.model} brings no text encoder/VAE of its own: pass {missing} (Wan2.1's umT5 "
                       f"encoder folder with its tokenizer; the Wan VAE folder or .safetensors)")

    exchange, world, lead = None, 1, True
    if distributed:
        try:
            from ..parallel.launch import agree_on_error, env_ranks, init_from_env
            from ..parallel.ulysses import check_heads
        except ImportError as e:
            raise CliError(f"this is a torchrun launch (WORLD_SIZE={os.environ['WORLD_SIZE']}) but the "
                           f"sequence-parallel runtime moga.parallel is not available ({e}); run "
                           f"without torchrun for one device") from None
        rank, world, _ = env_ranks()
        num_heads = info.config.get("num_heads") if isinstance(info.config, dict) else None
        if num_heads:  # before joining the group: no rank waits on another
            on_gpu = args.device in (None, "cuda") or str(args.device).startswith("cuda")
            check_heads(int(num_heads), world, "GPUs" if on_gpu and torch.cuda.is_available() else "processes")
        exchange, device = init_from_env(None if args.device in (None, "cuda") else args.device)
        lead = rank == 0
        _, dtype = resolve_device_dtype(str(device), args.dtype)
    else:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    try:
        refused = None
        try:
            _preflight(info, plan.token_layout(width, height), device, dtype, world, moga,
                       experts=2 if (found and not args.offload_expert) else 1, cfg=args.cfg,
                       cfg_batch=args.cfg_batch)
        except ValueError as e:
            refused = e
        if exchange is not None:
            agree_on_error(refused)  # one rank short of memory stops every rank, none waits for it
        elif refused is not None:
            raise refused
        say = (lambda *a: print(*a, file=sys.stderr)) if (lead and not args.quiet) else (lambda *a: None)
        if info.extras:
            import_extras(info.extras)
        if from_ckpt:
            say(f"from the checkpoint's own settings: {', '.join(from_ckpt)} (flags override them)")
        say(plan.describe())
        if exchange is not None:
            say(f"sequence parallel: {world} ranks ({exchange.backend}), this one on {device}")
        t_load = time.perf_counter()
        model, experts = load_dit(args, device, dtype, loras, loras_low)
        net = model.high if experts else model   # the expert that answers config/encoder questions
        if getattr(args, "fp8_matmul", False):
            from ..fp8 import enable_fp8
            for each in ((model.high, model.low) if experts else (model,)):
                report = enable_fp8(each, device)
                if lead:  # said even with --quiet when it is off: the user asked for it
                    (say if report.enabled else (lambda *a: print(*a, file=sys.stderr)))(report.summary())
        if exchange is not None:
            check_heads(model.config.num_heads, world, "GPUs" if device.type == "cuda" else "processes")
        te, vae, umt5 = load_encoders(args, net, device, dtype)
        say(f"loaded {info.architecture} in {time.perf_counter() - t_load:.1f} s")

        positive, negative = encode_plan(te, plan, use_wan_negative=umt5)
        del te
        spatial = net.config.vae_spatial_ratio   # TI2V-5B: the Wan2.2 VAE's 16x16 pixels
        image = encode_images(args, net, vae, plan, images, width, height)
        if not lead:
            vae = None  # only rank 0 decodes
        latent_size = plan.latent_size(width, height, spatial_ratio=spatial)
        shot_frames = plan.latent_shot_frames()
        layout = plan.token_layout(width, height, spatial_ratio=spatial)
        if args.cfg_low is not None and not experts:
            raise CliError("--cfg-low is the low-noise expert's guidance: it needs a Wan2.2 A14B pair "
                           "(--model-low, or a folder holding both experts)")
        run = sampler_settings(model, run["steps"], run["cfg"], run["shift"], run["solver"], run["schedule"])
        if args.cfg_low is not None:
            run["cfg"] = (run["cfg"], args.cfg_low)
        steps = run["steps"]
        if args.dense_warmup_steps is not None and not 0 <= args.dense_warmup_steps <= steps:
            raise CliError(f"--dense-warmup-steps is a step count in 0..{steps}, got {args.dense_warmup_steps}")
        dense_steps = getattr(net, "dense_warmup", 0.0) if args.dense_steps is None else args.dense_steps
        warmup_steps = args.dense_warmup_steps
        if net.config.num_groups == 0:
            dense_steps, warmup_steps = 0.0, None  # no routers: every step is dense anyway

        bar = None
        if lead and not args.quiet:
            from tqdm import tqdm
            desc = "denoising" if exchange is None else f"denoising on {world} ranks"
            bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr)

        def progress(step, total, latent):
            if bar is not None:
                bar.update(1)

        block_progress = None
        if bar is not None and wants_block_progress(net.config, layout.num_tokens, device.type, world):
            def block_progress(step, done, total):  # long steps: say where inside the step
                bar.set_postfix_str(f"block {done}/{total}")

        probe = model.low if experts else model   # the last expert to run: its routing is the last step's
        _record_routing(probe, True)
        try:
            result = sample(model, positive, negative, shot_frames=shot_frames, latent_size=latent_size,
                            seed=args.seed, moga=None if experts else moga, dense_steps=dense_steps,
                            dense_warmup_steps=warmup_steps, dense_layers=dense_layers, callback=progress,
                            device=device, dtype=dtype, parallel=exchange, image=image,
                            cfg_batch=args.cfg_batch, return_result=True, block_callback=block_progress, **run)
        finally:
            if bar is not None:
                bar.close()
        m_eff = effective_groups(probe, moga.capacity, moga.capacity_split)
        run_groups = moga.num_groups if net.config.num_groups else 0
        _record_routing(probe, False)
        if not lead:
            return 0

        t_dec = time.perf_counter()
        dec_bar = None
        if not args.quiet:
            from tqdm import tqdm
            dec_bar = tqdm(total=len(shot_frames), desc="decoding", unit="shot", file=sys.stderr)
        try:
            frames = video_to_frames(decode_shots(vae, result.latent, shot_frames,
                                                  progress=dec_bar and (lambda done, n: dec_bar.update(1))))
        finally:
            if dec_bar is not None:
                dec_bar.close()
        if frames.shape[0] != plan.total_frames or frames.shape[1:3] != (height, width):
            raise RuntimeError(f"the VAE returned {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}, "
                               f"the plan asks for {plan.total_frames} of {width}x{height}")
        out = write_video(args.out, frames, fps=plan.fps)
        if args.save_latent:
            save_safetensors({"latent": result.latent.contiguous().cpu(),
                              "shot_frames": torch.tensor(shot_frames, dtype=torch.int64)}, args.save_latent,
                             metadata={"fps": str(plan.fps), "size": f"{width}x{height}", "world_size": str(world)})
        decode_s = time.perf_counter() - t_dec

        sparsity = "dense" if m_eff is None else f"{m_eff:.2f}" + _groups_note(run_groups, moga.capacity)
        ranks = "" if exchange is None else f" over {world} ranks"
        print(f"wrote {out}: {plan.num_shots} shots, {plan.total_frames} frames {width}x{height} at "
              f"{plan.fps:g} fps ({plan.seconds:.1f} s)")
        print(f"tokens {layout.num_tokens:,} ({layout.frames} latent frames x {layout.height}x{layout.width}){ranks}, "
              f"M_eff {sparsity}, {result.steps} steps at {result.seconds_per_step:.2f} s/step, "
              f"decode {decode_s:.1f} s")
        return 0
    finally:
        if exchange is not None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _check_outputs(args):
    from ..outputs import check_output
    overwrite = getattr(args, "overwrite", False)
    check_output(args.out, "video", overwrite, flag="--out")
    if args.save_latent:
        check_output(args.save_latent, "safetensors", overwrite, flag="--save-latent")
        if os.path.abspath(args.save_latent) == os.path.abspath(args.out):
            raise CliError("--save-latent and --out name the same file: give the latent its own .safetensors")


def _preflight(info, layout, device, dtype, world: int, moga, experts: int = 1, cfg=None, cfg_batch=None):
    """Refuse, before any weight is read, a run past the hard limits or beyond the device's free
    memory (moga.preflight; the message holds the estimate and the fix). experts: expert models held
    on the device at once (an A14B pair without --offload-expert: 2)."""
    from ..preflight import PreflightError, available_bytes, guidance_batch, preflight, weight_bytes
    available = available_bytes(device)
    if available is not None and device.type == "cpu":
        available //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # ranks of one host share its RAM
    try:
        return preflight(info.config, layout, device=device, dtype=dtype,
                         weight_bytes=experts * weight_bytes(info, dtype), world_size=world,
                         moga=bool(info.moga) and not moga.dense, available=available,
                         batch=guidance_batch(device.type, layout.num_tokens, world, cfg, cfg_batch))
    except PreflightError as e:
        if experts > 1 and "Fix:" in str(e):
            raise PreflightError(f"{e}; or --offload-expert (one expert on the device at a time)") from None
        raise


def effective_groups(model, capacity: float | None = None, split: str = "runs") -> float | None:
    """M_eff = N^2 / sum |g|^2 of the routed branch, averaged over the MoGA layers' last call
    (with a group capacity, over the capped groups the layer attended in)."""
    from ..attention.router import cap_routing
    vals = []
    for m in model.modules():
        routing = getattr(m, "last_routing", None)
        if routing is None:
            continue
        ids = cap_routing(routing, capacity, split).group_ids.reshape(-1)
        counts = ids.bincount().double()
        vals.append(float(ids.numel() ** 2 / (counts ** 2).sum()))
    return sum(vals) / len(vals) if vals else None


def _record_routing(model, on: bool):
    for m in model.modules():
        if hasattr(m, "record_routing"):
            m.record_routing = on
            if not on:
                m.last_routing = None


def _groups_note(groups: int, capacity) -> str:
    """What M_eff is measured against: with a group capacity the over-full groups are cut into parts,
    each attended alone, so M_eff (the routed branch's dense-cost ratio) can exceed M."""
    if not groups:
        return ""
    return f" (M {groups}" + (f", capacity {capacity:g}: groups cut to size, so M_eff can exceed M)"
                              if capacity else ")")
