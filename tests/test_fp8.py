"""fp8 matmuls (moga.fp8): the quantisation maths against a float64 emulation of e4m3, the dequantised
reference path against hand-written maths, switching a model over, and (CUDA with fp8 only) the real kernel."""
import math
import os

import pytest
import torch

from moga import fp8
from moga.testing import random_inputs, tiny_model

pytestmark = pytest.mark.skipif(fp8.E4M3 is None, reason="this torch has no float8_e4m3fn")


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """e4m3fn rounding in float64 written out: 3 mantissa bits, exponent >= -6 (subnormal steps 2^-9),
    round half to even, saturate at 448."""
    v = v.double()
    a = v.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=-6)
    step = torch.pow(2.0, e - 3)
    q = torch.round(v / step) * step           # torch.round: half to even
    return torch.where(a > 0, q, torch.zeros_like(q)).clamp(-448, 448)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_quantize_matches_e4m3_emulation():
    g = torch.Generator().manual_seed(0)
    # values over many binades (subnormals included), exact ties, the edges
    v = torch.randn(4000, generator=g, dtype=torch.float64) * torch.pow(2.0, torch.randint(-12, 9, (4000,), generator=g))
    ties = (torch.arange(-60, 60, dtype=torch.float64) + 0.5) * 2.0 ** -5   # halfway between steps of 2^-4
    v = torch.cat([v.clamp(-448, 448), ties, torch.tensor([448.0, -448.0, 2.0 ** -9, 2.0 ** -10, 0.0])]).float()
    got = fp8.quantize(v, torch.ones(())).double()
    assert torch.equal(got, e4m3_round(v.double()))


def test_weight_scales_fill_the_range_and_bound_the_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) * torch.rand(48, 1, generator=g) * 3
    for per_row in (True, False):
        q, s = fp8.quantize_weight(w, per_row=per_row)
        assert q.dtype == fp8.E4M3 and s.dtype == torch.float32
        assert s.shape == ((48,) if per_row else ())
        amax = q.float().abs().amax(dim=1) if per_row else q.float().abs().amax()
        assert torch.all(amax == 448)                       # the largest value maps onto e4m3's largest
        back = fp8.dequantize(q, s, torch.float64)
        s_rows = (s[:, None] if per_row else s).double()
        # half a step of e4m3: 2^-4 relative for normal values, 2^-10 (times the scale) for subnormals
        bound = torch.maximum(w.double().abs() * 2.0 ** -4, s_rows * 2.0 ** -10) * (1 + 1e-6)
        assert torch.all((back - w.double()).abs() <= bound)


def test_reference_linear_is_the_quantised_maths():
    """reference_linear in float64 against the same maths written out with the e4m3 emulation."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 32, generator=g) * 2
    x[0, 1] = 0                                              # a zero row (padding): scale stays positive
    w = torch.randn(16, 32, generator=g)
    b = torch.randn(16, generator=g)
    w8, ws = fp8.quantize_weight(w)
    for mode in ("token", "tensor"):
        got = fp8.reference_linear(x.double(), w8, ws, b, mode=mode, dtype=torch.float64)
        x2 = x.reshape(-1, 32).double()
        amax = x2.abs().amax(dim=1, keepdim=True) if mode == "token" else x2.abs().amax()
        sx = (torch.clamp(amax.float(), min=1e-12) / 448).double()   # float32 scales, as the module
        xd = e4m3_round(x2 / sx) * sx
        wd = e4m3_round(w.double() / ws.double()[:, None]) * ws.double()[:, None]
        want = (xd @ wd.t() + b.double()).reshape(2, 5, 16)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), mode
        assert torch.isfinite(got).all()
        assert torch.allclose(got[0, 1], b.double(), atol=1e-12)    # zero row -> bias only


def test_fp8_error_is_that_of_e4m3_rounding():
    """On random data the fp8 product is ~4-5% off the exact one: under the sqrt(2) * 2^-4 bound the
    module states, and far from 0 (so the test fails if nothing is quantised)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 512, generator=g, dtype=torch.float64)
    w = torch.randn(128, 512, generator=g, dtype=torch.float64) / math.sqrt(512)
    w8, ws = fp8.quantize_weight(w)
    exact = x @ w.t()
    for mode in ("token", "tensor"):
        err = rel(fp8.reference_linear(x, w8, ws, None, mode=mode, dtype=torch.float64), exact)
        assert 0.01 < err < math.sqrt(2) * 2 ** -4, (mode, err)


def test_scale_shapes_and_bad_scales():
    w8, ws = fp8.quantize_weight(torch.randn(16, 32))
    x = torch.randn(3, 32)
    ref = fp8.reference_linear(x, w8, ws, None)
    for shaped in (ws.reshape(16, 1), ws.reshape(16)):
        assert torch.equal(fp8.reference_linear(x, w8, shaped, None), ref)
    one = fp8.reference_linear(x, w8, torch.tensor([2.0]), None)
    assert torch.allclose(one, 2 * fp8.reference_linear(x, w8, None, None))
    with pytest.raises(ValueError, match="one per output row"):
        fp8.reference_linear(x, w8, torch.ones(5), None)
    with pytest.raises(ValueError, match="activation scaling"):
        fp8.activation_scales(x, "channel")


def test_problem_off_the_gpu_says_why():
    why = fp8.fp8_problem("cpu")
    assert "8.9" in why and "cpu" in why
    model = tiny_model(seed=0, dim=64, ffn_dim=128, num_heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fp8.enable_fp8(model, device="cpu")
    assert not report.enabled and report.reason == why and "off" in report.summary()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_enable_fp8_on_a_model_reference_path():
    """Forced on the CPU (the reference path): the blocks' layers become e4m3 with recorded scales, the step
    stays within fp8 error of the float32 model, and a Comfy "scaled fp8" layer keeps its file scale."""
    model = tiny_model(seed=4, dim=64, ffn_dim=128, num_heads=4)
    x, t, ctx = random_inputs(model.config, frames=2, height=8, width=8, seed=5)
    with torch.no_grad():
        ref = model(x, t, ctx)
    # one layer as a scaled-fp8 file stores it: e4m3 weight + a per-tensor scale_weight
    lin = model.blocks[0].ffn[0]
    w8, s = fp8.quantize_weight(lin.weight, per_row=False)
    lin._parameters["weight"] = torch.nn.Parameter(w8, requires_grad=False)
    lin.register_buffer("scale_weight", s.reshape(()))
    report = fp8.enable_fp8(model, device="cpu", force=True)
    n = len(model.blocks) * len(fp8.FP8_LAYERS)
    assert report.enabled and report.layers == n and report.from_file == 1 and report.quantized == n - 1
    assert model.blocks[0].ffn[0].scale_weight.shape == ()          # the file's scale, as stored
    assert model.blocks[0].self_attn.q.scale_weight.shape == (64,)  # quantised here: per row
    assert all(isinstance(b.ffn[2], fp8.Fp8Linear) and b.ffn[2].weight.dtype == fp8.E4M3 for b in model.blocks)
    assert model.blocks[0].self_attn.router is None or model.blocks[0].self_attn.router.weight.dtype != fp8.E4M3
    with torch.no_grad():
        got = model(x, t, ctx)
    err = rel(got, ref)
    assert torch.isfinite(got).all() and 1e-4 < err < 0.1, err


def test_e5m2_weights_are_requantised_and_skips_reported():
    e5m2 = getattr(torch, "float8_e5m2", None)
    if e5m2 is None:
        pytest.skip("no float8_e5m2")
    model = tiny_model(seed=6, dim=64, ffn_dim=128, num_heads=4)
    lin = model.blocks[1].self_attn.o
    lin._parameters["weight"] = torch.nn.Parameter(lin.weight.to(e5m2), requires_grad=False)
    report = fp8.enable_fp8(model, device="cpu", force=True, quantize_bf16=False)
    assert report.requantized == 1 and report.layers == 1 and lin.weight.dtype == fp8.E4M3
    assert len(report.skipped) == len(model.blocks) * len(fp8.FP8_LAYERS) - 1


def test_triton_row_quantisation_matches_torch():
    """The CUDA per-token kernel through Triton's CPU interpreter (needs TRITON_INTERPRET=1 at import)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (and install triton) to run the Triton kernel on a CPU")
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 80, generator=g) * torch.rand(9, 1, generator=g) * 10).to(torch.bfloat16)
    x[3] = 0
    kernel = fp8._kernel()
    assert kernel is not None
    q, s = fp8._quantize_rows_triton(kernel, x)
    s_ref = fp8.activation_scales(x, "token")
    assert torch.equal(s, s_ref)
    got, want = q.float(), fp8.quantize(x, s_ref).float()
    # Triton 3.6's interpreter converts to e4m3 in its own way: a value that rounds up into the next binade
    # loses the carry (64 for 127 -> 128) and exact ties go away from zero. The GPU's conversion rounds to
    # nearest even (the CUDA test below checks exact equality). Every other element must match.
    off = got != want
    assert off.float().mean() < 0.1
    v = (x.float() / s[:, None])[off].double()
    w, o = want[off].double(), got[off].double()
    carry = (o * 2 == w) & (torch.log2(w.abs()) == torch.log2(w.abs()).round())
    tie = (v - o).abs() == (v - w).abs()
    assert torch.all(carry | tie)


needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or fp8.fp8_problem("cuda") is not None,
                                   reason="needs a CUDA GPU with fp8 tensor cores")


@needs_fp8_gpu
def test_scaled_mm_matches_the_reference_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(300, 512, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(256, 512, device="cuda", generator=g) / math.sqrt(512)
    b = torch.randn(256, device="cuda", generator=g).to(torch.bfloat16)
    for per_row in (True, False):
        w8, ws = fp8.quantize_weight(w, per_row=per_row)
        for mode in ("token", "tensor"):
            got = fp8.fp8_linear(x, w8, ws, b, mode=mode)
            ref = fp8.reference_linear(x, w8, ws, b, mode=mode)
            assert got.dtype == torch.bfloat16 and rel(got, ref) < 1e-2, (per_row, mode)
            exact = x.double() @ w.double().t() + b.double()
            assert rel(got, exact) < math.sqrt(2) * 2 ** -4
    q, s = fp8.quantize_activation(x, "token")          # the Triton kernel on the GPU
    s_ref = fp8.activation_scales(x, "token")
    assert torch.equal(s, s_ref) and torch.equal(q.float(), fp8.quantize(x, s_ref).float())


def test_a_file_with_per_row_scales_loads_and_switches(tmp_path):
    """A scaled-fp8 file whose scale_weight holds one scale per output row: the loader keeps the rows
    ([out, 1], so the bf16 path dequantises right) and enable_fp8 uses them as stored."""
    from safetensors.torch import save_file
    from moga.checkpoint import load_model
    ref = tiny_model(seed=9, dim=64, ffn_dim=128, num_heads=4)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2 and "router" not in k:
            q, s = fp8.quantize_weight(v)
            sd[k], sd[k[: -len("weight")] + "scale_weight"] = q, s
            ref.get_parameter(k).data = fp8.dequantize(q, s)
        else:
            sd[k] = v.contiguous()
    sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    sd["scaled_fp8"] = torch.empty(0, dtype=fp8.E4M3)
    save_file(sd, str(tmp_path / "rows.safetensors"))
    model = load_model(tmp_path / "rows.safetensors", dtype=torch.float32, num_heads=4)
    assert model.blocks[0].ffn[0].scale_weight.shape == (128, 1)
    x, t, ctx = random_inputs(model.config, frames=2, height=8, width=8, seed=10)
    with torch.no_grad():
        want, got = ref(x, t, ctx), model(x, t, ctx)
        assert rel(got, want) < 1e-5
        report = fp8.enable_fp8(model, device="cpu", force=True)
        assert report.from_file == report.layers == len(model.blocks) * len(fp8.FP8_LAYERS)
        assert model.blocks[0].ffn[0].scale_weight.shape == (128,)
        assert 1e-4 < rel(model(x, t, ctx), want) < 0.1     # activations now quantised too
