"""LoRA on the DiT's attention and FFN projections: add, save, load, merge.

    n = add_lora(model, rank=16)                      # blocks.*.{self_attn,cross_attn}.{q,k,v,o}, ffn.0, ffn.2
    ... train the `lora_down` / `lora_up` parameters ...
    sd = lora_state_dict(model)                       # ComfyUI's LoRA key names (diffusion_model. prefix)
    merge_lora(model)                                 # W += (alpha / rank) * up @ down, LoRA removed

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

from ..model import FP8_DTYPES, WanLinear

TARGETS = {
    "self_attn": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
    "cross_attn": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
    "ffn": ("ffn.0", "ffn.2"),
}
DEFAULT_TARGETS = ("self_attn", "cross_attn", "ffn")
COMFY_PREFIX = "diffusion_model."


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
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{prefix}{name}.lora_down.weight"] = m.lora_down.detach().float().cpu().contiguous()
        out[f"{prefix}{name}.lora_up.weight"] = m.lora_up.detach().float().cpu().contiguous()
        out[f"{prefix}{name}.alpha"] = torch.tensor(float(m.lora_alpha))
    return out


def _split_lora_sd(sd: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    mods: dict[str, dict] = {}
    for key, t in sd.items():
        for leaf in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(leaf):
                name = key[: -len(leaf)]
                for p in (COMFY_PREFIX, "model.diffusion_model.", "diffusion_model."):
                    if name.startswith(p):
                        name = name[len(p):]
                        break
                mods.setdefault(name, {})[leaf.split(".")[1]] = t
    return mods


def load_lora(model: nn.Module, lora, merge: bool = True, strength: float = 1.0) -> list[str]:
    """Apply a LoRA (a dict from `lora_state_dict` or a .safetensors file) to `model`: merged into the
    base weights (`merge`), or as trainable LoRA layers. Returns the module names it touched."""
    if not isinstance(lora, Mapping):
        from safetensors.torch import load_file
        lora = load_file(str(lora))
    mods = _split_lora_sd(lora)
    if not mods:
        raise ValueError("the LoRA holds no lora_down/lora_up tensors")
    for name, parts in mods.items():
        if "lora_down" not in parts or "lora_up" not in parts:
            raise ValueError(f"LoRA of {name} lacks its lora_down or lora_up tensor")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the LoRA targets {name}, which this model does not have: it was trained "
                             f"for another model") from None
        down, up = parts["lora_down"].float(), parts["lora_up"].float()
        if tuple(up.shape[:1]) + tuple(down.shape[1:]) != tuple(m.weight.shape) or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA of {name} ({tuple(up.shape)} @ {tuple(down.shape)}) does not fit its "
                             f"weight {tuple(m.weight.shape)}")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if merge:
            _merge_into(m, name, up @ down * (alpha / down.shape[0]) * strength)
        else:
            if isinstance(m, LoRALinear):
                raise ValueError(f"{name} already has LoRA")
            m.__class__ = LoRALinear
            m.lora_down = nn.Parameter(down.to(m.weight.device))
            m.lora_up = nn.Parameter((up * strength).to(m.weight.device))
            m.lora_alpha = alpha
    return sorted(mods)


def _merge_into(m: nn.Module, name: str, delta: torch.Tensor) -> None:
    w = m.weight
    if w.dtype in FP8_DTYPES or "scale_weight" in m._buffers:
        raise ValueError(f"{name} has fp8 weights: LoRA cannot be merged into them without loss; train "
                         f"from a bf16/fp16 checkpoint, or keep the LoRA separate")
    merged = (w.detach().float() + delta.to(w.device)).to(w.dtype)
    with torch.no_grad():
        if w.requires_grad:
            w.copy_(merged)
        else:
            m._parameters["weight"] = nn.Parameter(merged, requires_grad=False)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA into its base weight (W += scale * up @ down, in float32, stored in W's dtype)
    and turn the layers back into plain WanLinear. Returns the names merged."""
    names = []
    for name, m in lora_modules(model).items():
        delta = m.lora_up.detach().float() @ m.lora_down.detach().float() * m.lora_scale
        _merge_into(m, name, delta)
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


__all__ = ["LoRALinear", "add_lora", "lora_state_dict", "load_lora", "merge_lora", "remove_lora",
           "lora_parameters", "lora_modules", "target_names", "parse_targets", "TARGETS", "DEFAULT_TARGETS"]
