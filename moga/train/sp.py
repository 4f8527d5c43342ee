"""Sequence parallelism for training: the Ulysses exchange with gradients, and the rank layout.

`moga.parallel.ulysses.UlyssesExchange` is the inference exchange (its collectives carry no gradient).
`TrainExchange` keeps its shard arithmetic and replaces the three collectives by the autograd-capable
ones of `torch.distributed.nn.functional` whenever a tensor needs a gradient:

    all_gather_tokens   all_gather            backward: each rank's shard gets the SUM of all ranks' grads
    seq_to_heads        all_to_all_single     backward: the reverse all-to-all
    heads_to_seq        all_to_all_single     backward: the reverse all-to-all

Gradient bookkeeping (why every rank simply uses its own loss and the trainer averages gradients over
the whole world): the ranks of one sequence-parallel group compute the same loss from gathered
tensors, so the gather's backward hands each local shard P times its true gradient; averaging the
parameter gradients over the P ranks then gives exactly the sum of their contributions, which is the
true gradient. Data-parallel groups average as usual.

`ParallelLayout(world, sp)`: ranks [d*sp, (d+1)*sp) form sequence-parallel group d (one clip at a
time); the world size divided by sp is the data-parallel size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.ulysses import UlyssesExchange, check_heads


def _needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


class TrainExchange(UlyssesExchange):
    """UlyssesExchange whose collectives are differentiable (same shapes, same protocol)."""

    def all_gather_tokens(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if self.world_size == 1 or not _needs_grad(t):
            return super().all_gather_tokens(t, num_tokens)
        self._check_shard(t, num_tokens)
        src = t.movedim(1, 0).contiguous()              # [shard, B, ...]: ranks join along dim 0
        out = _all_gather_autograd(src, self.group or dist.group.WORLD)
        return out[:num_tokens].movedim(0, 1)

    def seq_to_heads(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if self.world_size == 1 or not _needs_grad(t):
            return super().seq_to_heads(t, num_tokens)
        s = self._check_shard(t, num_tokens)
        b, _, h, d = t.shape
        p = self.world_size
        check_heads(h, p)
        send = t.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = self._a2a(send)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)[:, :num_tokens]

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 or not _needs_grad(t):
            return super().heads_to_seq(t)
        if t.dim() != 4:
            raise ValueError(f"heads_to_seq expects [B, tokens, heads, dim], got {tuple(t.shape)}")
        b, n, hl, d = t.shape
        p = self.world_size
        s = self.shard_size(n)
        if p * s != n:
            t = torch.cat([t, t.new_zeros(b, p * s - n, hl, d)], 1)
        send = t.reshape(b, p, s, hl, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = self._a2a(send)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s, p * hl, d)

    def _a2a(self, send: torch.Tensor) -> torch.Tensor:
        return _all_to_all_autograd(send, self.group or dist.group.WORLD)


# torch's autograd collectives moved between releases: the functional collectives (2.13: the
# `*_autograd` functions) where present, else torch.distributed.nn.functional (deprecated in 2.13).
def _all_gather_autograd(src: torch.Tensor, group) -> torch.Tensor:
    """Every rank's src [n, ...] concatenated along dim 0, with gradients."""
    try:
        from torch.distributed import _functional_collectives as fc
        fn = getattr(fc, "all_gather_single_autograd", None) or getattr(fc, "all_gather_tensor_autograd")
    except (ImportError, AttributeError):
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(src, group=group), dim=0)
    out = fn(src, 0, group)
    return out.wait() if hasattr(out, "wait") else out


def _all_to_all_autograd(send: torch.Tensor, group) -> torch.Tensor:
    """recv[j] = rank j's send[this rank], for send [P, ...], with gradients."""
    try:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
    except ImportError:
        from torch.distributed.nn.functional import all_to_all_single
        return all_to_all_single(torch.empty_like(send), send, group=group)
    out = all_to_all_single_autograd(send, None, None, group)
    return out.wait() if hasattr(out, "wait") else out


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: sequence-parallel group (consecutive ranks) and data-parallel index."""

    rank: int
    world: int
    sp: int

    def __post_init__(self):
        if self.sp < 1 or self.world % self.sp:
            raise ValueError(f"sequence-parallel size {self.sp} must divide the world size {self.world} "
                             f"(torchrun --nproc-per-node x nodes)")

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    def sp_groups(self) -> list[list[int]]:
        return [list(range(d * self.sp, (d + 1) * self.sp)) for d in range(self.dp)]


def make_exchange(layout: ParallelLayout, num_heads: int) -> TrainExchange | None:
    """The sequence-parallel exchange of this rank's group (None when sp == 1). Every rank must call
    this (new_group is collective)."""
    if layout.sp == 1:
        return None
    check_heads(num_heads, layout.sp)
    mine = None
    for ranks in layout.sp_groups():
        g = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = g
    return TrainExchange(group=mine if layout.dp > 1 else None)


__all__ = ["TrainExchange", "ParallelLayout", "make_exchange"]
