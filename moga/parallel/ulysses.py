"""Ulysses sequence parallelism: the exchange that MoGAAttention's `parallel=` argument speaks.

Each of P ranks holds one shard of ceil(N / P) consecutive tokens (the last shards are padded with
zeros at the end). Around attention the exchange turns sequence shards into head shards over the
whole sequence (one all-to-all), and back (a second all-to-all). Routing is computed on the local
tokens before the exchange and all-gathered, so every rank sees the whole sequence's group ids.
Padding is dropped on the way into attention and re-created (as zeros) on the way out, so it never
joins a group or a window.

Transport is torch.distributed alone: NCCL on CUDA, gloo on the CPU. gloo has `all_to_all_single`
since torch 2.x (checked on 2.13 CPU); where a build lacks it, the exchange falls back to an
all-gather plus slicing (P times the traffic; only a CPU fallback).

Inference only: the collectives here are not differentiable.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def valid_world_sizes(num_heads: int) -> list[int]:
    """GPU counts that split `num_heads` attention heads evenly (the divisors of num_heads)."""
    return [p for p in range(1, num_heads + 1) if num_heads % p == 0]


def check_heads(num_heads: int, world_size: int, unit: str = "ranks") -> None:
    """ValueError unless num_heads splits evenly over world_size ranks; `unit` names them in the
    message ("GPUs" on CUDA, "processes" on the CPU)."""
    if num_heads % world_size:
        raise ValueError(
            f"sequence parallelism splits the {num_heads} attention heads over {world_size} {unit}, "
            f"but {num_heads} is not divisible by {world_size}: use one of "
            f"{valid_world_sizes(num_heads)} {unit}")


class UlyssesExchange:
    """The sequence-parallel exchange over a torch.distributed process group.

    exchange.rank, exchange.world_size
    exchange.shard_size(n)                  ceil(n / P): every rank's padded shard length
    exchange.local_range(n) -> (start, stop) the real tokens this rank holds (stop - start may be
                                            shorter than shard_size, even 0, at the end)
    exchange.shard(x, n, dim=1)             this rank's padded shard of a full tensor
    exchange.all_gather_tokens(t, n)        [B, shard, ...] on every rank -> [B, n, ...]
    exchange.seq_to_heads(t, n)             [B, shard, H, D] -> [B, n, H / P, D]
    exchange.heads_to_seq(t)                [B, n, H / P, D] -> [B, shard, H, D]
    """

    def __init__(self, group=None, use_all_to_all: bool = True):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "UlyssesExchange needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group first (torchrun, or moga.parallel.WorkerPool)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        # False: all-gather + slicing instead (also where the backend lacks all_to_all_single)
        self._a2a_ok = bool(use_all_to_all)
        self.comm_seconds = 0.0  # host time spent in collectives (timed only if `timed` is set)
        self.timed = False

    def __repr__(self) -> str:
        return f"UlyssesExchange(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"

    # ---- token shards -------------------------------------------------------------------------
    def shard_size(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.world_size)

    def local_range(self, num_tokens: int) -> tuple[int, int]:
        s = self.shard_size(num_tokens)
        start = min(self.rank * s, num_tokens)
        return start, min(start + s, num_tokens)

    def shard(self, x: torch.Tensor, num_tokens: int, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full tensor, zero-padded at the end to shard_size."""
        if x.shape[dim] != num_tokens:
            raise ValueError(f"shard: dim {dim} of {tuple(x.shape)} is not the {num_tokens} tokens")
        start, stop = self.local_range(num_tokens)
        part = x.narrow(dim, start, stop - start)
        pad = self.shard_size(num_tokens) - (stop - start)
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            part = torch.cat([part, x.new_zeros(shape)], dim)
        return part

    # ---- collectives --------------------------------------------------------------------------
    def all_gather_tokens(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[B, shard, ...] from every rank -> [B, num_tokens, ...] (padding dropped)."""
        s = self._check_shard(t, num_tokens)
        p = self.world_size
        if p == 1:
            return t[:, :num_tokens]
        src = t.movedim(1, 0).contiguous()  # [shard, B, ...]: ranks concatenate along dim 0
        out = src.new_empty((p * s,) + tuple(src.shape[1:]))
        self._all_gather(out, src)
        return out[:num_tokens].movedim(0, 1)

    def seq_to_heads(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[B, shard, H, D] sequence shard -> [B, num_tokens, H / P, D] head shard (padding dropped)."""
        s = self._check_shard(t, num_tokens)
        b, _, h, d = t.shape
        p = self.world_size
        check_heads(h, p)
        if p == 1:
            return t[:, :num_tokens]
        # chunk j of the send buffer (heads j*h/P ...) goes to rank j
        send = t.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)  # [P (source rank = token shard), B, s, H/P, D]
        self._all_to_all(recv, send)
        out = recv.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)
        return out[:, :num_tokens]

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, H / P, D] head shard -> [B, shard, H, D] sequence shard (padding as zeros)."""
        if t.dim() != 4:
            raise ValueError(f"heads_to_seq expects [B, tokens, heads, dim], got {tuple(t.shape)}")
        b, n, hl, d = t.shape
        p = self.world_size
        if p == 1:
            return t
        s = self.shard_size(n)
        if p * s != n:
            t = torch.cat([t, t.new_zeros(b, p * s - n, hl, d)], 1)
        send = t.reshape(b, p, s, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # chunk j: rank j's tokens
        recv = torch.empty_like(send)  # [P (source rank = head chunk), B, s, H/P, D]
        self._all_to_all(recv, send)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s, p * hl, d)

    def all_reduce_max(self, value: float) -> float:
        """Max of one number over the ranks (used to agree on cancel/stop flags)."""
        dev = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        flag = torch.tensor([float(value)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return float(flag.item())

    # ---- internals ----------------------------------------------------------------------------
    def _check_shard(self, t: torch.Tensor, num_tokens: int) -> int:
        s = self.shard_size(num_tokens)
        if t.dim() < 2 or t.shape[1] != s:
            raise ValueError(
                f"expected this rank's padded shard of {s} tokens (ceil({num_tokens} / "
                f"{self.world_size})) in dim 1, got shape {tuple(t.shape)}")
        return s

    def _timed(self, fn, *args):
        if not self.timed:
            return fn(*args)
        import time
        if self.backend == "nccl":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if self.backend == "nccl":
            torch.cuda.synchronize()
        self.comm_seconds += time.perf_counter() - t0

    def _all_gather(self, out: torch.Tensor, src: torch.Tensor) -> None:
        """out (contiguous, P x src's elements) = every rank's src, concatenated in rank order."""
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._timed(lambda: gather(out.view(-1), src.reshape(-1), group=self.group))

    def _all_to_all(self, recv: torch.Tensor, send: torch.Tensor) -> None:
        """recv[j] = rank j's send[self.rank], for send/recv [P, ...]."""
        if self._a2a_ok:
            try:
                self._timed(lambda: dist.all_to_all_single(recv, send, group=self.group))
                return
            except (RuntimeError, NotImplementedError) as err:
                # only a backend without the op falls back; anything else is a real error
                if self.backend != "gloo" or "all_to_all" not in str(err).lower():
                    raise
                self._a2a_ok = False
        # gloo fallback: every rank gathers every send buffer and keeps its own column
        p = self.world_size
        everything = send.new_empty((p,) + tuple(send.shape))
        self._all_gather(everything, send)
        recv.copy_(everything[:, self.rank])
