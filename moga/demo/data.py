"""Training batches from the synthetic world: fresh stories every step, rendered and encoded on the
trainer's device. Batch `index` always gives the same stories (resumable, reproducible)."""
from __future__ import annotations

import torch

from ..train.trainer import Batch
from .world import DEFAULT_SHOT_FRAMES, DEFAULT_SIZE, render_batch, sample_story

# Story lengths cycle so the model sees 1..4 shots; 4-shot stories (the demo's) dominate.
SHOT_CYCLE = (4, 4, 3, 4, 2, 4, 4, 1)


class WorldData:
    def __init__(self, codec, seed: int = 0, split: str = "train", shot_cycle=SHOT_CYCLE,
                 size: int = DEFAULT_SIZE, shot_frames: int = DEFAULT_SHOT_FRAMES, p_new: float = 0.25,
                 object_weight: float = 0.0):
        self.codec, self.seed, self.split = codec, seed, split
        self.object_weight = object_weight  # extra loss weight on latent pixels the object touches
        self.shot_cycle = tuple(shot_cycle)
        self.size, self.shot_frames, self.p_new = size, shot_frames, p_new

    def stories(self, index: int, count: int):
        shots = self.shot_cycle[index % len(self.shot_cycle)]
        base = (self.seed * 1_000_003 + index) * 4096
        return [sample_story(base + i, shots, split=self.split, p_new=self.p_new, size=self.size,
                             shot_frames=self.shot_frames) for i in range(count)]

    @torch.no_grad()
    def batch(self, index: int, size: int, device) -> Batch:
        stories = self.stories(index, size)
        video = render_batch(stories, device)
        codec_dtype = self.codec._param_dtype()
        shots, frames = len(stories[0].shots), stories[0].shot_frames
        if len(set(frames)) == 1:  # every shot coded alone, all in one batch
            b, c, _, h, w = video.shape
            clips = video.view(b, c, shots, frames[0], h, w).transpose(1, 2).reshape(b * shots, c, frames[0], h, w)
            z = self.codec.encode(clips.to(codec_dtype)).float()
            latent = z.view(b, shots, *z.shape[1:]).transpose(1, 2).reshape(b, z.shape[1], -1, *z.shape[-2:])
        else:
            latent = self.codec.encode_shots(video.to(codec_dtype), frames).float()
        latent_frames = tuple((f - 1) // self.codec.temporal_ratio + 1 for f in stories[0].shot_frames)
        captions = [[s.captions[k] for s in stories] for k in range(len(stories[0].shots))]
        weight = None
        if self.object_weight > 0:
            weight = 1.0 + self.object_weight * object_map(video, frames, self.codec.temporal_ratio,
                                                           self.codec.spatial_ratio)
        return Batch(latent=latent, shot_frames=latent_frames, captions=captions, weight=weight)


def object_map(video: torch.Tensor, shot_frames, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """[B, 1, F, h, w] in {0, 1}: latent pixels whose frames show the object (pixels unlike the frame's
    corner), grown by one latent pixel so the object's edges count too."""
    import torch.nn.functional as F

    obj = ((video - video[..., :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()  # [B, 1, T, H, W]
    out, start = [], 0
    for f in shot_frames:
        clip = obj[:, :, start:start + f]
        start += f
        groups = torch.cat([clip[:, :, :1].expand(-1, -1, temporal, -1, -1), clip[:, :, 1:]], dim=2)
        b, _, t, h, w = groups.shape
        g = groups.view(b, 1, t // temporal, temporal, h, w).amax(3)
        out.append(F.max_pool3d(g, (1, spatial, spatial)))
    m = torch.cat(out, dim=2)
    return F.max_pool3d(m, (1, 3, 3), stride=1, padding=(0, 1, 1))
