"""The token grid of a latent video and its shots: the one value type every layer below takes.

Tokens are numbered frame-major: token = (frame * height + row) * width + col, where frame is the
latent frame (after temporal patching) and row/col are token positions (after spatial patching).
Shots are consecutive latent-frame ranges that tile the frames. Nothing else in the project
re-derives these facts: it asks the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class TokenLayout:
    frames: int
    height: int
    width: int
    shot_frames: tuple[int, ...] = ()  # latent frames per shot; () means one shot of all frames

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TokenLayout.{name} must be a positive integer, got {value!r}")
        shots = tuple(int(s) for s in self.shot_frames) or (self.frames,)
        if any(s <= 0 for s in shots):
            raise ValueError(f"every shot needs at least one latent frame, got shot_frames={shots}")
        if sum(shots) != self.frames:
            raise ValueError(
                f"shot lengths {shots} add up to {sum(shots)} latent frames but the layout has "
                f"{self.frames}: make the shot lengths sum to the frame count")
        object.__setattr__(self, "shot_frames", shots)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def num_shots(self) -> int:
        return len(self.shot_frames)

    @cached_property
    def shot_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, end) latent-frame range of each shot."""
        ranges, start = [], 0
        for n in self.shot_frames:
            ranges.append((start, start + n))
            start += n
        return tuple(ranges)

    @cached_property
    def shot_token_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, end) token range of each shot (shots are contiguous in token order)."""
        tpf = self.tokens_per_frame
        return tuple((a * tpf, b * tpf) for a, b in self.shot_ranges)

    def shot_of_frame(self, frame: int) -> int:
        for i, (a, b) in enumerate(self.shot_ranges):
            if a <= frame < b:
                return i
        raise ValueError(f"latent frame {frame} is outside the layout's {self.frames} frames")

    def check_tokens(self, num_tokens: int) -> None:
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"the input has {num_tokens} tokens but the layout {self} describes {self.num_tokens} "
                f"({self.frames} frames x {self.height} x {self.width}): pass the layout of this latent")

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} in shots {list(self.shot_frames)}"
