"""Wan2.2 A14B: two expert DiTs sampled as one model (high noise first, then low noise).

Wan2.2 switches at a boundary timestep: the high-noise expert runs every step whose timestep is at or
above `boundary * 1000`, the low-noise expert every step below it (Wan2.2's `boundary`: 0.875 for
T2V A14B, 0.9 for I2V A14B). Each expert keeps its own routers and MoGA settings (`moga_config`,
`dense_warmup`), so `moga patch` calibrates each on its own.

Memory: with `offload=True` the expert not in use lives on the CPU and moves to the device when its
turn comes. A run switches once (high -> low), so it costs one host-to-device copy of each expert
(a 14B expert: 28.6 GB in bf16, 14.3 GB in fp8; about 1-2 s at 25 GB/s over PCIe 4/5 x16 from pinned
memory, several seconds from pageable memory) plus one device-to-host copy of the high expert, and
host RAM for the idle expert; on the device only one expert is resident at a time. Without offload
both live on the device (57 GB in bf16 for the pair, before activations).
"""
from __future__ import annotations

import torch

BOUNDARY_T2V = 0.875
BOUNDARY_I2V = 0.9
NUM_TRAIN_TIMESTEPS = 1000


def default_boundary(config) -> float:
    """Wan2.2's boundary for a config: I2V (an image-conditioned expert) 0.9, T2V 0.875."""
    return BOUNDARY_I2V if getattr(config, "conditioning", "none") != "none" else BOUNDARY_T2V


class ExpertPair:
    """`high` and `low` WanModels of one shape; `expert_for(timestep)` picks (and, with offload,
    places) the one a step runs. The sampler duck-types on `expert_for`."""

    def __init__(self, high, low, boundary: float | None = None, offload: bool = False, device=None):
        if high.config.replace(num_groups=0, moga_layers=()) != low.config.replace(num_groups=0, moga_layers=()):
            raise ValueError(f"the two experts differ in shape ({high.config.name} vs {low.config.name}): "
                             f"give the high- and low-noise files of one Wan2.2 A14B model")
        self.high, self.low = high, low
        self.boundary = default_boundary(high.config) if boundary is None else float(boundary)
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"the expert boundary is a fraction of the timestep range in (0, 1), got {boundary!r}")
        self.offload = bool(offload)
        self.device = _normal(torch.device(device) if device is not None else high.device)
        self.switches = 0  # host<->device moves done (offload), for tests and logs

    @property
    def config(self):
        return self.high.config

    @property
    def moga_config(self):
        return self.high.moga_config

    def parameters(self):
        return iter([torch.empty(0, device=self.device)])

    @property
    def boundary_timestep(self) -> float:
        return self.boundary * NUM_TRAIN_TIMESTEPS

    def name_for(self, timestep: float) -> str:
        return "high" if float(timestep) >= self.boundary_timestep else "low"

    def expert_for(self, timestep: float):
        """The expert of a step with this timestep, moved to the device if offloading."""
        name = self.name_for(timestep)
        net, other = (self.high, self.low) if name == "high" else (self.low, self.high)
        if self.offload:
            if other.device.type != "cpu":
                other.to("cpu")
                self.switches += 1
            if _normal(net.device) != self.device:
                net.to(self.device)
                self.switches += 1
        return net

    def to(self, device):
        self.device = _normal(torch.device(device))
        if not self.offload:
            self.high.to(device)
            self.low.to(device)
        return self


def _normal(device: torch.device) -> torch.device:
    """cuda -> cuda:N (the current device), so that device comparisons mean what they say."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


__all__ = ["ExpertPair", "default_boundary", "BOUNDARY_T2V", "BOUNDARY_I2V"]
