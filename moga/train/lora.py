"""Trainable LoRA on the DiT's attention and FFN projections: add, save, load, merge.

    n = add_lora(model, rank=16)                      # blocks.*.{self_attn,cross_attn}.{q,k,v,o}, ffn.0, ffn.2
    ... train the `lora_down` / `lora_up` parameters ...
    sd = lora_state_dict(model)                       # ComfyUI's LoRA key names (diffusion_model. prefix)
    merge_lora(model)                                 # W += (alpha / rank) * up @ down, LoRA removed

The LoRA files themselves are moga.checkpoint.lora's: `load_lora` reads with its `read_lora` (every layout
the checkpoint loader takes: kohya `lora_unet_*` with alpha, PEFT `lora_A`/`lora_B`, `.diff` deltas) and
`lora_state_dict` names tensors with its `lora_tensors` (ComfyUI's layout). What stays here is what
training needs: the trainable layers, and merges that keep a trained weight's Parameter (the optimizer
holds it) and refuse fp8 weights rather than requantising them.

A LoRA layer computes base(x) + (alpha / rank) * up(down(x)); `up` starts at zero, so adding LoRA
changes nothing until it is trained. The layer keeps the base weight's name and tensor (only its class
changes, as the model already does for its own linear layers), so the state dict's base keys stay the
checkpoint's keys. The LoRA factors live in float32 (the trained master weights) and are cast to the
input's dtype for the matmuls, like every other weight of the model.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.lora import LORA_PREFIX, lora_tensors, read_lora
from ..model import FP8_DTYPES, WanLinear

TARGETS = {
    "self_attn": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
    "cross_attn": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
    "ffn": ("ffn.0", "ffn.2"),
}
DEFAULT_TARGETS = ("self_attn", "cross_attn", "ffn")
COMFY_PREFIX = LORA_PREFIX


class LoRALinear(WanLinear):
    """A WanLinear with a low-rank update: base(x) + scale * up(down(x))."""

    lora_down: nn.Parameter   # [rank, in]
    lora_up: nn.Parameter     # [out, rank]
    lora_alpha: float

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        low = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return base + low * self.lora_scale


def parse_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    targets = tuple(targets or DEFAULT_TARGETS)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}: choose from {sorted(TARGETS)} (comma-separated)")
    return targets


def target_names(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Module names of the projections that get LoRA."""
    suffixes = [s for t in parse_targets(targets) for s in TARGETS[t]]
    return [f"blocks.{i}.{s}" for i in range(len(model.blocks)) for s in suffixes]


def add_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, targets=DEFAULT_TARGETS,
             seed: int = 0) -> list[str]:
    """Give the target projections LoRA factors (down ~ Kaiming-uniform from `seed`, up = 0).
    Returns the names of the modules that got one."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    names = target_names(model, targets)
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has LoRA: merge or remove it first")
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name} is not a linear layer")
        if rank > min(m.in_features, m.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds {name}'s size {m.out_features}x{m.in_features}")
        dev = m.weight.device
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
        down = (torch.rand(rank, m.in_features, generator=g) * 2 - 1) * bound
        m.__class__ = LoRALinear
        m.lora_down = nn.Parameter(down.to(dev))
        m.lora_up = nn.Parameter(torch.zeros(m.out_features, rank, device=dev))
        m.lora_alpha = alpha
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_down, m.lora_up)]


def lora_state_dict(model: nn.Module, prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
    """{prefix + name + '.lora_down.weight' / '.lora_up.weight' / '.alpha'}: the key names ComfyUI's
    LoRA loader reads for Wan models (with the default prefix)."""
    return lora_tensors({name: (m.lora_down, m.lora_up, m.lora_alpha) for name, m in lora_modules(model).items()},
                        prefix)


def lora_factors(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Trained tensors by parameter name (`X.lora_down`, `X.lora_up`, others ignored) -> {X: (down, up)}."""
    return {n[: -len(".lora_down")]: (weights[n], weights[n[: -len("down")] + "up"])
            for n in weights if n.endswith(".lora_down")}


def load_lora(model: nn.Module, lora, merge: bool = True, strength: float = 1.0) -> list[str]:
    """Apply a LoRA (a .safetensors file in any layout moga.checkpoint reads, or tensors such as
    `lora_state_dict` makes) to `model`: merged into the base weights (`merge`), or as trainable LoRA
    layers. Returns the module names it touched."""
    terms = read_lora(lora, model)  # checked against the model's names and shapes before any change
    if not terms:
        raise ValueError("the LoRA holds no lora_down/lora_up tensors")
    for t in terms:  # every term checked before any weight changes
        if merge:
            _check_mergeable(model, t.target)
        else:
            _check_trainable(model, t)
    names = []
    for t in terms:
        if merge:
            w = model.get_parameter(t.target)
            _merge_into(model, t.target, t.delta(w.device).reshape(w.shape) * strength)
        else:
            m = model.get_submodule(t.target[: -len(".weight")])
            m.__class__ = LoRALinear
            m.lora_down = nn.Parameter(t.down.float().to(m.weight.device))
            m.lora_up = nn.Parameter((t.up.float() * strength).to(m.weight.device))
            m.lora_alpha = float(t.down.shape[0] if t.alpha is None else t.alpha)
        names.append(t.target[: -len(".weight")] if t.target.endswith(".weight") else t.target)
    return sorted(names)


def _check_trainable(model: nn.Module, term) -> None:
    """A term that can become a trainable LoRA layer: low rank, on a linear layer's weight, not one yet."""
    if term.diff is not None:
        raise ValueError(f"the LoRA holds a full delta for {term.target} ({', '.join(term.keys)}), which is no "
                         f"low-rank pair to train: load it with merge=True")
    name = term.target[: -len(".weight")]
    m = model.get_submodule(name)
    if not isinstance(m, nn.Linear):
        raise ValueError(f"the LoRA updates {term.target}, which is not a linear layer's weight: load it with "
                         f"merge=True")
    if isinstance(m, LoRALinear):
        raise ValueError(f"{name} already has LoRA")


def _owner(model: nn.Module, target: str) -> tuple[str, nn.Module, str]:
    owner, _, leaf = target.rpartition(".")
    return owner, model.get_submodule(owner) if owner else model, leaf


def _check_mergeable(model: nn.Module, target: str) -> None:
    owner, m, leaf = _owner(model, target)
    if m._parameters[leaf].dtype in FP8_DTYPES or (leaf == "weight" and "scale_weight" in m._buffers):
        raise ValueError(f"{owner} has fp8 weights: LoRA cannot be merged into them without loss; train "
                         f"from a bf16/fp16 checkpoint, or keep the LoRA separate")


def _merge_into(model: nn.Module, target: str, delta: torch.Tensor) -> None:
    """W += delta in float32, stored in W's dtype; a trained (requires_grad) W is updated in place."""
    _check_mergeable(model, target)
    _, m, leaf = _owner(model, target)
    w = m._parameters[leaf]
    merged = (w.detach().float() + delta.to(w.device)).to(w.dtype)
    with torch.no_grad():
        if w.requires_grad:
            w.copy_(merged)
        else:
            m._parameters[leaf] = nn.Parameter(merged, requires_grad=False)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA into its base weight (W += scale * up @ down, in float32, stored in W's dtype)
    and turn the layers back into plain WanLinear. Returns the names merged."""
    names = []
    for name, m in lora_modules(model).items():
        delta = m.lora_up.detach().float() @ m.lora_down.detach().float() * m.lora_scale
        _merge_into(model, f"{name}.weight", delta)
        remove_lora_layer(m)
        names.append(name)
    return names


def remove_lora(model: nn.Module) -> list[str]:
    """Drop every LoRA without merging it."""
    names = list(lora_modules(model))
    for name in names:
        remove_lora_layer(model.get_submodule(name))
    return names


def remove_lora_layer(m: LoRALinear) -> None:
    del m.lora_down, m.lora_up
    m.__dict__.pop("lora_alpha", None)
    m.__class__ = WanLinear


def lora_names(model: nn.Module) -> Iterable[str]:
    return list(lora_modules(model))


__all__ = ["LoRALinear", "add_lora", "lora_state_dict", "lora_factors", "load_lora", "merge_lora", "remove_lora",
           "lora_parameters", "lora_modules", "target_names", "parse_targets", "TARGETS", "DEFAULT_TARGETS"]
