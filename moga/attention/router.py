"""The MoGA router: one bias-free linear layer, softmax in float32, top-1 group per token.

One group per token, shared by all heads. A run-time group count M' below the router's M merges
the router's rows into M' groups (deterministically, cached), so a checkpoint trained or
calibrated with M groups can run coarser without reloading.

Group capacity (`cap_routing`, MoGAConfig.capacity): a routed group of more than
ceil(capacity * N / M') tokens is cut into near-equal runs of consecutive tokens (in sequence
order), each attended as a group of its own. It needs the whole sequence's routing, so under
sequence parallelism it runs after the all-gather (moga_attention applies it), on every rank
from the same gathered tensors: integer arithmetic only, the same result everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CAPACITY_SPLITS


@dataclass
class Routing:
    """group_ids [B, N] long; gate [B, N] = p(chosen group); probs [B, N, M'] (float32).

    A capped routing (`cap_routing`) has `capacity` set and group ids g + M' * k for run k of router
    group g (k < `runs`), so `group_ids % M'` is still the router's group; gate and probs are the
    router's, untouched. `num_groups` is the size of the id space (M' * runs), `router_groups` M'.
    """

    group_ids: torch.Tensor
    gate: torch.Tensor
    probs: torch.Tensor
    capacity: float | None = None
    runs: int = 1
    split: str = "runs"

    @property
    def router_groups(self) -> int:
        return self.probs.shape[-1]

    @property
    def num_groups(self) -> int:
        """Group ids lie in [0, num_groups): M' uncapped, M' * runs capped."""
        return self.probs.shape[-1] * self.runs

    def gather(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Routing":
        """Apply `fn` to each tensor (e.g. an all-gather over sequence shards)."""
        if self.capacity is not None:
            raise ValueError("a capped routing cannot be gathered: its runs depend on the whole sequence; "
                             "gather the router's routing first, then cap it (cap_routing)")
        return Routing(fn(self.group_ids), fn(self.gate), fn(self.probs))

    def group_sizes(self, batch: int = 0) -> list[int]:
        """Token count of every group of one batch element: the router's M' groups (empty ones as 0);
        capped, the first run of each router group (0 when empty) and then every further non-empty run."""
        counts = torch.bincount(self.group_ids[batch].reshape(-1).long(), minlength=self.num_groups).tolist()
        m = self.router_groups
        return counts[:m] + [c for c in counts[m:] if c]


def capacity_limit(num_tokens: int, num_groups: int, capacity: float) -> int:
    """The largest routed group allowed: ceil(capacity * N / M) tokens (at least 1).
    Rounded to 9 decimals first so that float noise (0.3 * 10 / 3) does not add a token."""
    if not capacity or capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity!r}")
    return max(1, math.ceil(round(float(capacity) * num_tokens / num_groups, 9)))


def cap_routing(routing: Routing, capacity: float | None, split: str = "runs") -> Routing:
    """Cut every group of more than `capacity_limit(N, M', capacity)` tokens into near-equal parts.

    Per batch element, the tokens of router group g are taken in sequence order; a group of s tokens
    over the limit L becomes r = ceil(s / L) parts, token at position p (0-based, within g) in part
    floor(p * r / s) (split "runs": consecutive tokens) or p mod r (split "stride": round robin, so
    every part spans the group's whole extent), so parts differ by at most one token and none
    exceeds L. Part k of group g gets id g + M' * k (groups within the limit keep their id). Gate and
    probs stay the router's. capacity None/0 returns the routing unchanged; an already capped routing
    is returned as it is when its capacity and split are the same, else ValueError. Deterministic:
    integer ops on the ids only.
    """
    if not capacity:
        return routing
    if split not in CAPACITY_SPLITS:
        raise ValueError(f"split must be one of {CAPACITY_SPLITS}, got {split!r}")
    if routing.capacity is not None:
        if (routing.capacity, routing.split) != (float(capacity), split):
            raise ValueError(f"this routing is already capped at {routing.capacity} ({routing.split}); cap "
                             f"the router's routing at {capacity} ({split}) instead")
        return routing
    ids = routing.group_ids
    if ids.dim() != 2:
        raise ValueError(f"group ids must be [batch, tokens], got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"group ids must be an integer tensor, got {ids.dtype}")
    b, n = ids.shape
    m = routing.router_groups
    limit = capacity_limit(n, m, capacity)
    bound = -(-n // limit)  # runs of the largest possible group (all N tokens in one): a static bound
    if n == 0 or bound <= 1:
        return Routing(ids, routing.gate, routing.probs, float(capacity), 1, split)
    ids = ids.long()
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= m:
        raise ValueError(f"group ids must lie in [0, {m}), got values in [{lo}, {hi}]")
    key = (ids + torch.arange(b, device=ids.device)[:, None] * m).reshape(-1)
    counts = torch.bincount(key, minlength=b * m)
    order = torch.argsort(key, stable=True)          # by (batch, group), sequence order inside a group
    sk = key[order]
    size = counts[sk]
    pos = torch.arange(b * n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sk]
    runs = (size + limit - 1) // limit
    capped = torch.empty_like(key)
    part = torch.div(pos * runs, size, rounding_mode="floor") if split == "runs" else pos % runs
    capped[order] = sk % m + m * part
    return Routing(capped.view(b, n), routing.gate, routing.probs, float(capacity), bound, split)


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
