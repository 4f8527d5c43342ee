"""The MoGA format: the header metadata that turns a Wan file with router tensors into a MoGA
checkpoint (docs/checkpoint-format.md), its parsing and validation, and `save_checkpoint`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from ..attention import MoGAConfig
from ..model import WanConfig, WanModel
from .errors import CheckpointError
from .safetensors_io import write_safetensors

FORMAT_VERSION = "1"


def _num_heads(meta: Mapping[str, str], folder_cfg: Mapping) -> int | None:
    for value in (meta.get("moga.num_heads"), folder_cfg.get("num_attention_heads"), folder_cfg.get("num_heads")):
        if value not in (None, ""):
            return int(value)
    return None


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-29' or '0-9,20-29' -> sorted layer indices."""
    out = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-"))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CheckpointError(f"moga.layers {text!r} is not a list of layer indices like '0-29' or '0,2,4'") from None
    return tuple(sorted(out))


def format_layers(layers: Iterable[int]) -> str:
    """Sorted indices as ranges: (0, 1, 2, 5) -> '0-2,5'."""
    layers = sorted(set(int(i) for i in layers))
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


SAMPLER_KEYS = {"steps": int, "cfg": float, "shift": float, "schedule": str, "solver": str}


def sampler_metadata(**settings) -> dict[str, str]:
    """`moga.sampler.*` header keys: the sampler settings a checkpoint expects (a step-distilled model:
    steps=4, cfg=1.0, shift=5.0, schedule="distill"); `moga generate` uses them unless told otherwise."""
    bad = sorted(set(settings) - set(SAMPLER_KEYS))
    if bad:
        raise ValueError(f"unknown sampler settings {bad}; known: {sorted(SAMPLER_KEYS)}")
    return {f"moga.sampler.{k}": str(v) for k, v in settings.items() if v is not None}


def sampler_defaults(meta: Mapping[str, str], path="the file") -> dict:
    """Parse the `moga.sampler.*` keys of a header (absent keys: absent)."""
    from ..sampling import SCHEDULES, SOLVERS

    out = {}
    for k, kind in SAMPLER_KEYS.items():
        raw = meta.get(f"moga.sampler.{k}")
        if raw in (None, ""):
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise CheckpointError(f"{path}: moga.sampler.{k} = {raw!r} is not a {kind.__name__}") from None
        ok = {"steps": lambda v: v >= 1, "cfg": lambda v: v >= 0, "shift": lambda v: v > 0,
              "schedule": lambda v: v in SCHEDULES, "solver": lambda v: v in SOLVERS}[k](value)
        if not ok:
            raise CheckpointError(f"{path}: moga.sampler.{k} = {raw!r} is out of range; fix or drop the key")
        out[k] = value
    return out


def moga_metadata(cfg: MoGAConfig, layers: Iterable[int], dense_warmup: float = 0.0) -> dict[str, str]:
    """The header metadata of a MoGA checkpoint (docs/checkpoint-format.md)."""
    return {
        "moga.format_version": FORMAT_VERSION,
        "moga.num_groups": str(cfg.num_groups),
        "moga.window": ",".join(str(w) for w in cfg.window),
        "moga.context_frames": str(cfg.context_frames),
        "moga.layers": format_layers(layers),
        "moga.fusion": cfg.fusion,
        "moga.dense_warmup": repr(float(dense_warmup)),
        "moga.capacity": repr(float(cfg.capacity or 0.0)),
        "moga.capacity_split": cfg.capacity_split,
    }


def _moga_settings(meta: Mapping[str, str], cfg: WanConfig, path) -> tuple[MoGAConfig | None, float]:
    has_meta = any(k.startswith("moga.") and k not in ("moga.num_heads", "moga.extras") for k in meta)
    if not cfg.moga_layers:
        if has_meta and meta.get("moga.layers", "").strip():
            raise CheckpointError(f"{path}: its metadata names MoGA layers {meta['moga.layers']} but the "
                                  f"file has no router tensors (blocks.N.self_attn.router.weight): "
                                  f"re-run `moga patch` on the plain checkpoint")
        return None, 0.0
    version = meta.get("moga.format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: MoGA format version {version} is newer than this moga "
                              f"(reads {FORMAT_VERSION}): update the package")
    try:
        capacity = float(meta.get("moga.capacity", 0.0))
    except ValueError:
        raise CheckpointError(f"{path}: invalid MoGA metadata: moga.capacity {meta['moga.capacity']!r} is not a "
                              f"number (0 = off, 1.0 = the balanced group size)") from None
    try:
        m = int(meta.get("moga.num_groups", cfg.num_groups))
        window = MoGAConfig.parse_window(meta.get("moga.window", "0,2,2"))
        settings = MoGAConfig(num_groups=m, window=window,
                              context_frames=int(meta.get("moga.context_frames", 1)),
                              fusion=meta.get("moga.fusion", "mean"),
                              capacity=capacity, capacity_split=meta.get("moga.capacity_split", "runs"))
        warmup = float(meta.get("moga.dense_warmup", 0.0))
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid MoGA metadata: {exc}") from exc
    if m != cfg.num_groups:
        raise CheckpointError(f"{path}: metadata says moga.num_groups={m} but the routers have "
                              f"{cfg.num_groups} rows: the routers and the metadata disagree; re-run "
                              f"`moga patch`")
    if "moga.layers" in meta:
        layers = parse_layers(meta["moga.layers"])
        if layers != cfg.moga_layers:
            raise CheckpointError(f"{path}: metadata moga.layers={meta['moga.layers']} but routers exist for "
                                  f"layers {format_layers(cfg.moga_layers)}: the routers and the metadata "
                                  f"disagree; re-run `moga patch`")
    return settings, warmup


def save_checkpoint(model_or_state, path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors checkpoint. A WanModel is written under Wan's original names with its
    routers and MoGA metadata (from `model.moga_config`); a dict is written as given."""
    meta: dict[str, str] = {}
    if isinstance(model_or_state, WanModel):
        model = model_or_state
        sd = model.dit_state_dict()
        cfg = model.config
        if cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
            meta["moga.num_heads"] = str(cfg.num_heads)
        if cfg.moga_layers:
            mc = model.moga_config.replace(num_groups=cfg.num_groups)
            meta.update(moga_metadata(mc, cfg.moga_layers, model.dense_warmup))
    else:
        sd = dict(model_or_state)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return write_safetensors(path, sd, meta)
