"""LoRAs merged into a Wan DiT's weights at load (docs/loras.md).

    model = load_model("wan2.1_t2v_14B_bf16.safetensors", loras=[("lightx2v_distill.safetensors", 1.0)])

Layouts read (one safetensors file each; names are matched against the model's own weights):
  - ComfyUI / kohya / musubi: `lora_unet_blocks_0_self_attn_q.lora_up.weight`, `.lora_down.weight`, `.alpha`
    (also Wan Fun's `lora_unet__blocks_...`);
  - diffusers / PEFT: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` / `.lora_B.weight`, under any of
    the prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`, and with
    Wan's names or diffusers' (`transformer.blocks.0.attn1.to_q.lora_A.weight`);
  - full deltas: `X.diff` (the weight's, or the tensor X's own, e.g. `blocks.0.modulation.diff`), `X.diff_b`
    (the bias'), as step-distill LoRAs carry them for norms and biases.

Merge: W' = W + sum_files strength * (alpha / rank) * (up @ down) + strength * diff, computed in float32 on
the weight's device (alpha absent: scale 1), rounded once to the stored dtype. An fp8 weight is first
dequantised (times its `scale_weight` for ComfyUI's scaled fp8); `fp8="compute"` (default) keeps the merged
weight in the compute dtype (exact, 2 bytes a weight instead of 1), `fp8="fp8"` requantises it to the file's
fp8 dtype with a fresh per-tensor scale (the file's memory, fp8 rounding of the whole weight).
Every file is read and checked against the model before any weight changes.

Writing (`write_lora`, `lora_tensors`): ComfyUI's layout, `diffusion_model.blocks.0.self_attn.q.lora_down.weight`
/ `.lora_up.weight` / `.alpha` (what `moga train wan --lora-output separate` writes, and what ComfyUI's
LoraLoader and this reader take).
"""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..model import FP8_DTYPES
from .errors import CheckpointError
from .layouts import wan_to_diffusers
from .safetensors_io import TensorSource, write_safetensors

# (up, down) suffix pairs, as trainers write them (up = B [out, r], down = A [r, in])
_PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
          ("lora.up.weight", "lora.down.weight"), ("lora_B.default.weight", "lora_A.default.weight"),
          ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"))
_DIFFS = {"diff": "diff", "diff_b": "diff_b", "w_norm": "diff", "b_norm": "diff_b"}
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
# adapters that are not a plain low-rank update: refused with their name rather than merged wrongly
_UNSUPPORTED = {"lora_mid.weight": "LoCon (lora_mid)", "dora_scale": "DoRA (dora_scale)", "hada_": "LoHa",
                "lokr_": "LoKr", "oft_": "OFT", "set_weight": "set_weight", "reshape_weight": "reshape_weight"}
# Wan DiT widths -> what a LoRA of that width was made for (for the "another model" error)
_WIDTHS = {1536: "Wan2.1 T2V 1.3B (width 1536)", 3072: "Wan2.2 TI2V-5B (width 3072)",
           5120: "a Wan 14B model (Wan2.1 14B or Wan2.2 A14B, width 5120)"}
FP8_MODES = ("compute", "fp8")
LORA_PREFIX = "diffusion_model."  # the prefix of the layout written here (ComfyUI's name for the DiT)


@dataclass
class LoraTerm:
    """One update of one model tensor from one file."""

    target: str                        # canonical model tensor name (blocks.0.self_attn.q.weight)
    up: torch.Tensor | None = None     # low rank: [out, r(, 1...)]
    down: torch.Tensor | None = None   # [r, in(, k...)]
    alpha: float | None = None
    diff: torch.Tensor | None = None   # full delta, the target's shape
    keys: list = field(default_factory=list)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self, device) -> torch.Tensor:
        if self.diff is not None:
            return self.diff.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down) * self.scale


def parse_lora_spec(text: str) -> tuple[str, float]:
    """'FILE' or 'FILE:STRENGTH' (the CLI's --lora) -> (file, strength). A colon that is part of an
    existing file's name stays in the name."""
    text = str(text)
    if os.path.exists(text) or ":" not in text:
        return text, 1.0
    path, _, tail = text.rpartition(":")
    try:
        strength = float(tail)
    except ValueError:
        raise CheckpointError(f"--lora {text!r}: the strength {tail!r} is not a number: write FILE:STRENGTH, "
                              f"e.g. {path or 'lora.safetensors'}:0.8 (or FILE alone for 1.0)") from None
    return path, strength


def lora_specs(specs) -> list[tuple[str, float]]:
    """Command-line values ['FILE[:STRENGTH]', ...] -> checked [(file, strength), ...]."""
    return check_loras([parse_lora_spec(s) for s in specs or []])


def check_loras(loras) -> list[tuple[str, float]]:
    """[(file, strength), ...] (a bare file: strength 1.0), validated: files exist, strengths are numbers."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)) or (isinstance(loras, tuple) and len(loras) == 2
                                                  and isinstance(loras[1], numbers.Number)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            path, strength = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, strength = item
        else:
            raise CheckpointError(f"a LoRA is (file, strength) or a file, got {item!r}: pass "
                                  f"loras=[('style.safetensors', 0.8)]")
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise CheckpointError(f"LoRA {path}: strength {strength!r} is not a number: give a float such as "
                                  f"1.0 (0 = off, negative subtracts)")
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"LoRA {path} does not exist or is not a file: give the path of a LoRA "
                                  f".safetensors file")
        out.append((str(path), float(strength)))
    return out


def _aliases(model) -> tuple[dict[str, str], dict[str, str]]:
    """Model tensor names -> the module names LoRAs use: dotted {name: canonical module} and flat
    (dots as underscores, kohya's names). Both Wan's names and diffusers' point to the same module."""
    dotted = {}
    for name, _ in model.named_parameters():
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        dotted[module] = module
        diff = wan_to_diffusers(name)
        dotted[diff[: -len(".weight")] if diff.endswith(".weight") else diff] = module
    flat = {k.replace(".", "_"): v for k, v in dotted.items()}
    return dotted, flat


def _split(key: str):
    """(module name in the file, what the tensor is) or (None, adapter name) for a refused adapter."""
    for part, what in _UNSUPPORTED.items():
        if key.endswith("." + part) or ("." + part in key and part.endswith("_")):
            return None, what
    for up, down in _PAIRS:
        for sfx, kind in ((up, "up"), (down, "down")):
            if key.endswith("." + sfx):
                return key[: -len(sfx) - 1], kind
    mod, _, last = key.rpartition(".")
    if last == "alpha":
        return mod, "alpha"
    if last in _DIFFS:
        return mod, _DIFFS[last]
    return key, None


def _resolve(module: str, dotted, flat) -> str | None:
    for p in _DOTTED_PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
            break
    for p in _FLAT_PREFIXES:
        if module.startswith(p):
            return flat.get(module[len(p):])
    return dotted.get(module) or flat.get(module)


def read_lora(lora, model) -> list[LoraTerm]:
    """The updates one LoRA makes to `model` (a WanModel), checked against its tensors' names and shapes;
    raises CheckpointError naming the problem and the fix. `lora`: a .safetensors file, or the tensors
    of one as a mapping (name -> tensor, e.g. what `lora_tensors` makes)."""
    if isinstance(lora, Mapping):
        path, keys, get, close = "(given tensors)", list(lora), lora.__getitem__, None
    else:
        path = Path(lora)
        try:
            src = TensorSource(path)
        except CheckpointError as exc:
            raise CheckpointError(f"LoRA: {exc} (LoRAs are read from .safetensors files only)") from None
        if src.path.is_dir():
            raise CheckpointError(f"LoRA {path} is a folder: give the LoRA's .safetensors file")
        keys, get, close = src.keys(), src.get, src.close
    try:
        terms = _read_terms(path, keys, get, model)
    finally:
        if close is not None:
            close()
    for t in terms:
        _check_term(t, model.get_parameter(t.target), path, model)
    return terms


def _read_terms(path, keys, get, model) -> list[LoraTerm]:
    params = dict(model.named_parameters())
    dotted, flat = _aliases(model)
    terms: dict[tuple[str, str], LoraTerm] = {}
    unmatched, refused, not_lora = [], set(), []
    for key in keys:
        module, kind = _split(key)
        if module is None:
            refused.add(kind)
            continue
        if kind is None:
            not_lora.append(key)
            continue
        canon = _resolve(module, dotted, flat)
        if canon is None:
            unmatched.append(key)
            continue
        if kind == "diff_b":
            target = canon + ".bias"
        elif kind == "diff":
            target = canon + ".weight" if canon + ".weight" in params else canon
        else:
            target = canon + ".weight"
        if target not in params:
            unmatched.append(key)
            continue
        term = terms.setdefault((target, "diff" if kind in ("diff", "diff_b") else "lora"), LoraTerm(target))
        term.keys.append(key)
        if kind == "alpha":
            a = get(key)
            if a.numel() != 1:
                raise CheckpointError(f"LoRA {path}: {key} has shape {tuple(a.shape)}, an alpha is one number: "
                                      f"the file is damaged; fetch it again")
            term.alpha = float(a.reshape(()))
        else:
            setattr(term, "diff" if kind in ("diff", "diff_b") else kind, get(key))
    if refused:
        raise CheckpointError(f"LoRA {path} uses {', '.join(sorted(refused))}, which this loader does not merge "
                              f"(plain low-rank LoRAs and .diff deltas only): use a plain LoRA, or apply it with "
                              f"ComfyUI's LoraLoader to a Wan model outside MoGA")
    if not_lora and not terms and not unmatched:
        raise CheckpointError(f"{path} is not a LoRA: none of its {len(keys)} tensors ({', '.join(keys[:3])}, ...) "
                              f"is a lora_up/lora_down, lora_A/lora_B or .diff tensor; a full model is loaded as "
                              f"the model, not as a LoRA")
    if unmatched or not_lora:
        bad = unmatched + not_lora
        raise CheckpointError(f"LoRA {path}: {len(bad)} of its {len(keys)} tensors match no weight of this "
                              f"{model.config.name} ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
                              f"{_made_for(bad, model)}")
    return list(terms.values())


def _made_for(keys, model) -> str:
    """Why keys match nothing: the model the LoRA looks made for, else the generic fix."""
    cfg = model.config
    joined = " ".join(keys)
    if re.search(r"k_img|v_img|img_emb|add_k_proj|add_v_proj|image_embedder", joined):
        return (": it looks made for an image-to-video Wan model (image cross-attention k_img/v_img); use a LoRA "
                "made for this text-to-video model")
    blocks = [int(b) for b in re.findall(r"blocks[._](\d+)[._]", joined)]
    if blocks and max(blocks) >= cfg.num_layers:
        return (f": it has blocks up to {max(blocks)}, this model has {cfg.num_layers} (0-{cfg.num_layers - 1}); "
                f"it is made for a deeper model (Wan 14B has 40 blocks, 1.3B 30): use a LoRA made for this model")
    if re.search(r"double_blocks|single_blocks|transformer_blocks|input_blocks|down_blocks|lora_te", joined):
        return ": its names are another architecture's (not a Wan DiT's): use a LoRA made for Wan"
    return ": it is not a LoRA for a Wan DiT, or it uses names this loader does not know (docs/loras.md)"


def _check_term(t: LoraTerm, weight: torch.Tensor, path, model) -> None:
    where = f"LoRA {path}: {t.target}"
    if t.diff is not None:
        got = tuple(t.diff.shape)
    else:
        if t.up is None or t.down is None:
            missing = "up (lora_up / lora_B)" if t.up is None else "down (lora_down / lora_A)"
            raise CheckpointError(f"{where} lacks its {missing} tensor ({', '.join(t.keys)} found): the file "
                                  f"is incomplete; fetch it again")
        r_up, r_down = t.up.flatten(1).shape[1], t.down.shape[0]
        if r_up != r_down:
            raise CheckpointError(f"{where}: up has rank {r_up} but down rank {r_down} (shapes {tuple(t.up.shape)}, "
                                  f"{tuple(t.down.shape)}): the file is damaged or mixes two LoRAs")
        got = (t.up.shape[0], *t.down.shape[1:])
        if math.prod(got) == weight.numel() and weight.dim() > 2:
            got = tuple(weight.shape)  # a conv weight written flat
    if tuple(got) != tuple(weight.shape):
        widths = [w for w in got if w in _WIDTHS and w != model.config.dim]
        made = f"it looks made for {_WIDTHS[widths[0]]}" if widths else "it is made for another model"
        raise CheckpointError(f"{where}: the LoRA's update has shape {tuple(got)} but this model's tensor is "
                              f"{tuple(weight.shape)}: {made}, and this model is {model.config.name} (width "
                              f"{model.config.dim}); use a LoRA made for this model")


@torch.no_grad()
def merge_loras(model, loras, fp8: str = "compute") -> list[tuple[str, float]]:
    """Merge [(file, strength), ...] into `model`'s weights in place (see the module docstring);
    returns the validated list (also set as `model.loras`). Nothing changes when any file is bad."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"lora fp8 mode must be one of {FP8_MODES}, got {fp8!r}")
    loras = check_loras(loras)
    read = [(read_lora(path, model), strength) for path, strength in loras]  # all checked before any change
    params = dict(model.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    for terms, strength in read:
        if strength == 0:
            continue
        for t in terms:
            w = params[t.target]
            d = t.delta(w.device).reshape(w.shape) * strength
            deltas[t.target] = d if t.target not in deltas else deltas[t.target] + d
    for target, d in deltas.items():
        _merge_one(model, target, d, fp8)
    model.loras = list(loras)
    return list(loras)


def _merge_one(model, target: str, delta: torch.Tensor, fp8: str) -> None:
    owner, _, leaf = target.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    w = module._parameters[leaf]
    scale = module._buffers.get("scale_weight") if leaf == "weight" else None
    merged = w.float() * (scale.float() if scale is not None else 1.0) + delta
    if w.dtype in FP8_DTYPES:
        if fp8 == "fp8":
            new_scale = (merged.abs().max() / torch.finfo(w.dtype).max).clamp(min=1e-12).reshape(())
            new = (merged / new_scale).to(w.dtype)
            module.register_buffer("scale_weight", new_scale.float())
        else:
            new = merged.to(getattr(model, "compute_dtype", None) or torch.bfloat16)
            module._buffers.pop("scale_weight", None)
    else:
        new = merged.to(w.dtype)
    module._parameters[leaf] = torch.nn.Parameter(new, requires_grad=False)


def lora_tensors(factors: Mapping[str, tuple], prefix: str = LORA_PREFIX) -> dict[str, torch.Tensor]:
    """{module name: (down [rank, in], up [out, rank], alpha)} -> a LoRA's tensors in ComfyUI's layout
    (`{prefix}{module}.lora_down.weight`, `.lora_up.weight`, `.alpha`), float32 on the CPU."""
    out = {}
    for module, (down, up, alpha) in factors.items():
        out[f"{prefix}{module}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{prefix}{module}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{prefix}{module}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lora(path, factors: Mapping[str, tuple], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a LoRA file (`lora_tensors`' layout, atomically); returns its path."""
    return write_safetensors(path, lora_tensors(factors), metadata)


__all__ = ["LoraTerm", "check_loras", "lora_specs", "merge_loras", "parse_lora_spec", "read_lora", "FP8_MODES",
           "LORA_PREFIX", "lora_tensors", "write_lora"]
