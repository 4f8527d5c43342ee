"""The MoGA router: one bias-free linear layer, softmax in float32, top-1 group per token.

One group per token, shared by all heads. A run-time group count M' below the router's M merges
the router's rows into M' groups (deterministically, cached), so a checkpoint trained or
calibrated with M groups can run coarser without reloading.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """group_ids [B, N] long; gate [B, N] = p(chosen group); probs [B, N, M'] (float32)."""

    group_ids: torch.Tensor
    gate: torch.Tensor
    probs: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.probs.shape[-1]

    def gather(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Routing":
        """Apply `fn` to each tensor (e.g. an all-gather over sequence shards)."""
        return Routing(fn(self.group_ids), fn(self.gate), fn(self.probs))


def merge_rows(weight: torch.Tensor, num_groups: int) -> list[int]:
    """Assign each of the M router rows to one of `num_groups` merged groups.

    Agglomerative merging of the L2-normalised rows, average cosine linkage, ties to the lowest
    indices: deterministic and seed-free. Merged groups are numbered by their lowest row, so
    num_groups == M is the identity.
    """
    rows = weight.detach().to("cpu", torch.float64).numpy()
    m = rows.shape[0]
    if not 1 <= num_groups <= m:
        raise ValueError(f"cannot merge {m} router rows into {num_groups} groups")
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    clusters = [[i] for i in range(m)]
    while len(clusters) > num_groups:
        best, pair = -np.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                s = sim[np.ix_(clusters[a], clusters[b])].mean()
                if s > best + 1e-12:  # strict: the first (lowest) pair wins ties
                    best, pair = s, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    clusters.sort(key=lambda c: c[0])
    assign = [0] * m
    for g, members in enumerate(clusters):
        for i in members:
            assign[i] = g
    return assign


class Router(nn.Linear):
    """`Linear(dim, num_groups, bias=False)`; its `.weight` [M, dim] is the checkpoint's router."""

    def __init__(self, dim: int, num_groups: int, device=None, dtype=None):
        if num_groups < 1:
            raise ValueError(f"a router needs num_groups >= 1, got {num_groups}")
        super().__init__(dim, num_groups, bias=False, device=device, dtype=dtype)
        self._merge_cache: dict = {}

    @property
    def num_groups(self) -> int:
        return self.out_features

    def merge_map(self, num_groups: int) -> torch.Tensor:
        """[M] long: merged group of each row, cached per (M', the weight's storage and version)."""
        key = (num_groups, self.weight.data_ptr(), self.weight._version, self.weight.device)
        hit = self._merge_cache.get(key)
        if hit is None:
            assign = merge_rows(self.weight, num_groups)
            hit = torch.tensor(assign, dtype=torch.long, device=self.weight.device)
            self._merge_cache.clear()  # weights change in training: keep only the latest
            self._merge_cache[key] = hit
        return hit

    def forward(self, x: torch.Tensor, num_groups: int | None = None) -> Routing:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"the router takes [batch, tokens, {self.in_features}], got {tuple(x.shape)}")
        m = self.num_groups
        target = m if num_groups is None else int(num_groups)
        if target > m:
            raise ValueError(
                f"this router has {m} groups; {target} groups need new router rows: run "
                f"`moga patch --groups {target}` on the checkpoint (or choose num_groups <= {m})")
        if target < 1:
            raise ValueError(f"num_groups must be >= 1, got {target}")
        # Logits in the input's dtype (fp32 accumulation in the matmul), softmax in float32
        # (float64 inputs stay float64: gradient checks).
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = F.linear(x, self.weight.to(x.dtype)).to(work)
        probs = torch.softmax(logits, dim=-1)
        if target < m:
            assign = self.merge_map(target)
            merged = probs.new_zeros(*probs.shape[:-1], target)
            probs = merged.index_add(-1, assign, probs)
        # argmax returns the first maximal index: ties go to the lowest group.
        group_ids = probs.argmax(dim=-1)
        gate = probs.gather(-1, group_ids.unsqueeze(-1)).squeeze(-1)
        return Routing(group_ids, gate, probs)
