"""Flow-matching training of `moga.model.WanModel` with MoGA's group-balancing loss.

`Trainer` works over any data source (`batch(index, size, device) -> Batch`); the demo model's
world lives in `moga.demo.data`. Checkpoints are safetensors + JSON (no pickle), resumable.

The parts: `trainer` (this generic trainer), `state` (its on-disk state), `data` (`prepare`: clips ->
shards), `lora` (trainable LoRA layers), `sp` (training's sequence-parallel exchange), `wan/` (fine-tuning
Wan checkpoints; its docstring lists its parts), `commands` (the subcommands of `python -m moga.train`).

The names below load on first use, so `moga train --help` answers without importing torch.
"""
from __future__ import annotations

import importlib

__all__ = ["Batch", "DataSource", "Trainer", "TrainConfig", "init_wan_weights", "shift_sigma"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
