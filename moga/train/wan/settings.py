"""What one `moga train wan` run is: its settings, checked when made, their defaults, its folder's names.

Imports no torch (the command line reads the defaults for `--help`); `torch_dtype` names the tensor dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

MODES = ("routers", "lora", "full")
ROUTER_INITS = ("auto", "checkpoint", "calibrate", "random")
DEFAULT_LR = {"routers": 1e-3, "lora": 1e-4, "full": 1e-5}  # full: the paper's constant 1e-5
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# the run folder (--out): state/ (moga.train.wan.run_state), train_log.jsonl, the outputs (moga.train.wan.export)
STATE_DIR = "state"
OUTPUT_NAME = "moga.safetensors"
LORA_NAME = "lora.safetensors"


def torch_dtype(name: str):
    """'bfloat16' -> torch.bfloat16 (one of DTYPE_NAMES)."""
    import torch
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


@dataclass
class TrainSettings:
    mode: str = "routers"
    steps: int = 1000
    lr: float | None = None               # None: DEFAULT_LR[mode]
    warmup: int = 0                       # linear warm-up steps, then constant (the paper: constant)
    batch: int = 1                        # clips per step, over all data-parallel groups
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    clip_grad: float = 1.0                # 0: no clipping
    balance_weight: float = 0.1           # alpha of the group-balancing loss (the paper's 0.1)
    balance_form: str = "paper"           # "paper" (Eq. 8) or "switch"
    shift: float = 5.0                    # timestep sampling: s = shift u / (1 + (shift - 1) u)
    num_groups: int = 5                   # M for new routers (the paper's 5 for Wan2.1)
    window: str = "0,2,2"
    context_frames: int = 1
    routers: str = "auto"                 # auto: the checkpoint's if it has them, else calibrate
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str = "self_attn,cross_attn,ffn"
    lora_output: str = "merged"           # merged | separate
    dtype: str = "bfloat16"               # storage of frozen weights and compute dtype
    grad_checkpointing: bool = True
    seed: int = 0
    save_every: int = 100
    sp: int = 1
    fsdp: bool = False
    backend: str = "auto"                 # varlen kernel

    def __post_init__(self):
        from ...attention.config import MoGAConfig
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.routers not in ROUTER_INITS:
            raise ValueError(f"routers must be one of {ROUTER_INITS}, got {self.routers!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.lora_output not in ("merged", "separate"):
            raise ValueError(f"lora_output must be 'merged' or 'separate', got {self.lora_output!r}")
        if self.balance_form not in ("paper", "switch"):
            raise ValueError(f"balance_form must be 'paper' or 'switch', got {self.balance_form!r}")
        for name in ("steps", "batch", "sp", "num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.warmup < 0:
            raise ValueError("save_every and warmup must be >= 0")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        self.betas = tuple(float(b) for b in self.betas)
        MoGAConfig.parse_window(self.window)

    def moga_config(self, num_groups: int):
        from ...attention.config import MoGAConfig
        return MoGAConfig(num_groups=num_groups, window=MoGAConfig.parse_window(self.window),
                          context_frames=self.context_frames, fusion="mean", backend=self.backend)

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr


def defaults() -> dict:
    """The settings' defaults by field name, without making (and checking) a TrainSettings."""
    return {f.name: f.default for f in fields(TrainSettings)}


__all__ = ["TrainSettings", "MODES", "ROUTER_INITS", "DEFAULT_LR", "DTYPE_NAMES", "STATE_DIR", "OUTPUT_NAME",
           "LORA_NAME", "torch_dtype", "defaults"]
