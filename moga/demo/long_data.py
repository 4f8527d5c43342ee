"""Training batches of long stories, mixed with the short world's (so the 4-shot model keeps what it knew).

Batch `index` always gives the same stories (resumable). Every `short_every`-th batch is the short world's
(`WorldData`, `size` stories); the others are long stories of `shot_cycle[...]` shots, as many as fit the
token count of `size` short 4-shot stories (at least one), so a step costs about the same either way.
"""
from __future__ import annotations

from .data import WorldData
from .long_world import LONG_SHOT_FRAMES, sample_long_story, tokens_per_story

LONG_SHOT_CYCLE = (12, 16, 12, 20, 12, 24)
SHORT_TOKENS = 4 * 5 * 64   # a 4-shot story of the short world


class LongWorldData(WorldData):
    def __init__(self, codec, seed: int = 0, split: str = "train", long_shot_cycle=LONG_SHOT_CYCLE,
                 long_shot_frames: int = LONG_SHOT_FRAMES, short_every: int = 4, **kw):
        super().__init__(codec, seed=seed, split=split, **kw)
        if short_every < 0:
            raise ValueError(f"short_every must be >= 0 (0: long stories only), got {short_every}")
        self.long_shot_cycle, self.long_shot_frames = tuple(long_shot_cycle), long_shot_frames
        self.short_every = short_every

    def is_short(self, index: int) -> bool:
        return bool(self.short_every) and index % self.short_every == self.short_every - 1

    def stories(self, index: int, count: int):
        if self.is_short(index):
            return super().stories(index, count)
        shots = self.long_shot_cycle[index % len(self.long_shot_cycle)]
        base = (self.seed * 1_000_003 + index) * 4096 + 1
        first = sample_long_story(base, shots, split=self.split, size=self.size, shot_frames=self.long_shot_frames)
        n = max(1, count * SHORT_TOKENS // tokens_per_story(first))
        return [first] + [sample_long_story(base + i, shots, split=self.split, size=self.size,
                                            shot_frames=self.long_shot_frames) for i in range(1, n)]
