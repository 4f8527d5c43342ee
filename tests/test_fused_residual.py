"""The fused residual passes (moga.fused.residual_norm, gelu_quant) and the fused block forward
(moga.fused_block) against the plain torch path, through Triton's CPU interpreter (TRITON_INTERPRET=1 at
import; skipped otherwise), plus the parts that need no Triton."""

import pytest
import torch
import torch.nn.functional as F

from moga import fp8, fused, fused_block
from moga.testing import random_inputs, tiny_model

from triton_cpu import interpreted, on_cpu, rel  # noqa: E402,F401  (on_cpu: a fixture)


def e4m3_close(q, s, ref64):
    """q * s against float64 values: the scale amax / 448 of the row, and every scaled element rounded to
    the nearest e4m3 value (within half a step, 2^(e - 4) for |v / s| in [2^e, 2^(e+1)), 2^-10 below 2^-6;
    a little slack for the float32 arithmetic before it). The kernels round onto e4m3's grid in float32
    before the cast, so Triton's interpreter (whose own conversion loses carries) agrees with the GPU."""
    amax = ref64.abs().amax(-1)
    assert torch.allclose(s.double(), amax / 448, rtol=1e-6)
    v = ref64 / s.double()[..., None]
    half = torch.pow(2.0, torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6))) - 4)
    return bool(torch.all((q.double() - v).abs() <= half * 1.001 + 1e-4 * v.abs()))


def test_pieces_cover_every_row_once_and_put_shots_first():
    kv = ["a", "b"]
    pieces = list(fused_block._pieces([(0, 2, 5), (1, 9, 14)], kv, 17, 3))
    assert [p[2] for p in pieces[:3]] == ["a", "b", "b"] and all(p[2] is None for p in pieces[3:])
    rows = sorted(r for lo, hi, _ in pieces for r in range(lo, hi))
    assert rows == list(range(17)) and all(hi - lo <= 3 for lo, hi, _ in pieces)


def test_plain_fallback_is_the_unfused_expressions():
    """Off the GPU residual_norm is exactly x += gate * y and the plain modulate / norm / cast."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    y = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16)
    gate, shift, scale = (torch.randn(2, 1, 16, generator=g) for _ in range(3))
    want_x = x.clone().addcmul_(y, gate)
    want = fused.modulate(want_x, shift, scale, 1e-6).to(torch.bfloat16)
    got, q8 = fused.residual_norm(x, y, gate, 1e-6, torch.bfloat16, shift=shift, scale=scale, quant=True)
    assert torch.equal(x, want_x) and torch.equal(got, want) and q8 is None
    assert fused.residual_norm(x, y, None, 1e-6, torch.bfloat16, want_out=False) == (None, None)
    assert torch.equal(x, want_x + y.float())
    assert fused.gelu_quant(y[0]) is None


@interpreted
@pytest.mark.parametrize("mode", ["modulate", "affine", "cast"])
def test_residual_norm_matches_float64(on_cpu, mode):
    g = torch.Generator().manual_seed({"modulate": 1, "affine": 2, "cast": 3}[mode])
    base = torch.randn(2, 13, 48, generator=g) * 3 + 0.5
    x = base[:, 2:11].clone()[:, :, :]                  # the kernel updates a slice of a bigger stream
    stream = base.clone()
    xs = stream[:, 2:11]                                 # strided over the batch, as the FFN chunks
    y = (torch.randn(2, 9, 48, generator=g) * 2).to(torch.bfloat16)
    gate, shift, scale = (torch.randn(2, 1, 48, generator=g) for _ in range(3))
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    new64 = x.double() + y.double() * gate.double()
    kw = dict(modulate=dict(shift=shift, scale=scale), affine=dict(weight=w, bias=b), cast=dict(norm=False))[mode]
    if mode == "modulate":
        ref64 = fused.modulate(new64, shift.double(), scale.double(), 1e-6)
    elif mode == "affine":
        ref64 = F.layer_norm(new64, (48,), w.double(), b.double(), 1e-6)
    else:
        ref64 = new64
    out, q8 = fused.residual_norm(xs, y, gate, 1e-6, torch.float32, quant=True, **kw)
    assert rel(xs, new64) < 1e-6 and rel(out, ref64) < 1e-6
    assert torch.equal(stream[:, :2], base[:, :2]) and torch.equal(stream[:, 11:], base[:, 11:])
    assert q8[0].dtype == fp8.E4M3 and q8[1].shape == (2, 9) and e4m3_close(q8[0].float(), q8[1], ref64)


@interpreted
def test_residual_norm_writes_into_y_and_into_slices_of_buffers(on_cpu):
    """out = y's own buffer (each row read before written), no gate, quant_out token slices."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 40, generator=g)
    y = torch.randn(2, 10, 40, generator=g).to(torch.bfloat16)
    shift, scale = torch.randn(2, 1, 40, generator=g), torch.randn(2, 1, 40, generator=g)
    ref64 = fused.modulate(x.double() + y.double(), shift.double(), scale.double(), 1e-6)
    q = torch.zeros(2, 16, 40, dtype=fp8.E4M3)
    s = torch.full((2, 16), -1.0)
    out, q8 = fused.residual_norm(x, y, None, 1e-6, torch.bfloat16, shift=shift, scale=scale, out=y,
                                  quant_out=(q[:, 3:13], s[:, 3:13]))
    assert out.data_ptr() == y.data_ptr() and q8[0].data_ptr() == q[:, 3:13].data_ptr()
    ulp = torch.pow(2.0, torch.floor(torch.log2(ref64.abs().clamp_min(1e-30))) - 7)
    assert torch.all((y.double() - ref64).abs() <= ulp * 1.01 + 1e-5)
    assert e4m3_close(q[:, 3:13].float(), s[:, 3:13], ref64)
    assert torch.all(s[:, :3] == -1) and torch.all(s[:, 13:] == -1) and torch.all(q[:, 13:].float() == 0)
    # no output at all: only the residual update
    before = x.clone()
    assert fused.residual_norm(x, y, None, 1e-6, torch.bfloat16, want_out=False) == (None, None)
    assert torch.allclose(x, before + y.float(), atol=1e-6)


@interpreted
def test_gelu_quant_matches_gelu_then_quantise(on_cpu):
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(7, 96, generator=g) * 4).to(torch.bfloat16)
    h[2, :5] = torch.tensor([30.0, -30.0, 0.0, 1e-3, -6.0])      # the tanh's saturated ends and 0
    q, s = fused.gelu_quant(h)
    ref64 = F.gelu(h.double(), approximate="tanh")
    assert q.dtype == fp8.E4M3 and s.shape == (7,) and e4m3_close(q.float(), s, ref64)


def _count_quantisations(monkeypatch):
    calls = []
    real = fp8.quantize_activation

    def counting(x2, mode="token"):
        calls.append(x2.shape)
        return real(x2, mode)
    monkeypatch.setattr(fp8, "quantize_activation", counting)
    return calls


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_step_fused_block_matches_plain(on_cpu, dtype):
    """A tiny MoGA step (2 shots, several chunks a shot, 3 blocks) through the fused block vs the plain one."""
    model = tiny_model(seed=2, num_groups=2, num_layers=3).to(dtype)
    model.chunk_tokens = 10
    x, t, ctx = random_inputs(model.config, frames=4, height=6, width=8, shots=2, seed=3)
    with torch.no_grad():
        fused.FUSE_ON_CPU = False
        plain = model(x, t, ctx, shot_frames=(2, 2))
        fused.FUSE_ON_CPU = True
        got = model(x, t, ctx, shot_frames=(2, 2))
    assert rel(got, plain) < (1e-5 if dtype == torch.float32 else 2e-2)
    if dtype == torch.bfloat16:     # not the same as the float32 step: the bf16 step's own error
        ref = tiny_model(seed=2, num_groups=2, num_layers=3)
        ref.chunk_tokens = 10
        with torch.no_grad():
            want = ref(x, t, ctx, shot_frames=(2, 2))
        assert rel(got, want) < 2 * rel(plain, want) + 1e-3


@interpreted
def test_fp8_step_takes_the_kernels_e4m3(on_cpu, monkeypatch):
    """fp8 matmuls (CPU reference path): the fused block hands its e4m3 rows to q k v, the cross q and both
    FFN layers (four quantise passes a block fewer), and the step stays as close to the plain fp8 step
    as the two roundings allow (far below fp8's own error against bf16)."""
    model = tiny_model(seed=4, num_groups=2, num_layers=3, dim=64, ffn_dim=128).to(torch.bfloat16)
    model.chunk_tokens = 12
    x, t, ctx = random_inputs(model.config, frames=4, height=6, width=8, shots=2, seed=5)
    with torch.no_grad():
        fused.FUSE_ON_CPU = False
        bf16 = model(x, t, ctx, shot_frames=(2, 2))
        assert fp8.enable_fp8(model, device="cpu", force=True).layers == 30
        calls = _count_quantisations(monkeypatch)
        plain = model(x, t, ctx, shot_frames=(2, 2))
        n_plain = len(calls)
        fused.FUSE_ON_CPU = True
        calls.clear()
        got = model(x, t, ctx, shot_frames=(2, 2))
    chunks = 2 * -(-24 // 12)               # per block: 2 shots of 24 tokens, chunks of 12
    # plain, per block: qkv 1, o 1, cross q per chunk, cross o per chunk, ffn.0 / ffn.2 per FFN chunk (48 / 12)
    # fused: o 1, cross o per chunk (the others come from the kernels); cross k/v of the texts in both
    assert n_plain - len(calls) == 3 * (1 + chunks + 2 * 4)
    err_fp8 = rel(plain, bf16)
    print(f"fp8 vs bf16: plain {err_fp8:.2e}, fused {rel(got, bf16):.2e}; fused vs plain {rel(got, plain):.2e}")
    # the two round to e4m3 from different values (float32 in the kernels, bf16 in the plain path), so about
    # one element in 30 lands on the other neighbour: their difference is of fp8's own size, not far below
    assert err_fp8 > 1e-3 and rel(got, plain) < err_fp8
    assert rel(got, bf16) < 1.25 * err_fp8


@interpreted
def test_per_frame_timesteps_take_the_plain_block(on_cpu, monkeypatch):
    """Several timestep segments (TI2V's per-frame t): the fused block steps aside, the result is the plain one."""
    model = tiny_model(seed=6, num_groups=2, num_layers=2)
    x, _, ctx = random_inputs(model.config, frames=4, height=6, width=8, seed=7)
    t = torch.tensor([[0.0, 500.0, 500.0, 700.0]])
    used = []
    real = fused_block.forward
    monkeypatch.setattr(fused_block, "forward", lambda *a, **k: used.append(1) or real(*a, **k))
    with torch.no_grad():
        fused.FUSE_ON_CPU = False
        plain = model(x, t, ctx)
        fused.FUSE_ON_CPU = True
        got = model(x, t, ctx)
        assert not used
        one = model(x, torch.tensor([500.0]), ctx)      # one segment: fused again
    assert used and torch.allclose(got, plain, atol=1e-5) and one.shape == got.shape
