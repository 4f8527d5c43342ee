"""fp8 matmuls for the DiT's linear layers: e4m3 weights x e4m3 activations on fp8 tensor cores, bf16 out.

    from moga.fp8 import enable_fp8, fp8_problem
    report = enable_fp8(model)            # fp8 files: use their weights and scales as stored;
                                          # bf16 files: quantise at load (per-row scales, recorded)
    print(report.summary())               # or the reason it is off (CPU, capability < 8.9, no _scaled_mm)

Layers: every block's self-attention q k v o, cross-attention q k v o and FFN (the ~14e9 x tokens x 2 FLOPs
of a 14B step); the text, time and head layers and the routers keep their own precision (small, and the
head and modulation are float32 in Wan).

Scales: weights as the file has them: plain fp8_e4m3fn (scale 1), Comfy-Org's scaled fp8 (one float32
`scale_weight` per tensor), or one scale per output row ([out] or [out, 1]); e5m2 weights are re-quantised to
e4m3 per row. Activations are quantised on the fly: per token (amax of the row / 448, the default, one
Triton pass on CUDA) or per tensor. `torch._scaled_mm` computes (x8 * sx) @ (w8 * sw)^T + bias with a float32
accumulator. Where one side has per-row scales the other is expanded to per-row too (the row-wise kernel
wants both).

Error: e4m3 keeps 3 mantissa bits, so a rounded value is off by at most 2^-4 relative (RMS ~2^-4 / sqrt(12)
* 2 ~ 3.6% of the value for values spread over a binade); a dot product of two rounded vectors has a relative
error of about sqrt(2) x that in the RMS sense, ~5%, and at most (1 + 2^-4)^2 - 1 = 12.9% of sum |x_i w_i|.
`benchmarks/dit.py` reports one step's output against the bf16 path.

`reference_linear` is the same maths dequantised in float32 / float64 (the CPU path, and the tests).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .lazy_triton import triton_kernels

E4M3 = getattr(torch, "float8_e4m3fn", None)
E5M2 = getattr(torch, "float8_e5m2", None)
E4M3_MAX = 448.0
TINY = 1e-12          # a row of zeros (sequence-parallel padding) gets this amax, so its scale is not 0
ACT_SCALING = ("token", "tensor")
FAST_ACCUM = True     # Hopper's fp8 fast accumulation: its error is far below e4m3 rounding (~1e-3 vs ~5e-2)


def fp8_problem(device) -> str | None:
    """Why fp8 matmuls cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn / torch._scaled_mm"
    if device.type != "cuda":
        return (f"fp8 matmuls need a CUDA GPU with fp8 tensor cores (compute capability >= 8.9: "
                f"Ada, Hopper, Blackwell); this run is on {device.type}: bf16 matmuls are used")
    if not torch.cuda.is_available():
        return "CUDA is not available: bf16 matmuls are used"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"{name} has compute capability {cap[0]}.{cap[1]} < 8.9: no fp8 tensor cores; "
                f"bf16 matmuls are used")
    return None


# ---- quantisation (torch; the Triton kernel below computes the same per-token scales) --------


def weight_scales(w: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """float32 scales that map `w` [out, in] into e4m3's range: amax / 448 per row ([out]) or per tensor (())."""
    a = w.detach().abs().float()
    amax = a.amax(dim=1) if per_row else a.amax()
    return amax.clamp_min(TINY) / E4M3_MAX


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 of x / scale (round to nearest even, clamped to +-448); scale broadcasts against x's rows."""
    s = scale.float()
    if s.dim() == 1:
        s = s[:, None]
    return (x.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight(w: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [out, in], float32 scale [out] or ()) with w ~= q * scale."""
    s = weight_scales(w, per_row)
    return quantize(w, s), s


def activation_scales(x2: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """float32 scales of x2 [M, K]: amax / 448 per row ([M]) or for the tensor (())."""
    if mode not in ACT_SCALING:
        raise ValueError(f"activation scaling must be one of {ACT_SCALING}, got {mode!r}")
    a = x2.abs()
    amax = a.amax(dim=1) if mode == "token" else a.amax()
    return amax.float().clamp_min(TINY) / E4M3_MAX


def quantize_activation(x2: torch.Tensor, mode: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [M, K], float32 scale [M] or ()) of a 2-D activation; one Triton pass per token on CUDA."""
    if mode == "token" and x2.is_cuda and x2.numel():
        k = _kernel()
        if k is not None:
            return _quantize_rows_triton(k, x2)
    s = activation_scales(x2, mode)
    return quantize(x2, s), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    s = scale.to(dtype)
    return q.to(dtype) * (s[:, None] if s.dim() == 1 else s)


def reference_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor | None, bias,
                     mode: str = "token", dtype=torch.float32) -> torch.Tensor:
    """What `fp8_linear` computes, dequantised in `dtype` (float32 or float64): the CPU path and the
    tests' reference. Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activation(x2, mode)
    out = dequantize(xq, xs, dtype) @ dequantize(w8, _row_scale(w_scale, w8), dtype).t()
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], w8.shape[0])


def _row_scale(scale, w8) -> torch.Tensor:
    """A weight's scale as () or [out] float32 (files store (), [1], [out] or [out, 1])."""
    if scale is None:
        return torch.ones((), device=w8.device)
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == w8.shape[0]:
        return s.reshape(-1)
    raise ValueError(f"scale_weight has {s.numel()} values for a weight of {w8.shape[0]} rows: "
                     f"one per tensor or one per output row is supported")


# ---- the matmul ------------------------------------------------------------------------------

# q, k and v read one input: its quantised copy is kept for the next layer that shares it, keyed by the
# tensor's identity (and version where autograd tracks one). Only layers marked `share_input` use it (the
# self-attention's q k v, whose input nobody edits in place between the three calls); the entry dies with
# its input, so it holds no memory past the tensor it came from.
_SHARED: list = [None]   # (weakref to the input, its version, mode, x8, scale)
_BIAS_IN_MM = [True]


def _version(t: torch.Tensor):
    return None if torch.is_inference(t) else t._version


def _cached_quant(x2: torch.Tensor, key: torch.Tensor, mode: str):
    hit = _SHARED[0]
    if hit is not None and hit[0]() is key and hit[1] == _version(key) and hit[2] == mode:
        return hit[3], hit[4]
    xq, xs = quantize_activation(x2, mode)
    slot = _SHARED
    ref = weakref.ref(key, lambda r: slot.__setitem__(0, None) if slot[0] and slot[0][0] is r else None)
    _SHARED[0] = (ref, _version(key), mode, xq, xs)
    return xq, xs


def share_quantized(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, mode: str = "token") -> None:
    """Hand the next `share_input` layers reading x (the self-attention's q k v) its e4m3 copy made
    elsewhere (a fused norm kernel): xq [..., K] like x, xs the per-token scales [x.numel() / K]."""
    slot = _SHARED
    ref = weakref.ref(x, lambda r: slot.__setitem__(0, None) if slot[0] and slot[0][0] is r else None)
    _SHARED[0] = (ref, _version(x), mode, xq.reshape(-1, x.shape[-1]), xs.reshape(-1))


class QuantizedActivation:
    """A matmul input that exists only as e4m3 rows with per-token scales (made by a fused kernel:
    `moga.fused`), standing for a tensor of `shape` and `dtype`; `Fp8Linear` takes it as its input."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.q, self.scale, self.dtype = q, scale.reshape(-1), dtype
        self.shape = q.shape

    def __getitem__(self, rows):
        """A token slice [:, lo:hi] of a [B, n, K] activation (its scales follow)."""
        b, n, k = self.shape
        q = self.q.reshape(b, n, k)[rows]
        return QuantizedActivation(q, self.scale.reshape(b, n)[rows[:2]], self.dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        s = self.scale.to(dtype)
        return self.q.to(dtype) * (s if s.numel() == 1 else s.reshape(*self.shape[:-1], 1))


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor | None, bias=None,
               mode: str = "token", out_dtype=torch.bfloat16, share_input: bool = False) -> torch.Tensor:
    """x [..., in] (bf16) @ fp8 weight [out, in] (scaled) + bias -> [..., out] out_dtype, on fp8 tensor cores.
    share_input: reuse the quantised x of the previous sharing call on this same tensor."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    xq, xs = _cached_quant(x2, x, mode) if share_input else quantize_activation(x2, mode)
    return scaled_linear(xq, xs, w8, w_scale, bias, out_dtype).reshape(*x.shape[:-1], w8.shape[0])


def scaled_linear(xq: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor, w_scale, bias=None,
                  out_dtype=torch.bfloat16) -> torch.Tensor:
    """e4m3 xq [M, K] (scales xs [M] or ()) @ e4m3 w8 [out, K] (scaled) + bias -> [M, out] out_dtype."""
    n = w8.shape[0]
    ws = _row_scale(w_scale, w8)
    m = xq.shape[0]
    if xs.dim() or ws.dim():          # row-wise kernel: both sides row-wise
        sa = (xs if xs.dim() else xs.expand(m)).reshape(m, 1).contiguous()
        sb = (ws if ws.dim() else ws.expand(n)).reshape(1, n).contiguous()
    else:
        sa, sb = xs, ws
    b = bias.to(out_dtype) if bias is not None else None
    if b is not None and _BIAS_IN_MM[0]:
        try:
            return torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=out_dtype,
                                    use_fast_accum=FAST_ACCUM)
        except RuntimeError:
            _BIAS_IN_MM[0] = False     # this torch's kernel takes no bias here: add it after
    out = torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)
    if b is not None:
        out += b
    return out


class Fp8Linear(nn.Linear):
    """A linear layer with an e4m3 `weight` [out, in] and float32 `scale_weight` (() or [out]). On a GPU with
    fp8 (`fp8_problem` None) it runs `fp8_linear`; elsewhere `reference_linear` (same maths, dequantised)."""

    act_scaling = "token"
    share_input = False

    def forward(self, x) -> torch.Tensor:
        scale = self._buffers.get("scale_weight")
        if isinstance(x, QuantizedActivation):
            return self._forward_quantized(x, scale)
        if x.is_cuda:
            return fp8_linear(x, self.weight, scale, self.bias, self.act_scaling, x.dtype, self.share_input)
        if not self.share_input:
            return reference_linear(x, self.weight, scale, self.bias, self.act_scaling)
        x2 = x.reshape(-1, x.shape[-1])     # CPU, shared: the quantised input a fused kernel handed over
        xq, xs = _cached_quant(x2, x, self.act_scaling)
        return self._forward_quantized(QuantizedActivation(xq.reshape(x.shape), xs, x.dtype), scale)

    def _forward_quantized(self, x: QuantizedActivation, scale) -> torch.Tensor:
        k, n = x.shape[-1], self.weight.shape[0]
        if x.q.is_cuda:
            q2 = x.q.reshape(-1, k)
            out = scaled_linear(q2 if q2.is_contiguous() else q2.contiguous(), x.scale.reshape(-1),
                                self.weight, scale, self.bias, x.dtype)
        else:   # the CPU path: the same maths dequantised, as `reference_linear`
            w = dequantize(self.weight, _row_scale(scale, self.weight))
            out = x.dequantize().reshape(-1, k) @ w.t()
            if self.bias is not None:
                out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], n)


_CHECKED: dict = {}


def self_check(device) -> str | None:
    """Run one small fp8 matmul on `device` against `reference_linear` (once per device): None when it
    agrees, else why not (then fast accumulation is tried off before giving up)."""
    global FAST_ACCUM
    key = str(torch.device(device))
    if key in _CHECKED:
        return _CHECKED[key]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, 128, device=device, generator=g).to(torch.bfloat16)
    w8, ws = quantize_weight(torch.randn(32, 128, device=device, generator=g))
    b = torch.randn(32, device=device, generator=g).to(torch.bfloat16)
    why = None
    for fast in (FAST_ACCUM, False):
        FAST_ACCUM = fast
        try:
            got = fp8_linear(x, w8, ws, b)
            ref = reference_linear(x, w8, ws, b)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            why = None if err < 2e-2 else f"torch._scaled_mm is {err:.1e} off its reference"
        except Exception as e:  # an unsupported scale layout or kernel on this GPU / torch
            why = f"torch._scaled_mm failed here: {str(e).splitlines()[0][:200]}"
        if why is None:
            break
    _CHECKED[key] = why
    return why


# ---- switching a model over ----------------------------------------------------------------


@dataclass
class Fp8Report:
    enabled: bool
    reason: str | None = None                       # why it is off
    layers: int = 0
    from_file: int = 0                              # fp8 weights used as stored
    quantized: int = 0                              # bf16/fp16/fp32 weights quantised here
    requantized: int = 0                            # e5m2 weights re-quantised to e4m3
    weight_scaling: str = "row"
    act_scaling: str = "token"
    skipped: list = field(default_factory=list)     # (name, why)

    def summary(self) -> str:
        if not self.enabled:
            return f"fp8 matmuls off: {self.reason}"
        return (f"fp8 matmuls on {self.layers} layers ({self.from_file} fp8 as stored, {self.quantized} "
                f"quantised at load with per-{self.weight_scaling} scales, {self.requantized} e5m2 re-quantised); "
                f"activations per {self.act_scaling}")


FP8_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
              "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@torch.no_grad()
def enable_fp8(model: nn.Module, device=None, quantize_bf16: bool = True, weight_scaling: str = "row",
               act_scaling: str = "token", force: bool = False) -> Fp8Report:
    """Switch the blocks' linear layers of a WanModel to `Fp8Linear`, in place.

    fp8 weights (with their `scale_weight`) are used as stored; others are quantised when `quantize_bf16`
    (per "row" or per "tensor" scales, recorded as `scale_weight`: the layer's weight is then e4m3). Off (and the
    model unchanged) where `fp8_problem` says so, unless `force` (tests: the CPU reference path)."""
    if weight_scaling not in ("row", "tensor"):
        raise ValueError(f"weight_scaling must be 'row' or 'tensor', got {weight_scaling!r}")
    if act_scaling not in ACT_SCALING:
        raise ValueError(f"act_scaling must be one of {ACT_SCALING}, got {act_scaling!r}")
    if device is None:
        device = next(model.parameters()).device
    problem = fp8_problem(device)
    if problem is None:
        problem = self_check(device)
    report = Fp8Report(enabled=False, reason=problem, weight_scaling=weight_scaling, act_scaling=act_scaling)
    if problem and not force:
        return report
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("enable_fp8 expects a WanModel (a module with .blocks)")
    for i, block in enumerate(blocks):
        for name in FP8_LAYERS:
            try:
                lin = block.get_submodule(name)
            except AttributeError:
                continue
            full = f"blocks.{i}.{name}"
            w = lin.weight
            if w.shape[0] % 16 or w.shape[1] % 16:
                report.skipped.append((full, f"shape {tuple(w.shape)} is not a multiple of 16"))
                continue
            scale = lin._buffers.get("scale_weight")
            if w.dtype == E4M3:
                report.from_file += 1
                if scale is not None:
                    lin._buffers["scale_weight"] = _row_scale(scale, w)
            elif w.dtype == E5M2 or quantize_bf16:
                real = w.float() * _row_scale(scale, w).reshape(-1, 1) if scale is not None else w.float()
                q, s = quantize_weight(real, per_row=weight_scaling == "row")
                lin._parameters["weight"] = nn.Parameter(q, requires_grad=False)
                lin._buffers["scale_weight"] = s
                if w.dtype == E5M2:
                    report.requantized += 1
                else:
                    report.quantized += 1
            else:
                report.skipped.append((full, f"{w.dtype} weight and quantize_bf16=False"))
                continue
            lin.__class__ = Fp8Linear
            lin.act_scaling = act_scaling
            lin.share_input = name in ("self_attn.q", "self_attn.k", "self_attn.v")
            report.layers += 1
    report.enabled = report.layers > 0
    if not report.enabled:
        report.reason = "no layer could be switched: " + "; ".join(f"{n}: {w}" for n, w in report.skipped[:3])
    return report


# ---- Triton: per-token amax -> e4m3 in one pass ------------------------------------------------


@triton_kernels
def _kernel(triton, tl):
    """The per-token quantisation kernel (`_kernel()`: None when Triton is not importable)."""
    @triton.jit
    def quant_rows(out_ptr, scale_ptr, x_ptr, k, sx, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < k
        x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        s = tl.math.div_rn(amax, 448.0)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0)
        tl.store(out_ptr + row * k + cols, y.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(scale_ptr + row, s)
    return quant_rows


def _quantize_rows_triton(kernel, x2: torch.Tensor):
    m, k = x2.shape
    out = torch.empty(m, k, device=x2.device, dtype=E4M3)
    scale = torch.empty(m, device=x2.device, dtype=torch.float32)
    block = 1 << (k - 1).bit_length()
    kernel[(m,)](out, scale, x2, k, x2.stride(0), BLOCK=block, num_warps=max(1, min(16, block // 512)))
    return out, scale


__all__ = ["fp8_problem", "enable_fp8", "Fp8Linear", "Fp8Report", "fp8_linear", "reference_linear",
           "scaled_linear", "share_quantized", "QuantizedActivation",
           "quantize", "quantize_weight", "quantize_activation", "weight_scales", "activation_scales",
           "dequantize", "E4M3_MAX"]
