"""Every random draw of a run, from seeds alone: the clips of each step's global batch, and each clip's
timestep and noise.

Each draw is seeded by (seed, step, position in the global batch), never by a rank or a generator's
history, so any world size and any resume sees the same draws; the data order is a seeded permutation
per epoch.
"""
from __future__ import annotations

import hashlib

import torch

from ..trainer import shift_sigma


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (blake2b of their decimal text: stable across processes and versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def draw(seed: int, step: int, index: int, shape, shift: float) -> tuple[float, torch.Tensor]:
    """(sigma, noise) of global-batch position `index` at `step`: a CPU generator seeded by all three,
    so the draw does not depend on the rank, the device or on resuming."""
    g = torch.Generator().manual_seed(seed_of(seed, step, index))
    u = torch.rand((), generator=g, dtype=torch.float64)
    return float(shift_sigma(u, shift)), torch.randn(tuple(shape), generator=g)


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(seed_of(seed, 1_000_003, epoch))
    return torch.randperm(count, generator=g).tolist()


def batch_indices(seed: int, step: int, batch: int, count: int) -> list[int]:
    """Dataset indices of the global batch of `step`: consecutive positions of seeded per-epoch orders."""
    out, cache = [], {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch = pos // count
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, count)
        out.append(cache[epoch][pos % count])
    return out


__all__ = ["seed_of", "draw", "epoch_order", "batch_indices"]
