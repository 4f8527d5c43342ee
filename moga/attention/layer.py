"""MoGAAttention: the self-attention layer the model calls.

Parameter names follow Wan2.1 (`q`, `k`, `v`, `o`, `norm_q`, `norm_k`) plus `router`, so a Wan
block's `self_attn` *is* this module and a checkpoint maps onto it by name.

Contract (other modules rely on it):
    layer = MoGAAttention(dim, num_heads, num_groups=M)   # num_groups=0: no router, always dense
    out = layer(x, layout, rope=freqs, config=cfg)          # x [B, N, dim] -> [B, N, dim]
  - `rope`: complex tensor [N, head_dim // 2] applied to q and k as Wan does (pairs of channels
    (2i, 2i+1) are one complex number), or None.
  - `config`: a MoGAConfig overriding `layer.config` for this call (run-time group count, window,
    dense warm-up...). Without a router, or with config.dense, the layer runs dense attention.
  - When `layer.record_routing` is True, the last call's routing is kept in `layer.last_routing`
    (a `Routing`), so a trainer can add the balance loss.
  - `parallel`: a sequence-parallel exchange (moga.parallel.ulysses implements it; this package only
    knows the protocol below). Then `x` holds this rank's padded token shard [B, n_local, dim] and
    `rope` this shard's rows. The router scores the local tokens, the routing is all-gathered, q/k/v
    go from sequence shards to head shards over the full sequence, attention runs for the local
    heads, and the output returns to sequence shards. Protocol:
        parallel.all_gather_tokens(t [B, n_local, ...], num_tokens) -> [B, num_tokens, ...]
        parallel.seq_to_heads(t [B, n_local, H, D], num_tokens) -> [B, num_tokens, H / P, D]
        parallel.heads_to_seq(t [B, num_tokens, H / P, D]) -> [B, n_local, H, D]
    Padding tokens are dropped by the exchange, so they never join a group or a window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fused
from .config import MoGAConfig
from .layout import TokenLayout


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] real, rope [N, D/2] complex: rotate channel pairs (2i, 2i+1), in float32+."""
    b, n, h, d = x.shape
    work = torch.float64 if rope.dtype == torch.complex128 else torch.float32
    xc = torch.view_as_complex(x.to(work).reshape(b, n, h, d // 2, 2))
    out = torch.view_as_real(xc * rope.to(xc.dtype)[None, :, None, :]).flatten(3)
    return out.type_as(x)


def norm_rope(norm: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """q or k [B, N, dim] -> norm (RMSNorm or Identity), then RoPE per head when `rope` is given.
    One fused in-place pass (moga.fused) where it applies, else the plain ops."""
    if isinstance(norm, RMSNorm):
        done = fused.rms_norm_rope(x, norm.weight, norm.eps, rope, num_heads)
        if done is not None:
            return done
    x = norm(x)
    if rope is None:
        return x
    b, n, dim = x.shape
    return apply_rope(x.view(b, n, num_heads, dim // num_heads), rope).view(b, n, dim)


class MoGAAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_groups: int = 0, qk_norm: bool = True,
                 eps: float = 1e-6, config: MoGAConfig | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.router = None
        if num_groups:
            from .router import Router
            self.router = Router(dim, num_groups)
        self.config = config or MoGAConfig(num_groups=max(num_groups, 1))
        self.record_routing = False
        self.last_routing = None

    def qkv(self, x: torch.Tensor, rope: torch.Tensor | None):
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = norm_rope(self.norm_q, self.q(x), rope, self.num_heads).view(shape)
        k = norm_rope(self.norm_k, self.k(x), rope, self.num_heads).view(shape)
        return q, k, self.v(x).view(shape)

    def forward(self, x: torch.Tensor, layout: TokenLayout, rope: torch.Tensor | None = None,
                config: MoGAConfig | None = None, parallel=None) -> torch.Tensor:
        cfg = config or self.config
        if parallel is None:
            layout.check_tokens(x.shape[1])
        q, k, v = self.qkv(x, rope)
        sparse = self.router is not None and not cfg.dense
        routing = _route(self.router, x, cfg.num_groups) if sparse and cfg.routed else None
        if parallel is not None:
            n = layout.num_tokens
            q, k, v = (parallel.seq_to_heads(t, n) for t in (q, k, v))
            if routing is not None:
                routing = routing.gather(lambda t: parallel.all_gather_tokens(t, n))
        if sparse:
            out = _moga_attention(q, k, v, routing, layout, cfg)
        else:
            out = dense_attention(q, k, v)
        if parallel is not None:
            out = parallel.heads_to_seq(out)
        self.last_routing = routing if self.record_routing else None
        return self.o(out.flatten(2))


# Routing and the varlen mixture have data-dependent sizes (group lengths read on the host): a
# compiled model (`model.compile()`) runs them eagerly and compiles the dense code around them.
@torch.compiler.disable
def _route(router, x: torch.Tensor, num_groups: int):
    return router(x, num_groups=num_groups)


@torch.compiler.disable
def _moga_attention(q, k, v, routing, layout, cfg):
    from .mixture import moga_attention
    return moga_attention(q, k, v, routing, layout, cfg)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain full attention on [B, N, H, D] (SDPA picks flash/cuDNN/math by device)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
