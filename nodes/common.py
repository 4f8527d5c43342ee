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
MogaLoras = io.Custom("MOGA_LORAS")  # a tuple of (file path, strength, experts): MoGA LoRA -> MoGA Model Loader

# Which expert(s) of a Wan2.2 A14B pair a LoRA goes to (the MoGA LoRA node's `experts`); one model: only "both".
LORA_EXPERTS = ("both", "high_noise", "low_noise")

# Keys this pack adds to ComfyUI's LATENT dict (beside the standard "samples").
LATENT_SHOT_FRAMES = "moga_shot_frames"  # latent frames of each shot, in order
LATENT_FPS = "moga_fps"


def input_error(node: str, name: str, problem: str, fix: str) -> ValueError:
    """A ValueError that names the node, the input, what is wrong and how to fix it."""
    return ValueError(f"{node}: input '{name}': {problem}. Fix: {fix}.")


def lora_entry(entry) -> tuple:
    """One MOGA_LORAS entry in one form: (file, strength, experts); an entry without experts goes to both."""
    file, strength, experts = (tuple(entry) + ("both",))[:3]
    if experts not in LORA_EXPERTS:
        raise ValueError(f"a LoRA entry's experts is one of {', '.join(LORA_EXPERTS)}, got {experts!r}")
    return str(file), float(strength), experts


def split_loras(loras) -> tuple[list, list]:
    """A MOGA_LORAS value -> ([(file, strength)] of the high-noise expert (or the one model), [...] of the
    low-noise expert), in chain order."""
    high, low = [], []
    for entry in loras or ():
        file, strength, experts = lora_entry(entry)
        if experts != "low_noise":
            high.append((file, strength))
        if experts != "high_noise":
            low.append((file, strength))
    return high, low


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
    moga: Any = None                # moga.attention.MoGAConfig for runs (None: the model's own); a pair: the high
    moga_low: Any = None            # a Wan2.2 A14B pair: the low-noise expert's MoGAConfig (its own routers)
    dense_warmup: float = 0.0       # fraction of the steps that run dense attention first
    dense_layers: tuple = ()        # layer indices that run dense attention on every step
    settings: dict = field(default_factory=dict)  # what Attention Settings changed, for messages and the pool
    loras: tuple = ()               # (file, strength, experts) merged into the weights at load (the workers too)

    def with_settings(self, **changes) -> "MoGAModelHandle":
        return replace(self, **changes)

    @property
    def run_moga(self):
        """`moga=` for moga.sampling.sample: one config, or (high, low) for an expert pair."""
        return self.moga if self.moga_low is None else (self.moga, self.moga_low)

    def experts(self) -> list[tuple[str, Any, Any]]:
        """(what to call it in a message, its WanModel, its MoGAConfig) for each model a run uses: the one
        model, or a pair's high- and low-noise experts (each with its own routers)."""
        net = self.model
        if not hasattr(net, "expert_for"):
            return [(f"the model ({self.name})", net, self.moga if self.moga is not None else net.moga_config)]
        own = (self.moga, self.moga_low)
        return [(f"the {which} expert ({_file_name(e, self.name if which == 'high-noise' else None)})", e,
                 cfg if cfg is not None else e.moga_config)
                for which, e, cfg in (("high-noise", net.high, own[0]), ("low-noise", net.low, own[1]))]

    @property
    def text_encoder(self):
        return getattr(self.model, "text_encoder", None)

    @property
    def vae(self):
        return getattr(self.model, "vae", None)


def _file_name(net, fallback=None) -> str:
    import os
    path = getattr(net, "source_path", None)
    return os.path.basename(str(path)) if path else (fallback or "not loaded from a file")


@dataclass(frozen=True)
class MoGAShotsValue:
    """Shot plan plus its per-shot conditioning (the MOGA_SHOTS socket value)."""

    plan: Any                       # moga.shots.ShotPlan
    positive: list                  # one text embedding [1, L, text_dim] per shot
    negative: Any                   # one text embedding [1, L, text_dim]
    encoder: str                    # "clip" (the host's text encoder) or "model" (the model's own)
