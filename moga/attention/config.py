"""MoGA settings: one frozen value, passed down; defaults live here and nowhere else."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

FUSIONS = ("mean", "lse")
CAPACITY_SPLITS = ("runs", "stride")
BACKENDS = ("auto", "fa4", "flash_attn", "torch", "sdpa", "reference")


@dataclass(frozen=True)
class MoGAConfig:
    """How a MoGA self-attention layer runs.

    num_groups: M, the router's group count (the paper: 5 for Wan2.1 at 5-30 s, 20 at ~580k tokens).
    window: (frames, rows, cols). rows x cols is the spatial grid cut into every latent frame (the
        paper: 2x2 for Wan). frames is the temporal extent of a window group in latent frames;
        0 means the whole shot, as in the paper.
    context_frames: latent frames of each neighbouring window in time (the previous and the next
        shot, or chunk) added to a window group's keys/values; the paper's "two adjacent frames".
    routed / windowed / per_frame: which branches run (at least one).
    fusion: "mean" (the paper: mean of routed*p, window, per-frame) or "lse" (one softmax over the
        union of the branches' keys, no gate: for calibrated, untrained routers).
    capacity: group capacity of the routed branch, in units of the balanced size N / M: every routed
        group of more than ceil(capacity * N / M) tokens is cut into near-equal runs of consecutive
        tokens (sequence order), each a group of its own (`moga.attention.router.cap_routing`). None
        (or 0) = off, the paper's behaviour. For calibrated routers, whose k-means groups are very
        unbalanced (docs/training-free.md); the gate stays the router's probability.
    capacity_split: how an over-capacity group is cut: "runs" (consecutive tokens: each part stays
        local) or "stride" (round robin, every r-th token: each part still spans the whole sequence, so
        a group that follows one object across shots keeps its cross-shot pairs; docs/demo-model.md).
    dense: run plain dense attention instead (warm-up steps/layers, baselines).
    backend: varlen kernel ("auto" picks the fastest importable one).
    """

    num_groups: int = 5
    window: tuple[int, int, int] = (0, 2, 2)
    context_frames: int = 1
    routed: bool = True
    windowed: bool = True
    per_frame: bool = True
    fusion: str = "mean"
    capacity: float | None = None
    capacity_split: str = "runs"
    dense: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {self.num_groups!r}")
        window = tuple(int(w) for w in self.window)
        if len(window) != 3:
            raise ValueError(f"window must be (frames, rows, cols), got {self.window!r}")
        if window[0] < 0 or window[1] < 1 or window[2] < 1:
            raise ValueError(
                f"window {window} is invalid: frames >= 0 (0 = whole shot), rows >= 1, cols >= 1")
        object.__setattr__(self, "window", window)
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {self.context_frames}")
        if not (self.routed or self.windowed or self.per_frame):
            raise ValueError("at least one MoGA branch (routed, windowed, per_frame) must be on")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.capacity is not None:
            try:
                cap = float(self.capacity)
            except (TypeError, ValueError):
                cap = math.nan
            if not (math.isfinite(cap) and cap >= 0.0):
                raise ValueError(f"capacity must be None (off) or a finite number >= 0 (0 = off; 1 = the "
                                 f"balanced group size N / M), got {self.capacity!r}")
            object.__setattr__(self, "capacity", cap or None)  # 0 means off: one spelling, None
        if self.capacity_split not in CAPACITY_SPLITS:
            raise ValueError(f"capacity_split must be one of {CAPACITY_SPLITS}, got {self.capacity_split!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def replace(self, **changes) -> "MoGAConfig":
        return replace(self, **changes)

    @staticmethod
    def parse_window(text: str) -> tuple[int, int, int]:
        """'0,2,2' or '2x2' (rows x cols, whole shot) -> (frames, rows, cols)."""
        text = text.strip().lower()
        try:
            if "x" in text:
                rows, cols = (int(p) for p in text.split("x"))
                return (0, rows, cols)
            parts = tuple(int(p) for p in text.replace(" ", "").split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3:
            raise ValueError(
                f"window {text!r} is not 'frames,rows,cols' (e.g. '0,2,2': whole shot, 2x2 grid) "
                f"nor 'rowsxcols' (e.g. '2x2')")
        return parts
