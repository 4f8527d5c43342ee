"""Fused elementwise parts of a Wan block, for inference: one pass over memory where plain torch makes several.

At 262k tokens x 5120 channels one float32 pass over the residual stream is 5.4 GB, so the glue around the
matmuls costs as much as a matmul when it runs as separate torch ops. Row-wise Triton kernels:

- `modulate_cast`: LayerNorm (no affine, float32) * (1 + scale) + shift, cast to the compute dtype
  (the input of self-attention and of the FFN). Plain torch: ~5 passes; fused: read f32, write bf16.
- `layer_norm_cast`: the affine LayerNorm before the cross-attention (`norm3`), cast.
- `rms_norm_rope`: Wan's RMSNorm of q or k over all heads (float32), times its weight, then RoPE on channel
  pairs (2i, 2i+1), written back in place. Plain torch: ~12 passes; fused: one read, one write.
  Without `rope` it is the cross-attention's norm_q; without a weight, RoPE alone.
- `residual_norm` (the general row kernel the first two use): the gated residual update `x += gate * y`
  (float32, in place) and, from the new x, the next norm / modulation in the compute dtype and / or the
  per-token e4m3 copy for an fp8 matmul, in one pass (`moga.fused_block` chains them; `moga.host_block`
  on a host's bf16 residual, written into a new buffer so the host's block input stays as it was).
- `gelu_quant`: the FFN's GELU (tanh) straight to e4m3 with per-token scales (the input of an fp8 `ffn.2`).

Every function falls back to the plain torch expression (the reference, bit for bit the unfused model)
where the kernels do not apply: no CUDA tensor, no Triton, gradients needed (the kernels have no backward),
or `FUSED = False`. The fused results differ from the plain ones only by rounding: the kernels keep float32
to the end and round once, where the plain path rounds to bf16 between steps.
This module imports nothing from moga but the leaf `moga.lazy_triton` (the attention package and the model
both call it).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .lazy_triton import triton_kernels

FUSED = True         # False: always the plain torch path (benchmarks compare both)
FUSE_ON_CPU = False  # tests: the Triton kernels on the CPU (needs TRITON_INTERPRET=1 at import)
# residual streams the row kernel updates: the library's float32, a host model's own (ComfyUI: the weights' dtype)
RESIDUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

@triton_kernels
def _kernels(triton, tl):
    """The Triton kernels (a namespace; `_kernels()` gives None when Triton is not importable)."""
    @triton.jit
    def row_kernel(x_ptr, r_ptr, y_ptr, g_ptr, out_ptr, q_ptr, qs_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr,
                   n, dim, sxb, sxt, srb, srt, syb, syt, sob, sot, sqb, sqt, ssb, smb, eps,
                   RESID: tl.constexpr, GATE: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr,
                   AFFINE: tl.constexpr, OUT: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
        # one token row: [x + (gate *) y, stored into r (x itself, or another buffer) in r's dtype],
        # then from the stored value [LayerNorm, affine, modulation], then the compute-dtype copy
        # and / or the per-token e4m3 copy with its scale
        row = tl.program_id(0).to(tl.int64)
        bi, ti = row // n, row % n
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        xp = x_ptr + bi * sxb + ti * sxt + cols
        x = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
        if RESID:
            y = tl.load(y_ptr + bi * syb + ti * syt + cols, mask=ok, other=0.0).to(tl.float32)
            if GATE:
                y = y * tl.load(g_ptr + bi * smb + cols, mask=ok, other=0.0).to(tl.float32)
            x = (x + y).to(r_ptr.dtype.element_ty)  # a bf16 residual rounds here, as a host's addcmul
            tl.store(r_ptr + bi * srb + ti * srt + cols, x, mask=ok)
            x = x.to(tl.float32)
        v = x
        if NORM:
            mean = tl.sum(x, axis=0) / dim
            xc = tl.where(ok, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / dim
            v = xc / tl.sqrt(var + eps)
        if AFFINE:
            v = v * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) \
                + tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if MODULATE:
            sc = tl.load(scale_ptr + bi * smb + cols, mask=ok, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + bi * smb + cols, mask=ok, other=0.0).to(tl.float32)
            v = v * (1.0 + sc) + sh
        if OUT:
            tl.store(out_ptr + bi * sob + ti * sot + cols, v.to(out_ptr.dtype.element_ty), mask=ok)
        if QUANT:
            amax = tl.maximum(tl.max(tl.where(ok, tl.abs(v), 0.0), axis=0), 1e-12)
            s = tl.math.div_rn(amax, 448.0)
            qv = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -448.0), 448.0)
            # onto e4m3's grid first (3 mantissa bits, nearest even; below 2^-6 steps of 2^-9), so
            # the cast is exact: the GPU's conversion and Triton's interpreter then agree
            bits = qv.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
            qv = tl.where(tl.abs(qv) < 0.015625, (qv + 24576.0) - 24576.0, bits.to(tl.float32, bitcast=True))
            tl.store(q_ptr + bi * sqb + ti * sqt + cols, qv.to(q_ptr.dtype.element_ty), mask=ok)
            tl.store(qs_ptr + bi * ssb + ti, s)

    @triton.jit
    def gelu_quant_kernel(q_ptr, qs_ptr, h_ptr, k, sh, BLOCK: tl.constexpr):
        # GELU (tanh approximation) of one row, then its per-token e4m3 copy and scale
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < k
        h = tl.load(h_ptr + row * sh + cols, mask=ok, other=0.0).to(tl.float32)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)          # tanh(u); exp overflow gives 1, underflow -1
        g = 0.5 * h * (1.0 + t)
        amax = tl.maximum(tl.max(tl.where(ok, tl.abs(g), 0.0), axis=0), 1e-12)
        s = tl.math.div_rn(amax, 448.0)
        qv = tl.minimum(tl.maximum(tl.math.div_rn(g, s), -448.0), 448.0)
        bits = qv.to(tl.int32, bitcast=True)           # onto e4m3's grid, as in row_kernel
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
        qv = tl.where(tl.abs(qv) < 0.015625, (qv + 24576.0) - 24576.0, bits.to(tl.float32, bitcast=True))
        tl.store(q_ptr + row * k + cols, qv.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(qs_ptr + row, s)

    @triton.jit
    def rms_rope_kernel(x_ptr, w_ptr, rope_ptr, n, half, half_head, sxb, sxt, eps,
                        NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK: tl.constexpr):
        # one token row of `2 * half` channels, in place; pair j = channels (2j, 2j+1)
        row = tl.program_id(0).to(tl.int64)
        bi, ti = row // n, row % n
        j = tl.arange(0, BLOCK)
        ok = j < half
        base = x_ptr + bi * sxb + ti * sxt
        xe = tl.load(base + 2 * j, mask=ok, other=0.0).to(tl.float32)
        xo = tl.load(base + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
        ye, yo = xe, xo
        if NORM:
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

    return SimpleNamespace(row=row_kernel, rms_rope=rms_rope_kernel, gelu_quant=gelu_quant_kernel)


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
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    _row_pass(x, None, None, eps, out, None, shift, scale, weight, bias, norm=True)
    return out


def _row_pass(x, y, gate, eps, out, quant, shift=None, scale=None, weight=None, bias=None, norm=True,
              x_out=None):
    """Launch `row_kernel` over x [B, n, dim] (rows contiguous); y like x or None; gate / shift / scale
    [B, 1, dim]; out [B, n, dim] or None; quant (e4m3 [B, n, dim], float32 scales [B, n]) or None;
    x_out: where the updated residual goes (None: x, in place)."""
    b, n, dim = x.shape
    if b * n == 0:
        return
    k = _kernels()
    block = 1 << (dim - 1).bit_length()
    f32 = lambda t: t.float().contiguous() if t is not None else None  # noqa: E731
    gate, shift, scale = f32(gate), f32(shift), f32(scale)
    aff, mod = weight is not None, shift is not None
    if aff:
        weight, bias = weight.contiguous(), bias.contiguous()
    q, qs = quant if quant is not None else (None, None)
    d = lambda t: x if t is None else t  # noqa: E731  (an unused pointer: any tensor)
    st = lambda t: (t.stride(0), t.stride(1)) if t is not None else (0, 0)  # noqa: E731
    r = x if x_out is None else x_out
    k.row[(b * n,)](x, r, d(y), d(gate), d(out), d(q), d(qs), d(shift), d(scale), d(weight), d(bias),
                    n, dim, *st(x), *st(r), *st(y), *st(out), *st(q), qs.stride(0) if q is not None else 0, dim,
                    float(eps),
                    RESID=y is not None, GATE=gate is not None, NORM=norm, MODULATE=mod, AFFINE=aff,
                    OUT=out is not None, QUANT=q is not None, BLOCK=block, num_warps=_warps(block))


@torch.compiler.disable
def residual_norm(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, eps: float,
                  dtype: torch.dtype, *, shift=None, scale=None, weight=None, bias=None, norm: bool = True,
                  out: torch.Tensor | None = None, want_out: bool = True, quant: bool = False,
                  quant_out: tuple | None = None, x_out: torch.Tensor | None = None):
    """The gated residual update and the next matmul's input in one pass over the rows of x.

    x [B, n, dim] float32 (a token slice may be strided; a host's bfloat16 / float16 residual too, each
    update then rounded to it as the host's own addcmul rounds) gets `x += gate * y` in place (gate
    [B, 1, dim] or None: `x += y`; y None: no update), or, with `x_out` (like x), `x_out = x + gate * y`
    and x is only read (a host's block input stays as it was). Then from the new x: LayerNorm without affine and the
    modulation `* (1 + scale) + shift` (shift/scale [B, 1, dim]), or the affine LayerNorm (weight/bias),
    or no norm (`norm=False`: a cast), in `dtype`, written into `out` when given (y's own buffer may be
    it: each row is read before it is written). quant: also the per-token e4m3 copy (amax / 448 of the
    float32 values, as `moga.fp8` quantises) in the same pass, into `quant_out` (e4m3 [B, n, dim],
    float32 scales [B, n], e.g. token slices of bigger buffers) when given.

    Returns (inp, q8): inp the `dtype` tensor (None unless `want_out` or out given, or when only the
    plain torch path applied and quant was asked: the caller then quantises inp itself), q8 (e4m3,
    scales [B, n]) or None."""
    quant = quant or quant_out is not None
    if x_out is not None and (y is None or x_out.shape != x.shape or x_out.dtype != x.dtype):
        raise ValueError(f"x_out {tuple(x_out.shape)} {x_out.dtype} must be like x {tuple(x.shape)} {x.dtype}, "
                         "with an update y")
    tensors = (x, y, gate, shift, scale, weight, bias, out, x_out) + tuple(quant_out or ())
    fusable = (can_fuse(*tensors) and x.dim() == 3 and x.stride(-1) == 1 and x.dtype in RESIDUAL_DTYPES
               and (x_out is None or x_out.stride(-1) == 1)
               and (y is None or (y.shape == x.shape and y.stride(-1) == 1))
               and (out is None or (out.shape == x.shape and out.stride(-1) == 1 and out.dtype == dtype))
               and all(t is None or t.shape == (x.shape[0], 1, x.shape[2]) for t in (gate, shift, scale))
               and (shift is None) == (scale is None) and (weight is None) == (bias is None)
               and (not quant or _fp8_dtype() is not None))
    want_out = want_out or out is not None
    if not fusable:
        if x_out is not None:
            x = torch.addcmul(x, y, gate, out=x_out) if gate is not None else torch.add(x, y, out=x_out)
        elif y is not None:
            if gate is not None:
                x.addcmul_(y, gate)
            else:
                x += y
        if not (want_out or quant):
            return None, None
        if shift is not None:
            v = modulate(x, shift, scale, eps)
        else:
            v = layer_norm(x, weight, bias, eps) if norm else x
        return (v.to(dtype) if out is None else out.copy_(v)), None
    if out is None and want_out:
        out = torch.empty(x.shape, device=x.device, dtype=dtype)
    q8 = quant_out
    if quant and q8 is None:
        q8 = (torch.empty(x.shape, device=x.device, dtype=_fp8_dtype()),
              torch.empty(x.shape[:2], device=x.device, dtype=torch.float32))
    _row_pass(x, y, gate, eps, out, q8, shift, scale, weight, bias, norm, x_out=x_out)
    return out, q8


@torch.compiler.disable
def gelu_quant(h: torch.Tensor):
    """GELU (tanh approximation) of h [M, k] (rows contiguous) and its per-token e4m3 copy in one pass:
    (e4m3 [M, k], float32 scales [M]), or None when the kernel does not apply (then GELU and quantise
    separately)."""
    if not (can_fuse(h) and h.dim() == 2 and h.stride(-1) == 1 and _fp8_dtype() is not None):
        return None
    m, k = h.shape
    q = torch.empty(m, k, device=h.device, dtype=_fp8_dtype())
    s = torch.empty(m, device=h.device, dtype=torch.float32)
    if m:
        block = 1 << (k - 1).bit_length()
        _kernels().gelu_quant[(m,)](q, s, h, k, h.stride(0), BLOCK=block, num_warps=_warps(block))
    return q, s


def _fp8_dtype():
    return getattr(torch, "float8_e4m3fn", None)


@torch.compiler.disable
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, rope: torch.Tensor | None,
                  num_heads: int) -> torch.Tensor | None:
    """RMSNorm over the last dim (float32) times `weight`, then RoPE per head, IN PLACE on x
    [B, n, dim] (contiguous rows); rope complex [n, head_dim / 2] or None. weight None: no norm, RoPE
    only (a host normed x with its own module). Returns x, or None when the kernel does not apply
    (the caller then runs its plain path)."""
    if not (can_fuse(x, weight) and x.dim() == 3 and x.stride(-1) == 1 and x.is_floating_point()):
        return None
    b, n, dim = x.shape
    head_dim = dim // num_heads
    rp = None
    if rope is not None:
        if rope.dtype != torch.complex64 or tuple(rope.shape) != (n, head_dim // 2):
            return None
        rp = torch.view_as_real(rope.contiguous())
    if x.numel() == 0 or (weight is None and rp is None):
        return x
    k = _kernels()
    half = dim // 2
    block = 1 << (half - 1).bit_length()
    k.rms_rope[(b * n,)](x, weight.contiguous() if weight is not None else x, rp if rp is not None else x, n, half,
                         head_dim // 2, x.stride(0), x.stride(1), float(eps), NORM=weight is not None,
                         ROPE=rp is not None, BLOCK=block, num_warps=_warps(block))
    return x

__all__ = ["FUSED", "can_fuse", "modulate", "layer_norm", "modulate_cast", "layer_norm_cast",
           "residual_norm", "gelu_quant", "rms_norm_rope"]
