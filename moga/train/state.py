"""Training state on disk without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds
    weights.safetensors     the trained modules' tensors (a model's own names, prefixed per module)
    ema.safetensors         the exponential moving average of the weights (when kept)
    optimizer.safetensors   AdamW moments per parameter name ("exp_avg/NAME", "exp_avg_sq/NAME")
                            and per-parameter step counts ("step/NAME")
    state.json              step, config, log history, data-source position
Files over `max_file_bytes` are cut into numbered shards (NAME.0.safetensors, NAME.1.safetensors, ...)
so each fits a transfer limit; reading joins them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from ..outputs import save_safetensors, write_text


def save_tensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 max_file_bytes: int | None = None) -> list[Path]:
    """Write tensors to `path` (one file), or to `stem.K.safetensors` shards of at most
    `max_file_bytes` of tensor data each. Each file is written atomically; old files of the same
    name that the new set does not replace are removed only after it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = _shards(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    groups: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if max_file_bytes and groups[-1] and size + n > max_file_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = tensors[k]
        size += n
    if len(groups) == 1:
        targets = [path]
    else:
        targets = [path.with_name(f"{path.stem}.{i}{path.suffix}") for i in range(len(groups))]
    for target, group in zip(targets, groups):
        save_safetensors(group, target, metadata={**meta, "shards": str(len(groups))})
    for old in stale:
        if old not in targets:
            old.unlink()
    return targets


def _shards(path: Path) -> list[Path]:
    found = [path] if path.exists() else []
    i = 0
    while True:
        shard = path.with_name(f"{path.stem}.{i}{path.suffix}")
        if not shard.exists():
            break
        found.append(shard)
        i += 1
    return found


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read what `save_tensors` wrote (one file or its shards)."""
    path = Path(path)
    files = _shards(path)
    if not files:
        raise FileNotFoundError(f"{path} (or its shards {path.stem}.0{path.suffix}, ...) does not exist")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f), device=str(device)))
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str],
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An Adam-family optimizer's per-parameter state as named tensors (moments optionally cast)."""
    out = {}
    for p, st in optimizer.state.items():
        name = names[p]
        for key, value in st.items():
            if not torch.is_tensor(value):
                value = torch.tensor(float(value))
            if dtype is not None and value.is_floating_point() and value.dim() > 0:
                value = value.to(dtype)
            out[f"{key}/{name}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                           tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`: restore each named parameter's state (cast to its dtype/device)."""
    by_param: dict[torch.nn.Parameter, dict] = {}
    for key, value in tensors.items():
        field, _, name = key.partition("/")
        if name not in params:
            raise ValueError(f"optimizer state names {name!r}, which the model does not have")
        p = params[name]
        if value.dim() > 0:
            value = value.to(device=p.device, dtype=p.dtype)
        else:
            value = value.float()  # Adam keeps its step count as a float32 scalar tensor
        by_param.setdefault(p, {})[field] = value
    for p, st in by_param.items():
        optimizer.state[p] = st


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
