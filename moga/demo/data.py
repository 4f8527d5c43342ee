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
                 size: int = DEFAULT_SIZE, shot_frames: int = DEFAULT_SHOT_FRAMES, p_new: float = 0.25):
        self.codec, self.seed, self.split = codec, seed, split
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
        codec_dtype = next(self.codec.parameters()).dtype
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
        return Batch(latent=latent, shot_frames=latent_frames, captions=captions)
