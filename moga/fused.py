"""Fused elementwise parts of a Wan block, for inference: one pass over memory where plain torch makes several.

At 262k tokens x 5120 channels one float32 pass over the residual stream is 5.4 GB, so the glue around the
matmuls costs as much as a matmul when it runs as separate torch ops. Three row-wise Triton kernels:

- `modulate_cast`: LayerNorm (no affine, float32) * (1 + scale) + shift, cast to the compute dtype
  (the input of self-attention and of the FFN). Plain torch: ~5 passes; fused: read f32, write bf16.
- `layer_norm_cast`: the affine LayerNorm before the cross-attention (`norm3`), cast.
- `rms_norm_rope`: Wan's RMSNorm of q or k over all heads (float32), times its weight, then RoPE on channel
  pairs (2i, 2i+1), written back in place. Plain torch: ~12 passes; fused: one read, one write.
  Without `rope` it is the cross-attention's norm_q.

Every function falls back to the plain torch expression (the reference, bit for bit the unfused model)
where the kernels do not apply: no CUDA tensor, no Triton, gradients needed (the kernels have no backward),
or `FUSED = False`. The fused results differ from the plain ones only by rounding: the kernels keep float32
to the end and round once, where the plain path rounds to bf16 between steps.
This module imports nothing from moga (the attention package and the model both call it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED = True         # False: always the plain torch path (benchmarks compare both)
FUSE_ON_CPU = False  # tests: the Triton kernels on the CPU (needs TRITON_INTERPRET=1 at import)

_KERNELS = None


def _kernels():
    """The Triton kernels (a namespace), or None when Triton is not importable."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import triton
            import triton.language as tl
        except Exception:
            _KERNELS = False
            return None

        @triton.jit
        def modulate_kernel(out_ptr, x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, n, dim,
                            sxb, sxt, sob, sot, smb, eps,
                            MODULATE: tl.constexpr, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            bi, ti = row // n, row % n
            cols = tl.arange(0, BLOCK)
            ok = cols < dim
            x = tl.load(x_ptr + bi * sxb + ti * sxt + cols, mask=ok, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / dim
            xc = tl.where(ok, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / dim
            y = xc / tl.sqrt(var + eps)
            if AFFINE:
                y = y * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) \
                    + tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            if MODULATE:
                sc = tl.load(scale_ptr + bi * smb + cols, mask=ok, other=0.0).to(tl.float32)
                sh = tl.load(shift_ptr + bi * smb + cols, mask=ok, other=0.0).to(tl.float32)
                y = y * (1.0 + sc) + sh
            tl.store(out_ptr + bi * sob + ti * sot + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

        @triton.jit
        def rms_rope_kernel(x_ptr, w_ptr, rope_ptr, n, half, half_head, sxb, sxt, eps,
                            ROPE: tl.constexpr, BLOCK: tl.constexpr):
            # one token row of `2 * half` channels, in place; pair j = channels (2j, 2j+1)
            row = tl.program_id(0).to(tl.int64)
            bi, ti = row // n, row % n
            j = tl.arange(0, BLOCK)
            ok = j < half
            base = x_ptr + bi * sxb + ti * sxt
            xe = tl.load(base + 2 * j, mask=ok, other=0.0).to(tl.float32)
            xo = tl.load(base + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
            ms = (tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / (2 * half)
            r = 1.0 / tl.sqrt(ms + eps)
            ye = xe * r * tl.load(w_ptr + 2 * j, mask=ok, other=0.0).to(tl.float32)
            yo = xo * r * tl.load(w_ptr + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
            if ROPE:
                p = j % half_head
                c = tl.load(rope_ptr + ti * 2 * half_head + 2 * p, mask=ok, other=1.0)
                s = tl.load(rope_ptr + ti * 2 * half_head + 2 * p + 1, mask=ok, other=0.0)
                ye, yo = ye * c - yo * s, ye * s + yo * c
            tl.store(base + 2 * j, ye.to(x_ptr.dtype.element_ty), mask=ok)
            tl.store(base + 2 * j + 1, yo.to(x_ptr.dtype.element_ty), mask=ok)

        class K:
            pass
        K.modulate, K.rms_rope = modulate_kernel, rms_rope_kernel
        _KERNELS = K
    return _KERNELS or None


def can_fuse(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run for these inputs (CUDA or the test interpreter, no autograd, Triton there)."""
    if not FUSED:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None):
        return False
    if not all(t.is_cuda or FUSE_ON_CPU for t in tensors if t is not None):
        return False
    return _kernels() is not None


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


# ---- plain paths (the reference; the unfused model's exact expressions) ----------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine (float32), then x * (1 + scale) + shift."""
    xf = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift, xf, 1 + scale)


def layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """float32 LayerNorm, affine when weight/bias are given."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


# ---- fused entry points --------------------------------------------------------------------


@torch.compiler.disable
def modulate_cast(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """`modulate(x, shift, scale, eps).to(dtype)`. x [B, n, dim] (a token slice may be strided),
    shift/scale [B, 1, dim]."""
    if not (can_fuse(x, shift, scale) and x.dim() == 3 and x.stride(-1) == 1
            and shift.shape == scale.shape == (x.shape[0], 1, x.shape[2])):
        return modulate(x, shift, scale, eps).to(dtype)
    return _row_norm(x, eps, dtype, shift=shift, scale=scale)


@torch.compiler.disable
def layer_norm_cast(x: torch.Tensor, weight, bias, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """`layer_norm(x, weight, bias, eps).to(dtype)`; weight and bias both given or both None."""
    if not (can_fuse(x, weight, bias) and x.dim() == 3 and x.stride(-1) == 1
            and (weight is None) == (bias is None)):
        return layer_norm(x, weight, bias, eps).to(dtype)
    return _row_norm(x, eps, dtype, weight=weight, bias=bias)


def _row_norm(x, eps, dtype, shift=None, scale=None, weight=None, bias=None):
    b, n, dim = x.shape
    out = torch.empty(b, n, dim, device=x.device, dtype=dtype)
    if out.numel() == 0:
        return out
    k = _kernels()
    block = 1 << (dim - 1).bit_length()
    mod = shift is not None
    if mod:
        shift, scale = shift.float().contiguous(), scale.float().contiguous()
    aff = weight is not None
    if aff:
        weight, bias = weight.contiguous(), bias.contiguous()
    k.modulate[(b * n,)](out, x, shift if mod else x, scale if mod else x, weight if aff else x,
                         bias if aff else x, n, dim, x.stride(0), x.stride(1), out.stride(0),
                         out.stride(1), dim if mod else 0, float(eps), MODULATE=mod, AFFINE=aff,
                         BLOCK=block, num_warps=_warps(block))
    return out


@torch.compiler.disable
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor | None,
                  num_heads: int) -> torch.Tensor | None:
    """RMSNorm over the last dim (float32) times `weight`, then RoPE per head, IN PLACE on x
    [B, n, dim] (contiguous rows); rope complex [n, head_dim / 2] or None. Returns x, or None when the
    kernel does not apply (the caller then runs its plain path)."""
    if not (can_fuse(x, weight) and x.dim() == 3 and x.stride(-1) == 1 and x.is_floating_point()):
        return None
    b, n, dim = x.shape
    head_dim = dim // num_heads
    rp = None
    if rope is not None:
        if rope.dtype != torch.complex64 or tuple(rope.shape) != (n, head_dim // 2):
            return None
        rp = torch.view_as_real(rope.contiguous())
    if x.numel() == 0:
        return x
    k = _kernels()
    half = dim // 2
    block = 1 << (half - 1).bit_length()
    k.rms_rope[(b * n,)](x, weight.contiguous(), rp if rp is not None else x, n, half, head_dim // 2,
                         x.stride(0), x.stride(1), float(eps), ROPE=rp is not None, BLOCK=block,
                         num_warps=_warps(block))
    return x


__all__ = ["FUSED", "can_fuse", "modulate", "layer_norm", "modulate_cast", "layer_norm_cast",
           "rms_norm_rope"]
