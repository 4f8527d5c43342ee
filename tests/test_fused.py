"""Fused elementwise kernels (moga.fused) against the plain torch path they replace, through Triton's CPU
interpreter (TRITON_INTERPRET=1 at import; skipped otherwise), and the switch logic without Triton."""

import pytest
import torch

from moga import fused
from moga.attention.layer import RMSNorm, apply_rope, norm_rope
from moga.attention import TokenLayout
from moga.model import rope_freqs
from moga.testing import random_inputs, tiny_model

from triton_cpu import interpreted, on_cpu, rel  # noqa: E402,F401  (on_cpu: a fixture)


def within_bf16_ulp(got, ref64, slack=0.0):
    """Every element within one bf16 step of the float64 value (round to nearest is within half a step;
    Triton 3.6's CPU interpreter truncates instead, so one step is what both meet); `slack` absolute."""
    ulp = torch.pow(2.0, torch.floor(torch.log2(ref64.abs().clamp_min(1e-30))) - 7)
    return bool(torch.all((got.double() - ref64).abs() <= ulp * 1.01 + slack))


def test_plain_path_off_the_gpu_and_with_gradients():
    """Without CUDA (and not forced) or when autograd needs the op, nothing is fused."""
    x = torch.randn(2, 5, 8)
    assert not fused.can_fuse(x)
    assert fused.rms_norm_rope(x, torch.ones(8), 1e-6, None, 2) is None
    fused.FUSE_ON_CPU = True
    try:
        assert not fused.can_fuse(x.requires_grad_())
        fused.FUSED = False
        assert not fused.can_fuse(x.detach())
    finally:
        fused.FUSE_ON_CPU, fused.FUSED = False, True
    shift, scale = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    assert torch.equal(fused.modulate_cast(x.detach(), shift, scale, 1e-6, torch.float32),
                       fused.modulate(x.detach(), shift, scale, 1e-6))


@interpreted
def test_modulate_and_layer_norm_cast(on_cpu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 40, generator=g) * 3 + 1
    shift, scale = torch.randn(2, 1, 40, generator=g), torch.randn(2, 1, 40, generator=g)
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    chunk = x[:, 3:9]                                       # a strided token slice, as the FFN chunks
    mod64 = fused.modulate(chunk.double(), shift.double(), scale.double(), 1e-6)
    ln64 = fused.layer_norm(chunk.double(), w.double(), b.double(), 1e-6)
    got = fused.modulate_cast(chunk, shift, scale, 1e-6, torch.float32)
    assert got.shape == chunk.shape and rel(got, mod64) < 1e-6
    assert rel(fused.layer_norm_cast(chunk, w, b, 1e-6, torch.float32), ln64) < 1e-6
    got = fused.modulate_cast(chunk, shift, scale, 1e-6, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and within_bf16_ulp(got, mod64, 1e-5)
    assert within_bf16_ulp(fused.layer_norm_cast(chunk, w, b, 1e-6, torch.bfloat16), ln64, 1e-5)
    assert torch.allclose(fused.layer_norm_cast(x, None, None, 1e-6, torch.float32),
                          fused.layer_norm(x, None, None, 1e-6), atol=1e-5)


@interpreted
def test_rms_norm_rope_matches_norm_then_rope(on_cpu):
    g = torch.Generator().manual_seed(1)
    heads, dim = 4, 64
    lay = TokenLayout(3, 2, 5)
    rope = rope_freqs(lay, dim // heads)
    norm = RMSNorm(dim).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    x = torch.randn(2, lay.num_tokens, dim, generator=g) * 2
    for r in (rope, None):
        fused.FUSE_ON_CPU = False
        plain = norm_rope(norm, x.clone(), r, heads)
        fused.FUSE_ON_CPU = True
        buf = x.clone()
        got = norm_rope(norm, buf, r, heads)
        assert got.data_ptr() == buf.data_ptr()            # in place
        assert torch.allclose(got, plain, atol=1e-5), r is None
    # bf16: the fused kernel rounds once, at the end (the plain path rounds three times)
    xb = x.to(torch.bfloat16)
    normb = RMSNorm(dim).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        normb.weight.copy_(norm.weight)
    xd = xb.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * normb.weight.double()
    ref64 = apply_rope(normed.view(2, -1, heads, dim // heads), rope.to(torch.complex128)).view_as(normed)
    got = norm_rope(normb, xb.clone(), rope, heads)
    assert got.dtype == torch.bfloat16 and within_bf16_ulp(got, ref64, 1e-5)


@interpreted
def test_model_step_fused_matches_plain(on_cpu):
    """A whole tiny MoGA step: every fused hook (self-attention, cross-attention with norm3, FFN) on vs off."""
    model = tiny_model(seed=2, num_groups=2)
    x, t, ctx = random_inputs(model.config, frames=4, height=6, width=8, shots=2, seed=3)
    with torch.no_grad():
        fused.FUSE_ON_CPU = False
        plain = model(x, t, ctx, shot_frames=(2, 2))
        fused.FUSE_ON_CPU = True
        got = model(x, t, ctx, shot_frames=(2, 2))
    assert rel(got, plain) < 1e-5
