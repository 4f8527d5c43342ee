"""What the MoGA nodes pass between each other, and how they report a bad input.

Values here are plain containers: every computation on them happens in the ``moga`` library.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from comfy_api.latest import io

CATEGORY = "MoGA"

# The pack's own socket types. io.Custom makes a new class per call: define each once, here.
MogaModel = io.Custom("MOGA_MODEL")
MogaShots = io.Custom("MOGA_SHOTS")
MogaLoras = io.Custom("MOGA_LORAS")  # a tuple of (file path, strength): MoGA LoRA -> MoGA Model Loader

# Keys this pack adds to ComfyUI's LATENT dict (beside the standard "samples").
LATENT_SHOT_FRAMES = "moga_shot_frames"  # latent frames of each shot, in order
LATENT_FPS = "moga_fps"


def input_error(node: str, name: str, problem: str, fix: str) -> ValueError:
    """A ValueError that names the node, the input, what is wrong and how to fix it."""
    return ValueError(f"{node}: input '{name}': {problem}. Fix: {fix}.")


@dataclass(frozen=True)
class MoGAModelHandle:
    """A loaded MoGA model plus the settings a run uses (the MOGA_MODEL socket value).

    ``model`` is shared with the loader's cache and never changed by the nodes; MoGA Attention Settings returns a
    new handle through ``with_settings``.
    """

    model: Any                      # moga.model.WanModel, or moga.experts.ExpertPair (Wan2.2 A14B)
    name: str                       # the file name the loader was given
    path: str
    dtype: Any = None               # torch dtype the weights were loaded in
    moga: Any = None                # moga.attention.MoGAConfig for runs (None: the model's own)
    dense_warmup: float = 0.0       # fraction of the steps that run dense attention first
    dense_layers: tuple = ()        # layer indices that run dense attention on every step
    settings: dict = field(default_factory=dict)  # what Attention Settings changed, for messages and the pool
    loras: tuple = ()               # (file, strength) merged into the weights at load (the pool's workers too)

    def with_settings(self, **changes) -> "MoGAModelHandle":
        return replace(self, **changes)

    @property
    def text_encoder(self):
        return getattr(self.model, "text_encoder", None)

    @property
    def vae(self):
        return getattr(self.model, "vae", None)


@dataclass(frozen=True)
class MoGAShotsValue:
    """Shot plan plus its per-shot conditioning (the MOGA_SHOTS socket value)."""

    plan: Any                       # moga.shots.ShotPlan
    positive: list                  # one text embedding [1, L, text_dim] per shot
    negative: Any                   # one text embedding [1, L, text_dim]
    encoder: str                    # "clip" (the host's text encoder) or "model" (the model's own)
