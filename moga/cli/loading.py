"""What `generate` loads and encodes before sampling: the start images per shot, the DiT (or a Wan2.2
A14B expert pair), the text encoder and VAE, the prompts, the image condition."""
from __future__ import annotations

import importlib

from .errors import CliError, check_exists
from .forward import has_module
from .settings import moga_settings


def parse_shot_images(args, num_shots: int) -> dict:
    """{shot index: path} from --image and --shot-image N:FILE."""
    out = {}
    if args.image:
        out[0] = args.image
    for item in args.shot_image:
        n, sep, path = item.partition(":")
        if not sep or not n.strip().isdigit() or not path:
            raise CliError(f"--shot-image {item!r}: write N:FILE, N the shot counted from 1 (e.g. 5:sheet.png)")
        k = int(n) - 1
        if not 0 <= k < num_shots:
            raise CliError(f"--shot-image {item!r}: the plan has shots 1..{num_shots}")
        if k in out:
            raise CliError(f"shot {k + 1} has two start images (--image is shot 1's)")
        out[k] = path
    for path in out.values():
        check_exists(path, "start image")
    return out


def load_dit(args, device, dtype, loras=None, loras_low=None):
    """A WanModel, or an ExpertPair (--model-low, or a folder holding both experts); each expert gets
    the run's MoGA settings from its own routers and the flags. LoRAs: `loras` on the model (a pair:
    on both experts unless `loras_low` gives the low-noise expert its own, as Wan2.2 distill LoRAs come)."""
    from .. import checkpoint as ckpt
    pair = (args.model, args.model_low) if args.model_low else ckpt.find_experts(args.model)
    if pair is None:
        return ckpt.load_model(args.model, device=device, dtype=dtype, loras=loras or None), None
    model = ckpt.load_experts(*pair, boundary=args.boundary, offload=args.offload_expert, device=device,
                              dtype=dtype, loras=loras or None,
                              loras_low=(loras if loras_low is None else loras_low) or None)
    for net, path in ((model.high, pair[0]), (model.low, pair[1])):
        net.moga_config = moga_settings(args, ckpt.inspect_checkpoint(path))
    return model, pair


def load_encoders(args, model, device, dtype):
    """(text encoder, vae, uses_umt5): --text-encoder / --vae, else what the model brings itself."""
    te, vae, umt5 = getattr(model, "text_encoder", None), getattr(model, "vae", None), False
    if args.text_encoder or args.vae:
        _quiet_hf()
    if args.text_encoder:
        from ..wan_io import TextEncoder
        te, umt5 = TextEncoder.load(args.text_encoder, text_len=model.config.text_len, device=device,
                                    dtype=dtype), True
    if args.vae:
        from ..wan_io import WanVAE
        vae = WanVAE.load(args.vae, device=device)  # float32, as Wan decodes
    if te is None:
        raise CliError(f"{args.model} brings no text encoder: pass --text-encoder DIR (a umT5 encoder folder "
                       f"with its tokenizer, e.g. a Wan2.1 diffusers folder)")
    if vae is None:
        raise CliError(f"{args.model} brings no VAE: pass --vae PATH (a Wan2.1 VAE folder or .safetensors)")
    return te, vae, umt5


def _quiet_hf():
    """transformers/diffusers print load bars and advice; the command line has its own progress."""
    for name in ("transformers", "diffusers"):
        try:
            logging_mod = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        logging_mod.set_verbosity_error()
        getattr(logging_mod, "disable_progress_bar", lambda: None)()


def encode_plan(te, plan, use_wan_negative: bool):
    """Per-shot embeddings (each distinct prompt once) and the negative embedding."""
    negative = plan.negative
    if not negative and use_wan_negative:
        from ..wan_io import WAN_NEGATIVE
        negative = WAN_NEGATIVE
    prompts = plan.prompts()
    distinct = list(dict.fromkeys(prompts + [negative]))
    table = dict(zip(distinct, te.encode(distinct)))
    return [table[p] for p in prompts], table[negative]


def encode_images(args, model, vae, plan, images, width, height):
    """The ImageCondition of the start images (None: text-to-video)."""
    from ..conditioning import image_condition
    from ..wan_image_io import ClipVision, encode_start_images, load_image
    cfg = model.config
    if not images:
        if cfg.conditioning in ("concat", "clip+concat"):
            raise CliError(f"{args.model} is {cfg.name}, an image-to-video model: pass --image FILE (shot 1's "
                           f"start image)")
        return None
    if cfg.conditioning == "none":
        raise CliError(f"{args.model} is {cfg.name}, a text-to-video model: --image/--shot-image need an "
                       f"image-to-video checkpoint (Wan2.1 I2V, Wan2.2 I2V A14B, TI2V-5B)")
    pixels = {s: load_image(p, width, height) for s, p in images.items()}
    latents, fill = encode_start_images(vae, cfg, plan.shot_frames, pixels)
    clip = None
    if cfg.image_dim:
        if not args.clip_vision:
            raise CliError(f"{cfg.name} also reads the image through CLIP vision: pass --clip-vision DIR (a "
                           f"CLIPVisionModel folder, e.g. the diffusers release's image_encoder/)")
        enc = ClipVision.load(args.clip_vision)
        clip = {s: enc.encode(img) for s, img in pixels.items()}
    shots = plan.latent_shot_frames()
    lat = next(iter(latents.values()))
    return image_condition(cfg, shots, (sum(shots), *lat.shape[-2:]), latents, clip=clip, fill=fill)


def import_extras(name: str):
    """A checkpoint that brings its own text encoder/VAE names the module that loads them (moga.demo)."""
    from .. import checkpoint as ckpt
    if name in ckpt.EXTRA_LOADERS:
        return
    for module in ("moga.demo",):
        if has_module(module):
            importlib.import_module(module)
