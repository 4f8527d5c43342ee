"""`moga train wan`: fine-tune a Wan2.1 checkpoint into a MoGA checkpoint (and `moga train prepare`).

    moga train prepare CLIPS --out SHARDS --text-encoder WAN_DIR --vae WAN_DIR/vae --width 832 --height 480
    moga train wan --model wan2.1_t2v_1.3B_bf16.safetensors --data SHARDS --out RUN --mode routers --steps 1000
    torchrun --nproc-per-node 8 -m moga train wan ... --sp 2      # 4 data-parallel groups of 2 GPUs

Modes: "routers" (the base frozen), "lora" (routers + LoRA on the attention and FFN projections,
moga.train.lora), "full" (every weight). Sequence parallel (`--sp P`: Ulysses, routing before the
all-to-all) inside groups of P ranks, data parallel across groups, FSDP (`--fsdp`) for weights that do
not fit one GPU. Resumable: `OUT/state/`. Output: `OUT/moga.safetensors` (and `OUT/lora.safetensors`,
`--routers-out FILE`).

The parts, top to bottom:
  settings     TrainSettings: what a run is (modes, defaults, checks); no torch
  draws        every random draw from seeds: the batch order, each clip's timestep and noise
  routers      which layers route, new routers, the balance loss and group-size ratios
  distributed  torchrun's group, the device, the collectives of a step, FSDP
  trainer      WanTrainer: construction, one step, the loop and its log
  run_state    OUT/state/: save every N steps, resume exactly
  export       the MoGA checkpoint, the LoRA file, the router file, the run's record
  cli          the `wan` / `prepare` options and the runs they start; no torch until one runs

Shared with the demo model's generic trainer (moga.train.trainer): the objective (`shift_sigma`, the
balance loss) and the on-disk state format (moga.train.state). This loop adds what a Wan checkpoint
needs: clips of different shapes (one per forward, gradient accumulation), frozen bf16 weights beside
float32 trained ones, LoRA, sequence/data parallel, FSDP, and the MoGA checkpoint export.

The names below load on first use (as moga.train's), so `moga train wan --help` imports no torch.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "TrainSettings": "settings", "MODES": "settings", "ROUTER_INITS": "settings", "DEFAULT_LR": "settings",
    "STATE_DIR": "settings", "OUTPUT_NAME": "settings", "LORA_NAME": "settings",
    "draw": "draws", "epoch_order": "draws", "batch_indices": "draws",
    "routed_layers": "routers", "balance_terms": "routers", "add_routers": "routers", "random_routers": "routers",
    "default_device": "distributed", "init_distributed": "distributed",
    "WanTrainer": "trainer", "StepStats": "trainer",
    "main": "cli", "cmd_wan": "cli", "cmd_prepare": "cli",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
