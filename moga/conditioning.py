"""Image conditioning of a multi-shot latent: start images per shot, in the form each Wan kind expects.

Wan's three ways (see `WanConfig.conditioning`), with our multi-shot extension (any shot may take a
start image; the VAE encodes every shot as its own clip, so a shot's first latent frame is its first
pixel frame alone):

- "concat" (Wan2.2 I2V A14B) and "clip+concat" (Wan2.1 I2V 14B): the model reads, after the 16 noise
  channels, 4 mask channels (1 on a conditioned latent frame: Wan's 4 pixel frames of that latent
  frame, all given) and 16 image-latent channels. A shot with a start image puts its latent (the
  encoded clip [image, grey, grey...], or only the first latent frame) into its frames of y and sets
  the mask on its first latent frame; the frames of shots without one hold `fill` (the encoded
  grey clip; zeros, as core ComfyUI uses when it has no start image, if none is given).
  Wan2.1 I2V also takes CLIP-vision tokens [1, 257, 1280]: per shot where given, else the first
  given image's.
- "replace" (Wan2.2 TI2V-5B): the image latent replaces the shot's first latent frame(s) at every
  step, and the model sees timestep 0 on those frames (`timesteps`).

Latents here are in the model's space (normalised, as `moga.wan_io.WanVAE.encode` returns them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

MASK_CHANNELS = 4


@dataclass
class ImageCondition:
    kind: str                              # "concat" | "clip+concat" | "replace"
    y: torch.Tensor | None = None          # [1, 4 + C, F, H, W] (concat kinds): mask, then image latent
    clip: list | None = None               # per shot CLIP features [1, tokens, width] (clip+concat)
    latent: torch.Tensor | None = None     # [1, C, F, H, W] (replace): the image latent on fixed frames
    fixed: torch.Tensor | None = None      # [F] bool (replace): frames held at `latent`, timestep 0

    def model_kwargs(self) -> dict:
        """What the model's forward takes besides x, t and the text."""
        out = {}
        if self.y is not None:
            out["y"] = self.y
        if self.clip is not None:
            out["clip"] = self.clip
        return out

    def timesteps(self, t: float, device=None) -> torch.Tensor:
        """The model's t for one step: [1] or, with fixed frames, [1, F] with 0 on them."""
        if self.fixed is None:
            return torch.full((1,), float(t), device=device)
        out = torch.full((1, self.fixed.numel()), float(t), device=device)
        out[:, self.fixed.to(out.device)] = 0.0
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x with the fixed frames set to the image latent (replace kind; others: x unchanged)."""
        if self.fixed is None:
            return x
        keep = self.fixed.to(x.device).view(1, 1, -1, 1, 1)
        return torch.where(keep, self.latent.to(x.device, x.dtype), x)


def _shot_starts(shot_frames: Sequence[int]) -> list[int]:
    starts, s = [], 0
    for f in shot_frames:
        starts.append(s)
        s += f
    return starts


def image_condition(config, shot_frames: Sequence[int], latent_size, images: Mapping[int, torch.Tensor],
                    clip=None, fill: torch.Tensor | None = None) -> ImageCondition | None:
    """Build the condition of a model `config` (a WanConfig) for start images per shot.

    images: {shot index: latent [1, C, f, H, W]}, f = 1 (the image alone) up to that shot's latent
    frames (the encoded clip [image, grey...]). clip: CLIP-vision features (Wan2.1 I2V): one tensor
    for every shot, or {shot: tensor}; shots without one use the lowest shot's. fill: [1, C, F, H, W]
    image-latent channels of the frames no image covers (concat kinds; None: zeros).
    Returns None for a text-to-video model given no images."""
    kind = config.conditioning
    F, H, W = (int(v) for v in latent_size)
    shot_frames = tuple(int(f) for f in shot_frames)
    if sum(shot_frames) != F:
        raise ValueError(f"shot_frames {shot_frames} do not add up to the latent's {F} frames")
    images = dict(images or {})
    if kind == "none":
        if images or clip is not None:
            raise ValueError(f"{config.name} is a text-to-video model: it takes no start image; "
                             f"use an image-to-video checkpoint (Wan2.1 I2V, Wan2.2 I2V A14B, TI2V-5B)")
        return None
    channels = config.out_dim
    starts = _shot_starts(shot_frames)
    for s, lat in images.items():
        if not 0 <= int(s) < len(shot_frames):
            raise ValueError(f"a start image for shot {s + 1}, but the plan has {len(shot_frames)} shots")
        if (lat.dim() != 5 or lat.shape[0] != 1 or lat.shape[1] != channels
                or tuple(lat.shape[3:]) != (H, W) or not 1 <= lat.shape[2] <= shot_frames[s]):
            raise ValueError(f"the start latent of shot {s + 1} must be [1, {channels}, 1..{shot_frames[s]}, "
                             f"{H}, {W}] (encode the image at the video's size with this model's VAE), "
                             f"got {tuple(lat.shape)}")

    if kind == "replace":
        if clip is not None:
            raise ValueError(f"{config.name} takes no CLIP image embedding (its image enters as latent frames)")
        if not images:
            return None  # TI2V without an image is text-to-video
        latent = torch.zeros(1, channels, F, H, W)
        fixed = torch.zeros(F, dtype=torch.bool)
        for s, lat in images.items():
            a = starts[s]
            latent[:, :, a:a + lat.shape[2]] = lat.float().cpu()
            fixed[a:a + lat.shape[2]] = True
        return ImageCondition(kind, latent=latent, fixed=fixed)

    if fill is None:
        y_lat = torch.zeros(1, channels, F, H, W)
    else:
        if tuple(fill.shape) != (1, channels, F, H, W):
            raise ValueError(f"fill must be [1, {channels}, {F}, {H}, {W}], got {tuple(fill.shape)}")
        y_lat = fill.float().cpu().clone()
    mask = torch.zeros(1, MASK_CHANNELS, F, H, W)
    for s, lat in images.items():
        a = starts[s]
        y_lat[:, :, a:a + lat.shape[2]] = lat.float().cpu()
        mask[:, :, a] = 1.0
    per_shot = None
    if kind == "clip+concat":
        per_shot = _clip_per_shot(clip, len(shot_frames), config)
    elif clip is not None:
        raise ValueError(f"{config.name} has no CLIP image branch (img_emb): drop the CLIP embedding")
    return ImageCondition(kind, y=torch.cat([mask, y_lat], dim=1), clip=per_shot)


def _clip_per_shot(clip, num_shots: int, config) -> list:
    if clip is None:
        raise ValueError(f"{config.name} needs a CLIP-vision embedding of the start image "
                         f"([1, 257, {config.image_dim}] penultimate features)")
    if isinstance(clip, torch.Tensor):
        return [clip] * num_shots
    clip = {int(k): v for k, v in dict(clip).items()}
    if not clip:
        raise ValueError("an empty CLIP embedding map: give at least shot 1's")
    bad = [k for k in clip if not 0 <= k < num_shots]
    if bad:
        raise ValueError(f"CLIP embeddings for shots {[k + 1 for k in bad]}, but the plan has {num_shots} shots")
    first = clip[min(clip)]
    return [clip.get(s, first) for s in range(num_shots)]


__all__ = ["ImageCondition", "image_condition", "MASK_CHANNELS"]
