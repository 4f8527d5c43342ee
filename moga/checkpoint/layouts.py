"""Key layouts of published Wan DiT files: Wan's original names (canonical here), ComfyUI's
(`model.diffusion_model.` prefix) and diffusers' (WanTransformer3DModel), and the mapping between them."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

PREFIX_COMFYUI = "model.diffusion_model."
LAYOUTS = ("wan", "comfyui", "diffusers")
EXTRA_PREFIXES = ("text_encoder.", "vae.", "extras.")  # never DiT keys: they belong to the extras

# Wan original -> diffusers (WanTransformer3DModel), prefixes of the part after `blocks.N.` / of the
# whole key; an entry without a trailing dot matches the whole remainder exactly.
_DIFFUSERS_BLOCK = [
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."), ("self_attn.router.", "attn1.router."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."), ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."), ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."), ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_DIFFUSERS_TOP = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"), ("head.head.", "proj_out."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(rest: str, table, reverse: bool) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if src.endswith("."):
            if rest.startswith(src):
                return dst + rest[len(src):]
        elif rest == src:
            return dst
    return None


def wan_to_diffusers(key: str) -> str:
    m = _BLOCK_RE.match(key)
    if m:
        new = _rename(m.group(2), _DIFFUSERS_BLOCK, False)
        return f"blocks.{m.group(1)}.{new}" if new else key
    return _rename(key, _DIFFUSERS_TOP, False) or key


def diffusers_to_wan(key: str) -> str | None:
    m = _BLOCK_RE.match(key)
    if m:
        new = _rename(m.group(2), _DIFFUSERS_BLOCK, True)
        return f"blocks.{m.group(1)}.{new}" if new else None
    return _rename(key, _DIFFUSERS_TOP, True)


def detect_layout(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith(PREFIX_COMFYUI) for k in keys):
        return "comfyui"
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in keys):
        return "diffusers"
    if any(k in ("head.modulation", "patch_embedding.weight") or k.startswith("blocks.") for k in keys):
        return "wan"
    return None


def canonical_key(key: str, layout: str) -> str | None:
    """The Wan-original name of `key` in `layout`, or None when it is no DiT key."""
    if key.startswith(EXTRA_PREFIXES):
        return None
    if layout == "comfyui":
        if key.startswith(PREFIX_COMFYUI):
            return key[len(PREFIX_COMFYUI):]
        return key if key == "scaled_fp8" else None
    if layout == "diffusers":
        if key == "scaled_fp8":
            return key
        for suffix in ("scale_weight", "scale_input"):
            if key.endswith("." + suffix):
                base = diffusers_to_wan(key[: -len(suffix)] + "weight")
                return base[: -len("weight")] + suffix if base else None
        return diffusers_to_wan(key)
    return key


def to_layout(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a Wan-original state dict into `layout` ("wan", "comfyui", "diffusers")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "wan":
        return dict(sd)
    if layout == "comfyui":
        return {PREFIX_COMFYUI + k: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        suffix = k.rsplit(".", 1)[-1]
        if suffix in ("scale_weight", "scale_input"):
            out[wan_to_diffusers(k[: -len(suffix)] + "weight")[: -len("weight")] + suffix] = v
        else:
            out[wan_to_diffusers(k)] = v
    return out


def router_key(layer: int, layout: str) -> str:
    """Where a router lives in a file of `layout` (canonical: blocks.{i}.self_attn.router.weight)."""
    return to_layout({f"blocks.{layer}.self_attn.router.weight": None}, layout).popitem()[0]
