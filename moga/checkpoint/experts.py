"""Wan2.2 A14B expert pairs on disk: two files (high noise, low noise) or one folder holding both.

Accepted folders: Wan-AI's release (`high_noise_model/` and `low_noise_model/` subfolders, each a
diffusers-style shard set) or a folder with exactly two safetensors files whose names say
`high_noise` and `low_noise` (ComfyUI's repackaged `wan2.2_*_high_noise_14B_*.safetensors` names).
"""
from __future__ import annotations

from pathlib import Path

from ..experts import ExpertPair
from .errors import CheckpointError
from .loader import load_model


def find_experts(path) -> tuple[Path, Path] | None:
    """(high, low) inside a folder that holds a Wan2.2 A14B pair, else None (one model)."""
    path = Path(path)
    if not path.is_dir():
        return None
    high, low = path / "high_noise_model", path / "low_noise_model"
    if high.is_dir() and low.is_dir():
        return high, low
    files = sorted(path.glob("*.safetensors"))
    hi = [f for f in files if "high_noise" in f.name.lower()]
    lo = [f for f in files if "low_noise" in f.name.lower()]
    if hi or lo:
        if len(hi) != 1 or len(lo) != 1:
            raise CheckpointError(
                f"{path} holds {len(hi)} high-noise and {len(lo)} low-noise expert files "
                f"({', '.join(f.name for f in hi + lo)}): keep one of each, or pass both files "
                f"(--model HIGH --model-low LOW)")
        return hi[0], lo[0]
    return None


def load_experts(high, low=None, boundary: float | None = None, offload: bool = False, device="cpu",
                 loras=None, loras_low=None, **load_kwargs) -> ExpertPair:
    """Load a Wan2.2 A14B pair (`high` and `low` files/folders, or one folder holding both) as an
    ExpertPair. offload=True keeps the expert not in use on the CPU (see moga.experts for the cost).
    loras / loras_low: [(file, strength)] merged into the high / low expert (Wan2.2 LoRAs come as a
    high and a low file). load_kwargs go to `load_model` for both experts (dtype, num_heads, ...)."""
    if low is None:
        found = find_experts(high)
        if found is None:
            raise CheckpointError(f"{high} is not a folder holding a Wan2.2 A14B expert pair "
                                  f"(high_noise_model/ + low_noise_model/, or *high_noise* + *low_noise* "
                                  f"files): pass the low-noise expert too")
        high, low = found
    where = "cpu" if offload else device
    h = _load_expert("high-noise", high, where, loras, load_kwargs)
    lo = _load_expert("low-noise", low, where, loras_low, load_kwargs)
    try:
        return ExpertPair(h, lo, boundary=boundary, offload=offload, device=device)
    except ValueError as exc:
        raise CheckpointError(f"{high} + {low}: {exc}") from exc


def _load_expert(which: str, path, device, loras, load_kwargs):
    """load_model for one expert; its errors say which expert (a LoRA made for the other one fails here)."""
    try:
        return load_model(path, device=device, loras=loras, **load_kwargs)
    except CheckpointError as exc:
        raise CheckpointError(f"the {which} expert ({Path(path).name}): {exc}") from exc


__all__ = ["find_experts", "load_experts"]
