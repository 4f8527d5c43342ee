"""A host's own Wan block (ComfyUI's WanAttentionBlock) run with the elementwise parts fused, every weight still
the host's: its linear layers, cross-attention and FFN are called as the host's modules (so their casting, fp8,
GGUF, LoRA patches and offloading apply), and only what the fused passes read directly comes in as tensors (the
modulation and the norm weights the host's glue read with the host's own cast; a norm it could not read comes in
as the host's module and runs as such).

The maths is the host block's (Wan2.1): over the residual x [B, N, dim] in the host's dtype (bf16 for a bf16 or fp8
model, as the host keeps it; no float32 stream), with mods = modulation + e (six [B, 1, dim], in x's dtype):

    inp = norm1(x) * (1 + scale1) + shift1                                   one pass (`fused.modulate_cast`)
    q, k = RoPE(rms_norm(q(inp))), RoPE(rms_norm(k(inp)))                   one pass each (`fused.rms_norm_rope`)
    y = o(attend(q, k, v(inp), inp))                                          MoGA, or the host's attention
    x1 = x + gate1 * y ; c_in = norm3(x1)                                     one pass, x1 in a new buffer (A)
    x1 += cross(c_in) ; m = norm2(x1) * (1 + scale2) + shift2                one pass (B)
    x1 += gate2 * ffn(m)                                                      one pass (C)

where the host runs about four separate passes for each modulation and, for RoPE, a float32 copy of q and of k with
five more passes over it. Each residual update is rounded to x's dtype, as the host's own addcmul rounds it; the
norms, modulations and RoPE keep float32 to the end and round once (the host rounds after every op), so in bf16 the
result differs from the host's by rounding only, and in float32 it is the host's to float precision. The block's
input x is never written (the caller may still hold it). Off CUDA every pass is the plain torch expression.

This module imports no host: the glue (nodes/patch_hooks.py) fills a `HostBlock` and decides when it applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import fused
from .attention.layer import apply_rope


@dataclass
class NormWeights:
    """A norm whose weights the fused passes read: weight [dim] (bias [dim] or None), already in the residual's
    dtype and on its device (what the host's own norm would multiply by), and its eps."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass
class HostBlock:
    """One host Wan block as the fused forward needs it.

    q, k, v, o: the self-attention's projections (the host's Linear modules, [B, N, dim] -> [B, N, dim]).
    norm_q, norm_k: `NormWeights` (RMSNorm over all heads, fused with RoPE) or the host's norm module (then RoPE
      runs alone after it).
    heads: attention heads (head_dim = dim / heads).
    norm1_eps, norm2_eps: the eps of the two LayerNorms without affine before the modulations.
    norm3: `NormWeights` (affine LayerNorm, fused into pass A), the host's module (run on x1), or None (Identity).
    modulation: [1, 6, dim] in x's dtype on x's device.
    cross: c_in [B, N, dim] -> the cross-attention's output (the host's module, with its context bound).
    ffn: m [B, N, dim] -> the FFN's output (the host's module).
    """
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    norm_q: object
    norm_k: object
    heads: int
    norm1_eps: float
    norm2_eps: float
    norm3: object
    modulation: torch.Tensor
    cross: Callable
    ffn: Callable


def rope_from_rotations(freqs: torch.Tensor, num_tokens: int, head_dim: int) -> torch.Tensor | None:
    """A host's RoPE as 2x2 rotation matrices [1, N, 1, head_dim / 2, 2, 2] (ComfyUI's Wan: rows (cos, -sin),
    (sin, cos), applied to channel pairs (2j, 2j+1)) -> complex64 [N, head_dim / 2] (cos + i sin), or None when
    `freqs` is not that (another shape, or matrices that are not rotations): the caller then keeps the host's."""
    if (not isinstance(freqs, torch.Tensor) or freqs.dtype != torch.float32
            or tuple(freqs.shape) != (1, num_tokens, 1, head_dim // 2, 2, 2)):
        return None
    m = freqs[0, :, 0]
    cos, sin = m[..., 0, 0], m[..., 1, 0]
    if not (torch.allclose(m[..., 1, 1], cos, rtol=0, atol=1e-6) and torch.allclose(m[..., 0, 1], -sin, rtol=0,
                                                                                        atol=1e-6)):
        return None
    return torch.complex(cos.contiguous(), sin.contiguous())


def forward(block: HostBlock, x: torch.Tensor, e: torch.Tensor, rope: torch.Tensor, attend: Callable) -> torch.Tensor:
    """The host block's output for x [B, N, dim] (its dtype kept), e [B, 6, dim] (x's dtype), rope complex64
    [N, head_dim / 2]. attend(q, k, v, inp) -> [B, N, dim]: the self-attention of the normed, RoPE'd q, k
    ([B, N, dim], heads side by side) and v; inp is what fed the projections (MoGA's router input)."""
    if e.dim() != 3 or e.shape[1] != 6:
        raise ValueError(f"e must be [batch, 6, dim] (one modulation per sample), got {tuple(e.shape)}")
    shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation + e).chunk(6, dim=1)
    if not x.is_contiguous():  # the first block's x is a transposed view of the patch embedding
        x = x.contiguous()
    dtype = x.dtype

    inp = fused.modulate_cast(x, shift1, scale1, block.norm1_eps, dtype)
    q = _norm_rope(block.q(inp), block.norm_q, rope, block.heads)
    k = _norm_rope(block.k(inp), block.norm_k, rope, block.heads)
    y = block.o(attend(q, k, block.v(inp), inp))
    del q, k, inp

    # A: x1 = x + gate1 * y (a new buffer) and norm3(x1), into y's buffer when it fits
    x1 = torch.empty_like(x)
    n3 = block.norm3
    if isinstance(n3, NormWeights):
        own = y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
        c_in, _ = fused.residual_norm(x, y, gate1, n3.eps, dtype, weight=n3.weight, bias=n3.bias,
                                      out=y if own else None, x_out=x1)
    else:
        fused.residual_norm(x, y, gate1, 0.0, dtype, norm=False, want_out=False, x_out=x1)
        c_in = x1 if n3 is None else n3(x1)
    del y
    c = block.cross(c_in)
    del c_in

    # B: x1 += c and modulate2(x1), into c's buffer when it fits; C: x1 += gate2 * ffn
    own = c.dtype == dtype and c.shape == x.shape and c.is_contiguous()
    m, _ = fused.residual_norm(x1, c, None, block.norm2_eps, dtype, shift=shift2, scale=scale2,
                               out=c if own else None)
    del c
    f = block.ffn(m)
    del m
    fused.residual_norm(x1, f, gate2, 0.0, dtype, norm=False, want_out=False)
    return x1


def _norm_rope(t: torch.Tensor, norm, rope: torch.Tensor, heads: int) -> torch.Tensor:
    """RMSNorm (its weights, or the host's module) and RoPE on t [B, N, dim], in place where fused."""
    if isinstance(norm, NormWeights):
        done = fused.rms_norm_rope(t, norm.weight, norm.eps, rope, heads)
        if done is not None:
            return done
        t = F.rms_norm(t, (t.shape[-1],), norm.weight, norm.eps)  # the host's own rms_norm (torch's)
    else:
        t = norm(t)
        done = fused.rms_norm_rope(t, None, 0.0, rope, heads)
        if done is not None:
            return done
    b, n, dim = t.shape
    return apply_rope(t.view(b, n, heads, dim // heads), rope).view(b, n, dim)


__all__ = ["HostBlock", "NormWeights", "forward", "rope_from_rotations"]
