"""MoGA Sampler: MOGA_MODEL + MOGA_SHOTS -> LATENT (the whole multi-shot video denoised as one sequence)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .common import (CATEGORY, LATENT_FPS, LATENT_SHOT_FRAMES, MoGAModelHandle, MoGAShotsValue, MogaModel,
                     MogaShots, input_error)

NODE = "MoGA Sampler"
SOLVERS = ("unipc", "euler")  # moga.sampling.SOLVERS (tests keep them in step)
SCHEDULES = ("wan", "distill")  # moga.sampling.SCHEDULES
POOL_TIMEOUT_S = 24 * 3600.0   # a worker that says nothing for this long is treated as dead


def parse_gpus(text: str, visible: int) -> list[int]:
    """'auto' -> every visible GPU; '2' -> the first two; '0,2' or '1,' -> exactly those GPU indices."""
    t = (text or "").strip().lower().replace(" ", "")
    if t in ("", "auto"):
        return list(range(visible))
    fix = "write 'auto', a count like '2', or GPU indices like '0,2' (a single index: '1,')"
    if "," in t:
        try:
            ids = [int(p) for p in t.split(",") if p]
        except ValueError:
            raise input_error(NODE, "gpus", f"{text!r} is not a list of GPU indices", fix) from None
        if not ids or len(set(ids)) != len(ids):
            raise input_error(NODE, "gpus", f"{text!r} names no GPU or one twice", fix)
        bad = [i for i in ids if i < 0 or i >= visible]
        if bad:
            raise input_error(NODE, "gpus", f"GPU {bad[0]} is not visible ({visible} visible: 0-{visible - 1})"
                              if visible else f"GPU {bad[0]} asked but this machine shows no CUDA GPU",
                              "use the indices nvidia-smi lists, or 'auto'")
        return ids
    if not t.isdigit():
        raise input_error(NODE, "gpus", f"{text!r} is neither 'auto', a count nor a list", fix)
    n = int(t)
    if n < 1 or n > visible:
        raise input_error(NODE, "gpus", f"{n} GPUs asked but {visible} visible", "use 'auto' or a count from 1 to "
                          f"{visible}" if visible else "use 'auto' (this machine shows no CUDA GPU)")
    return list(range(n))


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pool_devices(ids) -> list[str]:
    return [f"cuda:{i}" for i in ids]


def _previewer(channels: int, device):
    """ComfyUI's latent-to-RGB preview for Wan's 16-channel latents; None where the host has none."""
    if channels != 16:
        return None
    try:
        import comfy.latent_formats
        import latent_preview
    except ImportError:
        return None
    try:
        return latent_preview.get_previewer(device, comfy.latent_formats.Wan21())
    except Exception as e:  # a preview is a nicety: never fail a run for it
        logging.debug("MoGA: no latent preview: %s", e)
        return None


def _check_fits(model: MoGAModelHandle, layout, device, workers_loaded: bool = False, cfg=None) -> None:
    """moga.preflight before any work is dispatched: a clear error (estimate and fix), not an OOM.
    `device`: one device, or the pool's list (each GPU holds the weights and 1/P of the tokens).
    An expert pair counts both experts' weights, or one with offload_expert; each expert is checked with
    its own MoGA config (one may run dense where the other routes)."""
    import torch
    from moga.preflight import PreflightError, available_bytes, guidance_batch, model_bytes, preflight_model

    net = model.model
    one = getattr(net, "high", net)
    experts = 2 if hasattr(net, "expert_for") and not net.offload else 1
    devices = device if isinstance(device, list) else [device]
    available = -1  # one device: preflight asks it (and counts weights already there as free)
    if len(devices) > 1:
        free = [available_bytes(d) for d in devices]
        available = None if None in free else min(free)
        if available is not None and workers_loaded:
            available += experts * model_bytes(one)  # the pool's workers already hold the weights
    try:
        batch = guidance_batch(torch.device(devices[0]).type, layout.num_tokens, len(devices), cfg)
        for _, expert, moga_config in model.experts():
            preflight_model(expert, layout, devices[0], world_size=len(devices), moga_config=moga_config,
                            available=available, batch=batch, experts=experts)
    except PreflightError as e:
        raise ValueError(f"{NODE}: {e}") from None


VAE_FILES = {16: "wan_2.1_vae.safetensors", 48: "wan2.2_vae.safetensors"}  # by latent channels


def _latent_format(channels: int):
    """Core's latent format of Wan's VAE latents with these channels (per-channel mean/std normalisation)."""
    import comfy.latent_formats as formats
    from moga.wan_config import WAN22_VAE_CHANNELS
    return formats.Wan22() if channels == WAN22_VAE_CHANNELS else formats.Wan21()


def _vae_file(channels: int) -> str:
    return VAE_FILES.get(channels, f"the VAE of {channels}-channel latents")


def _host_vae_encoder(vae, channels: int = 16):
    """ComfyUI's VAE as `moga.wan_image_io.encode_start_images` wants it: [1, 3, T, H, W] in -1..1 -> the model's
    (normalised) latent. The host's encode() takes [T, H, W, 3] in 0..1 and returns the raw latent; core's Wan
    model normalises it with the latent format of its channels (Wan21: 16, Wan22: TI2V-5B's 48), as done here."""
    fmt = _latent_format(channels)

    class Encoder:
        # core's VAE says its latent channels (16: Wan2.1 VAE, 48: Wan2.2 VAE); encode_start_images checks them
        z_dim = getattr(vae, "latent_channels", None)

        @staticmethod
        def encode(x):
            pixels = ((x[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
            return fmt.process_in(vae.encode(pixels).float().cpu())
    return Encoder()


def start_shots(text, images: int, num_shots: int) -> list[int]:
    """Shot indices (from 0) that the start_image batch's images start, in batch order, from 'start_image_shots'
    ("1" or "1,5": shots counted from 1), or a clear error."""
    text = (text or "1").strip() or "1"
    try:
        wanted = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise input_error(NODE, "start_image_shots", f"{text!r} is not a list of shot numbers",
                          "write the shots the images start, counted from 1, e.g. '1' or '1,5'") from None
    bad = [n for n in wanted if not 1 <= n <= num_shots]
    if bad:
        raise input_error(NODE, "start_image_shots", f"shots {bad} are not in the plan (it has shots 1..{num_shots})",
                          "name shots of the shot list")
    if len(set(wanted)) != len(wanted):
        raise input_error(NODE, "start_image_shots", f"{text!r} names a shot twice", "give each shot one image")
    if len(wanted) != images:
        raise input_error(NODE, "start_image_shots", f"{len(wanted)} shots ({text!r}) for {images} start images",
                          f"name one shot per image of the start_image batch ({images}), e.g. "
                          f"'{','.join(str(i + 1) for i in range(min(images, num_shots)))}'")
    return [n - 1 for n in wanted]


def image_condition_of(model, shots, latent_size, start_image, vae, clip_vision_output, width, height,
                       start_image_shots="1"):
    """The moga ImageCondition of the start images (None: text-to-video), or a clear error. start_image: a batch
    of images, image j starting shot start_image_shots[j] (default: one image, shot 1)."""
    config = getattr(model.model, "config", None)
    kind = getattr(config, "conditioning", "none")
    if start_image is None:
        if kind in ("concat", "clip+concat"):
            raise input_error(NODE, "start_image", f"{model.name} is an image-to-video model ({config.name}) and "
                              "got no start image", "connect a Load Image to 'start_image' (and a VAE Loader to "
                              "'vae'), or load a text-to-video model")
        if clip_vision_output is not None:
            raise input_error(NODE, "clip_vision_output", "is connected but start_image is not",
                              "connect the start image too, or disconnect clip_vision_output")
        return None
    if kind == "none":
        raise input_error(NODE, "start_image", f"{model.name} is a text-to-video model: it takes no start image",
                          "load an image-to-video checkpoint (Wan2.1 I2V, Wan2.2 I2V A14B), or disconnect it")
    channels = int(config.out_dim)
    if vae is None:
        raise input_error(NODE, "vae", "start_image needs a VAE to encode it", "connect a VAE Loader with "
                          f"{_vae_file(channels)} to 'vae'")
    have = getattr(vae, "latent_channels", None)
    if have is not None and int(have) != channels:  # e.g. the Wan2.1 VAE on TI2V-5B: its latents do not fit
        raise input_error(NODE, "vae", f"the VAE makes {int(have)}-channel latents but {config.name} samples "
                          f"{channels}-channel ones", f"connect a VAE Loader with {_vae_file(channels)} (the VAE "
                          "of this model) to 'vae'")
    clip = None
    if kind == "clip+concat":
        clip = getattr(clip_vision_output, "penultimate_hidden_states", None)
        if clip is None:
            raise input_error(NODE, "clip_vision_output", f"{config.name} also reads the image through CLIP "
                              "vision", "connect CLIP Vision Encode (clip_vision_h, crop none) of the start image")
    elif clip_vision_output is not None:
        raise input_error(NODE, "clip_vision_output", f"{config.name} has no CLIP image branch",
                          "disconnect clip_vision_output (only Wan2.1 I2V reads it)")
    import torch
    from moga.conditioning import image_condition
    from moga.wan_image_io import encode_start_images

    targets = start_shots(start_image_shots, int(start_image.shape[0]), shots.plan.num_shots)
    batch = start_image.float().movedim(-1, 1)[:, :3]  # [N, 3, h, w] in 0..1
    if tuple(batch.shape[-2:]) != (height, width):
        batch = torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False)
    pixels = {shot: batch[j] * 2 - 1 for j, shot in enumerate(targets)}
    if clip is not None:
        clip = clip.float().cpu()
        if clip.shape[0] == len(targets) > 1:  # CLIP Vision Encode of the same batch: each shot its own image's
            clip = {shot: clip[j:j + 1] for j, shot in enumerate(targets)}
        elif clip.shape[0] != 1:
            raise input_error(NODE, "clip_vision_output", f"{clip.shape[0]} CLIP images for {len(targets)} start "
                              "images", "encode the start_image batch itself (CLIP Vision Encode), or one image")
    try:
        latents, fill = encode_start_images(_host_vae_encoder(vae, channels), config, shots.plan.shot_frames,
                                            pixels)
        return image_condition(config, shots.plan.latent_shot_frames(), latent_size, latents, clip=clip, fill=fill)
    except ValueError as e:
        raise input_error(NODE, "vae", f"the start image could not condition {config.name}: {e}",
                          f"use this model's VAE ({_vae_file(channels)})") from e


def _to_vae_space(latent, channels: int):
    """The DiT samples Wan's normalised latents ((z - mean) / std per channel); core's Wan VAE decodes raw ones, so
    core's samplers apply the latent format's process_out (KSampler's process_latent_out). Doing the same here means
    MoGA Decode with the host's VAE, core's VAE Decode and the patch path's KSampler output all see one LATENT."""
    return _latent_format(channels).process_out(latent)


class MoGASampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGASampler",
            display_name=NODE,
            category=CATEGORY,
            description="Denoises all shots as one sequence with MoGA attention (flow matching, Wan2.1 schedule). "
                        "Outputs a standard LATENT that remembers where each shot begins. Cancel works within one "
                        "step; with several GPUs the sequence is split across them.",
            inputs=[
                MogaModel.Input("model", tooltip="From MoGA Model Loader or MoGA Attention Settings."),
                MogaShots.Input("shots", tooltip="From MoGA Shot Prompts: the shots, their lengths and prompts."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Video width in pixels, a multiple of 16 (Wan2.1 480p: 832); TI2V-5B: of 32 "
                                     "(720p: 1280)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Video height in pixels, a multiple of 16 (Wan2.1 480p: 480); TI2V-5B: of 32 "
                                     "(720p: 704)."),
                io.Int.Input("steps", default=30, min=1, max=1000,
                             tooltip="Denoising steps. Cost grows linearly; Wan2.1 uses 50, 20-30 is usually enough."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance strength. 1 skips the negative pass (twice as fast); Wan2.1: 5."),
                io.Float.Input("shift", default=5.0, min=0.1, max=30.0, step=0.1, round=0.01,
                               tooltip="Schedule shift: higher spends more steps at high noise (overall layout). "
                                       "Wan2.1: 5."),
                io.Combo.Input("solver", options=list(SOLVERS), default="unipc",
                               tooltip="unipc: Wan2.1's solver, good in few steps. euler: simplest."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise of the whole video comes from this seed (the same on any device and "
                                     "GPU count)."),
                io.String.Input("gpus", default="auto",
                                tooltip="'auto': every visible GPU (this machine's ComfyUI device if none); a count "
                                        "like '2'; or GPU indices like '0,2' ('1,' for GPU 1 alone). More than one GPU "
                                        "splits the sequence across them (persistent workers)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="wan", optional=True,
                               tooltip="wan: Wan's schedule. distill: the few-step schedule of step-distill LoRAs "
                                       "(LightX2V-style: 4-8 steps, cfg 1, euler)."),
                io.Image.Input("start_image", optional=True,
                               tooltip="Image-to-video models (Wan2.1 I2V, Wan2.2 I2V A14B, TI2V-5B): the first "
                                       "frame of shot 1 (resized to width x height). Needs 'vae'. A batch of "
                                       "images starts the shots named in start_image_shots."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE that encodes start_image (VAE Loader with wan_2.1_vae for Wan2.1 I2V "
                                     "and Wan2.2 I2V A14B, wan2.2_vae for TI2V-5B's 48-channel latents)."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="Wan2.1 I2V: CLIP Vision Encode of the start image "
                                                  "(clip_vision_h)."),
                io.Float.Input("cfg_low", default=-1.0, min=-1.0, max=30.0, step=0.1, round=0.01, optional=True,
                               tooltip="Wan2.2 A14B: guidance of the low-noise expert's steps; -1: the same as "
                                       "cfg (Wan2.2 T2V uses 4.0 high, 3.0 low)."),
                io.String.Input("start_image_shots", default="1", optional=True,
                                tooltip="Which shots the start_image batch's images start, counted from 1, in "
                                        "batch order: '1' (one image, shot 1), '1,5' (a second image, e.g. a "
                                        "character sheet, starts shot 5). Shots without one continue the story."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, shots, width=832, height=480, steps=30, cfg=5.0, shift=5.0, solver="unipc", seed=0,
                gpus="auto", schedule="wan", start_image=None, vae=None, clip_vision_output=None,
                cfg_low=-1.0, start_image_shots="1") -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        if not isinstance(model, MoGAModelHandle):
            raise input_error(NODE, "model", "is not a MoGA model", "connect MoGA Model Loader (or Attention Settings)")
        if not isinstance(shots, MoGAShotsValue):
            raise input_error(NODE, "shots", "is not a shot list", "connect the output of MoGA Shot Prompts")
        if solver not in SOLVERS:
            raise input_error(NODE, "solver", f"unknown solver {solver!r}", f"pick one of {', '.join(SOLVERS)}")
        if not isinstance(steps, int) or steps < 1:
            raise input_error(NODE, "steps", f"{steps!r} steps", "use at least 1 step")
        if not cfg >= 1.0:
            raise input_error(NODE, "cfg", f"{cfg} is below 1", "use 1 (no guidance) or more")
        if not shift > 0:
            raise input_error(NODE, "shift", f"{shift} is not positive", "use a shift > 0 (Wan2.1: 5)")
        pair = hasattr(getattr(model, "model", None), "expert_for")
        cfg_low = -1.0 if cfg_low is None else float(cfg_low)
        if cfg_low != -1.0:
            if not pair:
                raise input_error(NODE, "cfg_low", f"{cfg_low} is the low-noise expert's guidance but "
                                  f"{getattr(model, 'name', 'the model')} is one model", "set it to -1, or load a "
                                  "Wan2.2 A14B pair (MoGA Model Loader's low_noise_model)")
            if not cfg_low >= 1.0:
                raise input_error(NODE, "cfg_low", f"{cfg_low} is below 1", "use -1 (the same as cfg), 1 (no "
                                  "guidance) or more")
        guidance = (float(cfg), cfg_low) if cfg_low != -1.0 else float(cfg)
        schedule = schedule or "wan"
        if schedule not in SCHEDULES:
            raise input_error(NODE, "schedule", f"unknown schedule {schedule!r}", f"pick one of {', '.join(SCHEDULES)}")
        plan = shots.plan
        net_config = getattr(model.model, "config", None)
        # TI2V-5B's Wan2.2 VAE: 16x16 pixels a latent pixel, so sizes are multiples of 32 (the CLI does the same)
        from moga.wan_config import vae_spatial_ratio
        spatial = vae_spatial_ratio(getattr(net_config, "out_dim", 16))
        try:
            latent_size = plan.latent_size(int(width), int(height), spatial_ratio=spatial)
        except ValueError as e:
            raise input_error(NODE, "width" if int(width) % (2 * spatial) else "height", str(e),
                              "use multiples of 32, e.g. 1280 x 704 (TI2V-5B)" if spatial == 16 else
                              "use multiples of 16, e.g. 832 x 480") from e
        shot_frames = plan.latent_shot_frames()
        devices = parse_gpus(gpus, _visible_gpus())
        image = image_condition_of(model, shots, latent_size, start_image, vae, clip_vision_output,
                                   int(width), int(height), start_image_shots)

        from moga.preflight import wants_block_progress

        layout = plan.token_layout(int(width), int(height), spatial_ratio=spatial)
        # long steps on one device: the bar moves block by block (the pool reports whole steps)
        blocks = len(getattr(model.model, "blocks", ())) if (
            len(devices) <= 1 and net_config is not None and
            wants_block_progress(net_config, layout.num_tokens, mm.get_torch_device().type)) else 0
        per_step = blocks or 1  # ticks per step
        pbar = comfy.utils.ProgressBar(steps * per_step)
        channels = int(getattr(getattr(model.model, "config", None), "in_dim", 16))
        # Wan's latent-to-RGB factors only mean something for Wan's VAE latents, not a model's own codec
        previewer = None if model.vae is not None else _previewer(channels, mm.get_torch_device())

        def on_step(step, total, latent):
            preview = None
            if previewer is not None and latent is not None:
                try:
                    preview = previewer.decode_latent_to_preview_image("JPEG", latent)
                except Exception as e:  # never fail a run for a preview
                    logging.debug("MoGA: preview failed: %s", e)
            pbar.update_absolute(step * per_step, total * per_step, preview)

        def on_block(step, done, total):  # done of total blocks in this step's model calls
            pbar.update_absolute((step - 1) * per_step + -(-done * per_step // total), steps * per_step)

        # the start image is encoded here, in the host: the pool's workers get its tensors, never a VAE
        common = dict(shot_frames=shot_frames, latent_size=latent_size, steps=steps, cfg=guidance,
                      shift=float(shift), solver=solver, seed=int(seed), moga=model.run_moga,
                      dense_steps=model.dense_warmup, dense_layers=model.dense_layers, schedule=schedule,
                      image=image)
        if len(devices) > 1:
            latent = cls._run_pool(devices, model, shots, common, on_step, mm, previewer is not None, layout)
        else:
            device = mm.get_torch_device() if not devices or gpus.strip().lower() in ("auto", "", "1") \
                else f"cuda:{devices[0]}"
            latent = cls._run_here(device, model, shots, common, on_step, mm, layout,
                                   on_block if blocks else None)
        if model.vae is None:  # Wan's VAE latents: hand them on in the VAE's own space, as core's samplers do
            latent = _to_vae_space(latent, int(getattr(net_config, "out_dim", 16)))
        out = {"samples": latent.to(mm.intermediate_device(), dtype=latent.dtype),
               LATENT_SHOT_FRAMES: list(shot_frames), LATENT_FPS: float(plan.fps)}
        return io.NodeOutput(out)

    @staticmethod
    def _run_here(device, model, shots, common, on_step, mm, layout, on_block=None):
        import torch
        from moga.sampling import Cancelled, sample

        device = torch.device(device)
        if device.type != "cpu":
            # the MoGA model is not managed by ComfyUI: make room for it first
            mm.unload_all_models()
            mm.soft_empty_cache()
        net = model.model
        _check_fits(model, layout, device, cfg=common["cfg"])
        try:
            net.to(device)
            with torch.inference_mode():
                return sample(net, shots.positive, shots.negative, device=device, dtype=model.dtype,
                              callback=on_step, cancel=mm.processing_interrupted, block_callback=on_block,
                              **common)
        except Cancelled:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
        finally:
            if device.type != "cpu":
                net.to(mm.unet_offload_device())
                mm.soft_empty_cache()

    @staticmethod
    def _run_pool(devices, model, shots, common, on_step, mm, preview, layout):
        from moga.sampling import Cancelled

        from moga.parallel.pool import get_pool, settings_of

        # one persistent pool per process: workers keep the model loaded while devices and files stay the same;
        # they load what the loader loaded (the file, a pair's two files, the LoRAs merged into each)
        try:
            checkpoint, settings = settings_of(model.model, dtype=model.dtype)
        except ValueError as e:
            raise input_error(NODE, "gpus", str(e), "use one GPU for this model") from e
        pool = get_pool(_pool_devices(devices), checkpoint, settings)
        _check_fits(model, layout, _pool_devices(devices), workers_loaded=pool.alive,
                    cfg=common["cfg"])
        job = dict(common, positive=[p.cpu() for p in shots.positive],
                   negative=None if shots.negative is None else shots.negative.cpu())
        try:
            return pool.run(job, on_progress=on_step, cancel=mm.processing_interrupted, timeout=POOL_TIMEOUT_S,
                            preview=preview)
        except Cancelled:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
