"""Router-only files: the routers of a MoGA model without its base weights (a few MB instead of 28 GB).

A router file is a safetensors file holding `blocks.{i}.self_attn.router.weight` [M, dim] (float32) for every
routed layer, the `moga.*` settings metadata of a MoGA checkpoint (docs/checkpoint-format.md), `moga.kind` =
"routers" and `moga.fingerprint`: what the base weights the routers were made on looked like, so that routers
put on other weights are a warning that names both.

The fingerprint (JSON) holds, for a few named tensors of the base (FINGERPRINT_KEYS): the shape, a sha256 of the
float32 values and a probe of PROBE_SIZE values at fixed evenly spaced positions. Exact hashes match only the
same bytes in the same precision; the probe also recognises the same weights stored in fp8, fp16, or with a
LoRA merged in (cosine similarity above PROBE_MATCH), which is what a user loads in ComfyUI.

`read_routers` also reads the routers embedded in a full MoGA checkpoint (any key layout).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..attention import MoGAConfig
from .errors import CheckpointError
from .layouts import canonical_key, detect_layout
from .moga_format import format_layers, moga_metadata, parse_layers
from .safetensors_io import TensorSource, write_safetensors

KIND = "routers"
PROBE_SIZE = 64
PROBE_MATCH = 0.98  # cosine similarity of probes: fp8 rounding or a LoRA stay above it, another model does not


def fingerprint_keys(num_layers: int) -> tuple[str, ...]:
    """The base tensors a fingerprint reads (canonical Wan names): first and last block, and the head."""
    last = num_layers - 1
    return ("blocks.0.self_attn.q.weight", f"blocks.{last}.self_attn.k.weight", "head.head.weight")


@dataclass(frozen=True)
class RouterSet:
    """Routers + the settings they were made with (what a router file holds)."""

    weights: dict          # {layer: [M, dim] float32}
    config: MoGAConfig     # the settings metadata (num_groups = M, window, fusion, capacity...)
    dense_warmup: float
    fingerprint: dict | None
    name: str              # file name, for messages
    kind: str = KIND       # "routers" (a router file) or "checkpoint" (embedded in a full MoGA checkpoint)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.weights))

    @property
    def num_groups(self) -> int:
        return next(iter(self.weights.values())).shape[0]


def tensor_probe(name: str, t: torch.Tensor) -> dict:
    """Shape, sha256 of the float32 values and PROBE_SIZE values at evenly spaced flat positions."""
    flat = t.detach().reshape(-1).to("cpu", torch.float32)
    idx = torch.linspace(0, flat.numel() - 1, min(PROBE_SIZE, flat.numel())).round().long()
    return {"name": name, "shape": list(t.shape),
            "sha256": hashlib.sha256(flat.contiguous().numpy().tobytes()).hexdigest(),
            "probe": [float(v) for v in flat[idx]]}


def make_fingerprint(get: Callable[[str], torch.Tensor], num_layers: int, source: str) -> dict:
    """`get(canonical name)` -> the base tensor (float values: fp8 dequantised by the caller)."""
    return {"source": source, "tensors": [tensor_probe(k, get(k)) for k in fingerprint_keys(num_layers)]}


def compare_fingerprint(expected: dict | None, get: Callable[[str], torch.Tensor]) -> tuple[str, str]:
    """('same' | 'close' | 'different' | 'unknown', why). `get` returns the base tensor of a name (or raises
    KeyError); 'close' is the same weights in another precision or with a LoRA merged in."""
    if not expected or not expected.get("tensors"):
        return "unknown", "the routers carry no fingerprint of their base weights"
    verdict = "same"
    for item in expected["tensors"]:
        try:
            now = tensor_probe(item["name"], get(item["name"]))
        except KeyError:
            return "different", f"the model has no tensor {item['name']}"
        if now["shape"] != item["shape"]:
            return "different", f"{item['name']} is {now['shape']} here but {item['shape']} in the routers' base"
        if now["sha256"] == item["sha256"]:
            continue
        a, b = torch.tensor(now["probe"], dtype=torch.float64), torch.tensor(item["probe"], dtype=torch.float64)
        cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
        if cos < PROBE_MATCH:
            return "different", f"{item['name']} differs (probe cosine similarity {cos:.3f})"
        verdict = "close"
    return verdict, ("the same weights" if verdict == "same" else
                     "the same weights in another precision or with a LoRA merged in")


def write_routers(path, weights: Mapping[int, torch.Tensor], config: MoGAConfig, dense_warmup: float = 0.0,
                  fingerprint: dict | None = None) -> Path:
    """Write a router file; config.num_groups must be the routers' row count."""
    weights = {int(i): torch.as_tensor(w).detach().float().cpu().contiguous() for i, w in weights.items()}
    if not weights:
        raise ValueError("no routers to write")
    rows = {w.shape[0] for w in weights.values()}
    if rows != {config.num_groups}:
        raise ValueError(f"the routers have {sorted(rows)} rows but the settings say {config.num_groups} groups")
    meta = moga_metadata(config, sorted(weights), dense_warmup)
    meta["moga.kind"] = KIND
    if fingerprint is not None:
        meta["moga.fingerprint"] = json.dumps(fingerprint)
    tensors = {f"blocks.{i}.self_attn.router.weight": w for i, w in sorted(weights.items())}
    path = Path(path)
    write_safetensors(path, tensors, meta)
    return path


def read_routers(path, name: str | None = None) -> RouterSet:
    """The routers of a router file or of a full MoGA checkpoint (any key layout), with their settings."""
    path = Path(path)
    name = name or path.name
    source = TensorSource(path)
    try:
        keys = source.keys()
        layout = detect_layout(keys) or "wan"
        found = {}
        for key in keys:
            canon = canonical_key(key, layout)
            if canon and canon.startswith("blocks.") and canon.endswith(".self_attn.router.weight"):
                found[int(canon.split(".")[1])] = key
        if not found:
            raise CheckpointError(
                f"{name} holds no MoGA routers (no blocks.N.self_attn.router.weight): make a router file for this "
                f"model with `python -m moga patch {path.name} --routers-out models/moga/ROUTERS.safetensors`")
        weights = {i: source.get(k).float() for i, k in sorted(found.items())}
        meta = source.metadata
        embedded = None
        if meta.get("moga.kind") != KIND and not meta.get("moga.fingerprint"):
            embedded = _own_fingerprint(source, layout, name)  # a full checkpoint is its own base
    finally:
        source.close()
    rows = {w.shape[0] for w in weights.values()}
    if len(rows) != 1:
        raise CheckpointError(f"{name}: the routers disagree on the group count ({sorted(rows)} rows)")
    m = rows.pop()
    try:
        config = MoGAConfig(num_groups=int(meta.get("moga.num_groups", m)),
                            window=MoGAConfig.parse_window(meta.get("moga.window", "0,2,2")),
                            context_frames=int(meta.get("moga.context_frames", 1)),
                            fusion=meta.get("moga.fusion", "mean"),
                            capacity=float(meta.get("moga.capacity", 0.0)),
                            capacity_split=meta.get("moga.capacity_split", "runs"))
        warmup = float(meta.get("moga.dense_warmup", 0.0))
        fingerprint = json.loads(meta["moga.fingerprint"]) if meta.get("moga.fingerprint") else embedded
    except ValueError as exc:
        raise CheckpointError(f"{name}: invalid MoGA metadata: {exc}") from exc
    if config.num_groups != m:
        raise CheckpointError(f"{name}: metadata says {config.num_groups} groups but the routers have {m} rows")
    if "moga.layers" in meta and parse_layers(meta["moga.layers"]) != tuple(sorted(weights)):
        raise CheckpointError(f"{name}: metadata moga.layers={meta['moga.layers']} but routers exist for layers "
                              f"{format_layers(sorted(weights))}")
    kind = KIND if meta.get("moga.kind") == KIND else "checkpoint"
    return RouterSet(weights, config, warmup, fingerprint, name, kind)


def calibrate_router_file(src, dst, num_groups: int, layers=None, window="0,2,2", context_frames: int = 1,
                          fusion: str | None = None, dense_warmup: float | None = None, capacity: float | None = None,
                          **calibration) -> RouterSet:
    """`moga patch SRC --routers-out DST`: calibrate routers on SRC (as `patch_checkpoint`, the same defaults)
    and write only them, with SRC's fingerprint. `calibration` goes to `calibrate_routers` (size, steps, seed,
    device, dtype, num_heads, loras...); with loras the fingerprint stays SRC's (the LoRA'd weights read "close")."""
    from .calibrate import CALIBRATED_CAPACITY, CALIBRATED_DENSE_WARMUP, calibrate_routers
    from .inspection import plan_checkpoint

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"--routers-out {dst} is the source checkpoint: write the routers to a new file")
    plan = plan_checkpoint(src, num_heads=calibration.get("num_heads"))
    chosen = tuple(range(plan.config.num_layers)) if layers is None else tuple(sorted(int(i) for i in layers))
    if isinstance(window, str):
        window = MoGAConfig.parse_window(window)
    config = MoGAConfig(num_groups=int(num_groups), window=window, context_frames=context_frames,
                        fusion=fusion or "lse", capacity=CALIBRATED_CAPACITY if capacity is None else capacity)
    weights = calibrate_routers(src, int(num_groups), chosen, **calibration)
    source = TensorSource(src)
    try:
        fingerprint = _own_fingerprint(source, detect_layout(source.keys()) or "wan", src.name)
    finally:
        source.close()
    warmup = CALIBRATED_DENSE_WARMUP if dense_warmup is None else dense_warmup
    write_routers(dst, weights, config, warmup, fingerprint)
    return read_routers(dst)


def file_fingerprint(path) -> dict | None:
    """The fingerprint of a checkpoint file's base weights (any key layout; None when it has no Wan blocks)."""
    path = Path(path)
    source = TensorSource(path)
    try:
        return _own_fingerprint(source, detect_layout(source.keys()) or "wan", path.name)
    finally:
        source.close()


def _own_fingerprint(source: TensorSource, layout: str, name: str) -> dict | None:
    by_canon = {canonical_key(k, layout): k for k in source.keys()}
    blocks = {int(c.split(".")[1]) for c in by_canon if c and c.startswith("blocks.")}
    if not blocks:
        return None

    def get(canon):
        t = source.get(by_canon[canon]).float()
        scale = by_canon.get(canon[: -len("weight")] + "scale_weight")  # ComfyUI scaled fp8
        return t * source.get(scale).float() if scale else t
    try:
        return make_fingerprint(get, max(blocks) + 1, name)
    except KeyError:
        return None


__all__ = ["RouterSet", "read_routers", "write_routers", "calibrate_router_file", "make_fingerprint",
           "file_fingerprint",
           "compare_fingerprint", "tensor_probe", "fingerprint_keys", "PROBE_MATCH"]
