"""Start images outside ComfyUI: read an image file, encode it with the Wan VAE (and, for Wan2.1 I2V, the
CLIP-vision encoder) into the per-shot latents `moga.conditioning.image_condition` takes. Local files
only (the optional `wan` extra: transformers for CLIPVisionModel); nothing is downloaded.

    clip = ClipVision.load("Wan2.1-I2V-14B-480P-Diffusers/image_encoder")
    images = {0: load_image("hero.png", 832, 480), 4: load_image("sheet.png", 832, 480)}
    latents, fill = encode_start_images(vae, model.config, plan.shot_frames, images)
    cond = image_condition(model.config, shot_frames, latent_size, latents, clip=..., fill=fill)

Cost: the concat kinds (Wan2.1 / Wan2.2 I2V) need the encoded grey clip of every shot without an image
(Wan's training input for the frames after the image), so the VAE encodes a clip as long as the whole
video once (shots of equal length share one encode); TI2V encodes the images alone.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .wan_io import _require

# CLIP's preprocessing (OpenAI / open-clip ViT-H/14, what Wan2.1 I2V's image encoder expects)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path, width: int, height: int) -> torch.Tensor:
    """An image file as [3, height, width] in [-1, 1]: scaled to cover the frame, centre-cropped (as
    core ComfyUI's start-image nodes do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"start image {str(path)!r} does not exist")
    import imageio.v3 as iio
    try:
        arr = iio.imread(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user error
        raise ValueError(f"{str(path)!r} is not an image imageio can read ({exc})") from None
    img = torch.as_tensor(arr)
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    if img.dim() != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{str(path)!r} has shape {tuple(img.shape)}: expected an RGB(A) image")
    scale = 255.0 if img.dtype == torch.uint8 else (65535.0 if img.dtype == torch.uint16 else 1.0)
    img = img[..., :3].permute(2, 0, 1).float()[None] / scale
    h, w = img.shape[-2:]
    s = max(width / w, height / h)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return (img[0, :, top:top + height, left:left + width].clamp(0, 1) * 2 - 1).contiguous()


@torch.inference_mode()
def encode_start_images(vae, config, shot_pixel_frames, images: dict) -> tuple[dict, torch.Tensor | None]:
    """({shot: latent}, fill) for `image_condition`. images: {shot: [3, H, W] in [-1, 1]}.

    concat kinds: shot s's latent is the encoded clip [image, grey x (frames - 1)] of that shot's
    length; fill holds the encoded grey clip of each other shot. replace (TI2V): the image alone."""
    kind = config.conditioning
    if kind == "none":
        raise ValueError(f"{config.name} is a text-to-video model: it takes no start image")
    z = getattr(vae, "z_dim", None)
    if z is not None and z != config.out_dim:
        raise ValueError(f"the VAE has {z} latent channels, the model {config.out_dim}: use the VAE of this "
                         f"model (Wan2.1 VAE for 16 channels, Wan2.2 VAE for TI2V-5B's 48)")
    shot_pixel_frames = [int(f) for f in shot_pixel_frames]

    def clip_of(first, frames, size):
        """[1, 3, frames, H, W]: the image (or grey, 0 in [-1, 1]) then grey frames."""
        clip = torch.zeros(1, 3, frames, *size)
        if first is not None:
            clip[0, :, 0] = first
        return clip

    if kind == "replace":
        return {s: vae.encode(img[None, :, None]).float().cpu() for s, img in images.items()}, None
    if not images:
        raise ValueError(f"{config.name} is an image-to-video model: give shot 1 a start image (--image FILE)")
    size = tuple(next(iter(images.values())).shape[-2:])
    latents = {s: vae.encode(clip_of(img, shot_pixel_frames[s], size)).float().cpu() for s, img in images.items()}
    greys: dict[int, torch.Tensor] = {}
    parts = []
    for s, frames in enumerate(shot_pixel_frames):
        if s in latents:
            parts.append(torch.zeros_like(latents[s]))
            continue
        if frames not in greys:
            greys[frames] = vae.encode(clip_of(None, frames, size)).float().cpu()
        parts.append(greys[frames])
    return latents, torch.cat(parts, dim=2)


class ClipVision:
    """A transformers CLIPVisionModel (Wan2.1 I2V's image encoder, e.g. a diffusers folder's
    image_encoder/): `encode(image [3, H, W] in [-1, 1]) -> [1, tokens, width]`, the penultimate hidden
    states (what Wan's img_emb reads: 257 x 1280 for ViT-H/14 at 224 px)."""

    def __init__(self, model, device="cpu", dtype=torch.float32):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.size = int(model.config.image_size)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> "ClipVision":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"CLIP vision encoder {str(path)!r} does not exist: pass a transformers "
                                    f"CLIPVisionModel folder (config.json + safetensors), e.g. a Wan2.1 I2V "
                                    f"diffusers folder's image_encoder/")
        folder = path / "image_encoder" if (path / "image_encoder" / "config.json").is_file() else path
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is not a CLIPVisionModel folder (no config.json); single files "
                             f"are not read: use the diffusers release's image_encoder/ folder")
        _require("transformers")
        from transformers import CLIPVisionModel
        model = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        return cls(model.to(device=device, dtype=dtype).eval().requires_grad_(False), device, dtype)

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = ((image.float() + 1) / 2)[None]
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))),
                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        out = self.model(pixel_values=x.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()


def save_tiny_clip_vision(folder, width: int = 32, image_size: int = 28, patch: int = 14, seed: int = 0) -> Path:
    """A tiny random CLIPVisionModel folder for tests (tokens = (image_size / patch)^2 + 1)."""
    _require("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                           num_attention_heads=4, image_size=image_size, patch_size=patch)
    folder = Path(folder)
    CLIPVisionModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


__all__ = ["load_image", "encode_start_images", "ClipVision", "save_tiny_clip_vision"]
