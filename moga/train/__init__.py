"""Flow-matching training of `moga.model.WanModel` with MoGA's group-balancing loss.

`Trainer` works over any data source (`batch(index, size, device) -> Batch`); the demo model's
world lives in `moga.demo.data`. Checkpoints are safetensors + JSON (no pickle), resumable.
"""
from .trainer import Batch, DataSource, Trainer, TrainConfig, init_wan_weights, shift_sigma

__all__ = ["Batch", "DataSource", "Trainer", "TrainConfig", "init_wan_weights", "shift_sigma"]
