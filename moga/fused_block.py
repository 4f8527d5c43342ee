"""A Wan block's inference forward with every residual update fused into the pass that makes the next
matmul input (`moga.fused.residual_norm`), and, with fp8 matmuls, every norm writing e4m3 directly.

Plain order (`WanBlock.forward`), per block, over the float32 residual x [N, dim]:
    modulate(x) -> self-attn -> x += g1 * y -> norm3(x) -> cross-attn -> x += c -> modulate(x) -> FFN
    -> x += g2 * f
Fused: three row passes a block, each reading x and the update once and writing the new x and the
next input:
    A  x += g1 * y, norm3(x)                 (into y's buffer, or e4m3 for an fp8 cross-attention q)
    B  x += c, modulate2(x)                  (per cross-attention chunk; the FFN runs on that chunk)
    C  x += g2 * f, the NEXT block's modulate1(x)   (into the carried buffer: `Carry`)
The FFN therefore runs chunk by chunk inside the cross-attention's shot chunks (every row's result
is the same: both are row-wise), and tokens outside every shot (sequence-parallel padding) get the
FFN alone. With fp8 the FFN's GELU writes e4m3 for `ffn.2` in the same pass (`gelu_quant`).

The results differ from the plain path by rounding only (one rounding to bf16 / e4m3 from float32
where the plain path rounds twice); tests compare both through the Triton interpreter.
"""
from __future__ import annotations

import torch

from . import fused
from .fp8 import Fp8Linear, QuantizedActivation, share_quantized

ENABLED = True     # False: the block runs its plain order even where the kernels apply (benchmarks: "-r1")


class Carry:
    """What a block hands the next one in a forward: the next block's self-attention input (and its
    e4m3 copy), made by this block's last residual pass. The model loop calls `prepare` before each
    block; a block that does not fuse ignores it (and the next block then makes its own input)."""

    def __init__(self):
        self.inp = self.q8 = None
        self.next_mod = None      # (shift1, scale1, quantise?) of the next block, or None (last block)

    def prepare(self, blocks, i: int, e: torch.Tensor) -> "Carry":
        """e: the model's e0, [B, 6, dim] or [B, S, 6, dim] (per-segment timesteps: S > 1 runs unfused)."""
        if e.dim() == 4:
            if e.shape[1] != 1:
                self.next_mod = None
                return self
            e = e[:, 0]
        if i + 1 < len(blocks):
            nxt = blocks[i + 1]
            shift, scale = (nxt.modulation.float() + e).chunk(6, dim=1)[:2]
            self.next_mod = (shift, scale, _shares_fp8(nxt.self_attn.q))
        else:
            self.next_mod = None
        return self

    def take(self):
        inp, q8 = self.inp, self.q8
        self.inp = self.q8 = None
        return inp, q8


def applies(x: torch.Tensor) -> bool:
    """Whether the fused block forward runs for this residual (inference, kernels available)."""
    return (ENABLED and not torch.is_grad_enabled() and x.dtype == torch.float32 and x.dim() == 3 and x.is_contiguous()
            and fused.can_fuse(x))


def _fp8_token(layer) -> bool:
    return isinstance(layer, Fp8Linear) and layer.act_scaling == "token"


def _shares_fp8(layer) -> bool:
    return _fp8_token(layer) and layer.share_input


def _as_input(inp, q8, dtype):
    return QuantizedActivation(q8[0], q8[1], dtype) if q8 is not None else inp


def forward(block, x, mods, attend, context_kv, shot_ranges, chunk: int, cdtype, carry: Carry | None = None):
    """`WanBlock.forward` for `applies(x)`: x [B, n, dim] float32, updated in place and returned.
    mods: the six [B, 1, dim] modulation rows; attend(inp) runs the block's self-attention."""
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    eps, n = block.eps, x.shape[1]
    inp, q8 = carry.take() if carry is not None else (None, None)
    if inp is None:
        inp, q8 = fused.residual_norm(x, None, None, eps, cdtype, shift=shift1, scale=scale1,
                                      quant=_shares_fp8(block.self_attn.q))
    if q8 is not None:
        share_quantized(inp, q8[0], q8[1])           # q, k and v take the kernel's e4m3 copy
    y = attend(inp)
    del inp, q8

    # A: x += g1 * y and norm3(x), into y's buffer (or e4m3 for an fp8 cross-attention q)
    own = y.dtype == cdtype and y.shape == x.shape and y.is_contiguous()
    buf = y if own else torch.empty(x.shape, device=x.device, dtype=cdtype)
    q_cross = _fp8_token(block.cross_attn.q)
    n3 = dict(weight=block.norm3.weight, bias=block.norm3.bias) if block.norm3 is not None else dict(norm=False)
    cin, cq = fused.residual_norm(x, y, gate1, eps, cdtype, out=None if q_cross else buf,
                                  want_out=not q_cross, quant=q_cross, **n3)
    del y
    cross_in = _as_input(cin, cq, cdtype)

    # B and C, chunk by chunk: cross-attention, x += c with modulate2, FFN, x += g2 * f with the
    # next block's modulate1 (written into buf: its rows of norm3 are spent by then)
    nxt = carry.next_mod if carry is not None else None
    nq8 = None
    if nxt is not None and nxt[2]:
        nq8 = (torch.empty(x.shape, device=x.device, dtype=fused._fp8_dtype()),
               torch.empty(x.shape[:2], device=x.device, dtype=torch.float32))
    q_ffn = _fp8_token(block.ffn[0])
    for lo, hi, kv in _pieces(shot_ranges, context_kv, n, chunk):
        xs = x[:, lo:hi]
        if kv is not None:
            c = block.cross_attn(cross_in[:, lo:hi], *kv)
            reuse = not q_ffn and c.dtype == cdtype and c.is_contiguous() and c.shape == xs.shape
            m2, mq = fused.residual_norm(xs, c, None, eps, cdtype, shift=shift2, scale=scale2,
                                         out=c if reuse else None, want_out=not q_ffn, quant=q_ffn)
            del c
        else:
            m2, mq = fused.residual_norm(xs, None, None, eps, cdtype, shift=shift2, scale=scale2,
                                         want_out=not q_ffn, quant=q_ffn)
        f = _ffn(block.ffn, _as_input(m2, mq, cdtype), cdtype)
        del m2, mq
        if nxt is None:
            fused.residual_norm(xs, f, gate2, eps, cdtype, want_out=False)
        else:
            fused.residual_norm(xs, f, gate2, eps, cdtype, shift=nxt[0], scale=nxt[1], out=buf[:, lo:hi],
                                quant_out=None if nq8 is None else (nq8[0][:, lo:hi], nq8[1][:, lo:hi]))
        del f
    if carry is not None and nxt is not None:
        carry.inp, carry.q8 = buf, nq8
    return x


def _ffn(ffn, inp, cdtype):
    lin0, act, lin2 = ffn
    h = lin0(inp)
    if _fp8_token(lin2):
        g = fused.gelu_quant(h.reshape(-1, h.shape[-1]))
        if g is not None:                         # GELU and the e4m3 copy for ffn.2 in one pass
            del h
            return lin2(QuantizedActivation(g[0].reshape(*inp.shape[:-1], -1), g[1], cdtype))
    return lin2(act(h))


def _pieces(shot_ranges, context_kv, n: int, chunk: int):
    """(lo, hi, kv): the cross-attention chunks of every shot, then the rows outside every shot
    (kv None: FFN only), each at most `chunk` rows."""
    covered = []
    for s, a, b in shot_ranges:
        for lo in range(a, b, chunk):
            hi = min(lo + chunk, b)
            covered.append((lo, hi))
            yield lo, hi, context_kv[s]
    pos = 0
    for a, b in sorted(covered) + [(n, n)]:
        for lo in range(pos, a, chunk):
            yield lo, min(lo + chunk, a), None
        pos = max(pos, b)


__all__ = ["Carry", "applies", "forward"]
