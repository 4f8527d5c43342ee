"""moga.host_block (a host's Wan block with the elementwise parts fused) against a float64 transcription of core
ComfyUI's WanAttentionBlock.forward, on random weights: the plain path on any CPU, the Triton kernels through the
interpreter (TRITON_INTERPRET=1; skipped otherwise). On core's own model: tests/test_patch_fast_block.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from moga import fused, host_block
from moga.attention import TokenLayout
from moga.model import rope_freqs

from triton_cpu import interpreted, on_cpu, rel  # noqa: F401  (on_cpu: a fixture)

DIM, HEADS, FFN = 48, 3, 64


def make_parts(seed, norms="weights", norm3="weights"):
    """Random block modules and the HostBlock over them; norms / norm3: 'weights' (read), 'module' (called)."""
    g = torch.Generator().manual_seed(seed)
    lin = lambda i, o: torch.nn.Linear(i, o).requires_grad_(False)  # noqa: E731
    torch.manual_seed(seed)
    m = dict(q=lin(DIM, DIM), k=lin(DIM, DIM), v=lin(DIM, DIM), o=lin(DIM, DIM), cq=lin(DIM, DIM),
             ffn=torch.nn.Sequential(lin(DIM, FFN), torch.nn.GELU(approximate="tanh"), lin(FFN, DIM)))
    m["wq"], m["wk"], m["w3"] = (1 + 0.2 * torch.randn(DIM, generator=g) for _ in range(3))
    m["b3"] = 0.3 * torch.randn(DIM, generator=g)
    m["mod"] = torch.randn(1, 6, DIM, generator=g) / math.sqrt(DIM)
    m["cross"] = lambda c: torch.tanh(m["cq"](c))  # noqa: E731  (any function of norm3(x))

    def norm(w):
        if norms == "weights":
            return host_block.NormWeights(w, None, 1e-6)
        mod = torch.nn.RMSNorm(DIM, eps=1e-6).requires_grad_(False)
        mod.weight.copy_(w)
        return mod
    if norm3 == "weights":
        n3 = host_block.NormWeights(m["w3"], m["b3"], 1e-6)
    elif norm3 == "module":
        n3 = torch.nn.LayerNorm(DIM, 1e-6).requires_grad_(False)
        n3.weight.copy_(m["w3"]), n3.bias.copy_(m["b3"])
    else:
        n3 = None
    parts = host_block.HostBlock(q=m["q"], k=m["k"], v=m["v"], o=m["o"], norm_q=norm(m["wq"]), norm_k=norm(m["wk"]),
                                 heads=HEADS, norm1_eps=1e-6, norm2_eps=1e-6, norm3=n3, modulation=m["mod"],
                                 cross=m["cross"], ffn=m["ffn"])
    return parts, m


def attend_fn(mix):
    def attend(q, k, v, inp):  # dense attention over heads, plus a term of the router input (so it must be right)
        b, n, d = q.shape
        h = lambda t: t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(h(q), h(k), h(v)).transpose(1, 2).reshape(b, n, d)
        return out + inp @ mix.to(inp.dtype)
    return attend


def core_reference(m, x, e, rope, mix, norm3=True):
    """ComfyUI's WanAttentionBlock.forward (v0.3.64 and v0.33.0: the same maths), float64, RoPE as 2x2 matrices."""
    d = lambda t: t.double()  # noqa: E731
    lin = lambda layer, t: F.linear(t, d(layer.weight), d(layer.bias))  # noqa: E731
    x, e = d(x), d(e)
    e = (d(m["mod"]) + e).chunk(6, dim=1)
    ln = lambda t: F.layer_norm(t, (DIM,), eps=1e-6)  # noqa: E731
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * d(w)  # noqa: E731
    b, n, _ = x.shape
    c, s = d(rope.real), d(rope.imag)                        # [n, hd/2]
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)[None, :, None]  # [1, n, 1, hd/2, 2, 2]

    def apply_rope1(t):  # core's: freqs[..., 0] * x[..., 0] + freqs[..., 1] * x[..., 1] on pairs
        t_ = t.view(b, n, HEADS, -1, 1, 2)
        return (rot[..., 0] * t_[..., 0] + rot[..., 1] * t_[..., 1]).reshape(b, n, DIM)

    inp = torch.addcmul(e[0], ln(x), 1 + e[1])
    q = apply_rope1(rms(lin(m["q"], inp), m["wq"]))
    k = apply_rope1(rms(lin(m["k"], inp), m["wk"]))
    y = lin(m["o"], attend_fn(d(mix))(q, k, lin(m["v"], inp), inp))
    x = torch.addcmul(x, y, e[2])
    n3 = F.layer_norm(x, (DIM,), d(m["w3"]), d(m["b3"]), 1e-6) if norm3 else x
    x = x + torch.tanh(lin(m["cq"], n3))
    h = torch.addcmul(e[3], ln(x), 1 + e[4])
    f = lin(m["ffn"][2], F.gelu(lin(m["ffn"][0], h), approximate="tanh"))
    return torch.addcmul(x, f, e[5])


def inputs(seed, batch=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layout = TokenLayout(3, 2, 4)
    x = (torch.randn(batch, layout.num_tokens, DIM, generator=g) * 2 + 0.3).to(dtype)
    e = (torch.randn(batch, 6, DIM, generator=g) * 0.5).to(dtype)
    mix = torch.randn(DIM, DIM, generator=g) * 0.05
    return x, e, rope_freqs(layout, DIM // HEADS), mix


@pytest.mark.parametrize("norms,norm3", [("weights", "weights"), ("module", "module"), ("weights", "none")])
def test_plain_path_is_core_blocks_maths(norms, norm3):
    parts, m = make_parts(1, norms, norm3)
    x, e, rope, mix = inputs(2)
    before = x.clone()
    got = host_block.forward(parts, x, e, rope, attend_fn(mix))
    want = core_reference(m, x, e, rope, mix, norm3=norm3 != "none")
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5
    assert torch.equal(x, before)                            # the block's input is never written
    assert rel(got, core_reference(m, x, e.roll(1, 0), rope, mix)) > 1e-3   # each sample its own modulation


def test_transposed_input_and_modulation_rows_each_matter():
    parts, m = make_parts(3)
    x, e, rope, mix = inputs(4, batch=1)
    xt = x[0].t().contiguous().t()[None]                      # the first block's x: a transposed view
    assert not xt.is_contiguous()
    want = core_reference(m, x, e, rope, mix)
    assert rel(host_block.forward(parts, xt, e, rope, attend_fn(mix)), want) < 1e-5
    for row in range(6):                                     # every modulation row changes the output
        e2 = e.clone()
        e2[:, row] += 0.5
        assert rel(host_block.forward(parts, x, e2, rope, attend_fn(mix)), want) > 1e-4, row
    with pytest.raises(ValueError, match="batch, 6, dim"):
        host_block.forward(parts, x, e[:, None].expand(1, 4, 6, DIM), rope, attend_fn(mix))


def test_rope_from_core_rotation_matrices():
    layout = TokenLayout(2, 3, 2)
    rope = rope_freqs(layout, 16)
    c, s = rope.real, rope.imag
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)[None, :, None].float()
    assert torch.equal(host_block.rope_from_rotations(rot, layout.num_tokens, 16), rope)
    assert host_block.rope_from_rotations(rot, layout.num_tokens + 1, 16) is None      # not every token's
    assert host_block.rope_from_rotations(rot.double(), layout.num_tokens, 16) is None
    skewed = rot.clone()
    skewed[..., 0, 1] *= 1.5                                  # not a rotation: the host's maths would differ
    assert host_block.rope_from_rotations(skewed, layout.num_tokens, 16) is None


@interpreted
@pytest.mark.parametrize("norms", ["weights", "module"])
def test_fused_path_matches_plain(on_cpu, norms):
    parts, m = make_parts(5, norms)
    x, e, rope, mix = inputs(6)
    fused.FUSE_ON_CPU = False
    plain = host_block.forward(parts, x, e, rope, attend_fn(mix))
    fused.FUSE_ON_CPU = True
    got = host_block.forward(parts, x, e, rope, attend_fn(mix))
    assert rel(got, plain) < 1e-5 and rel(got, core_reference(m, x, e, rope, mix)) < 1e-5
    # a bf16 residual (a host's bf16 model): rounded as the host rounds it, within bf16 of the float64 maths
    xb, eb = x.bfloat16(), e.bfloat16()
    bf = dict(q=m["q"], k=m["k"], v=m["v"], o=m["o"], ffn=m["ffn"], cross=m["cross"])
    for name in ("q", "k", "v", "o"):
        bf[name] = torch.nn.Linear(DIM, DIM).bfloat16().requires_grad_(False)
        bf[name].load_state_dict(m[name].state_dict())
    bf["ffn"] = m["ffn"].to(torch.bfloat16)
    cq = m["cq"].to(torch.bfloat16)
    parts_b = host_block.HostBlock(**{**parts.__dict__, **{k: bf[k] for k in ("q", "k", "v", "o", "ffn")},
                                      "cross": lambda c: torch.tanh(cq(c)), "modulation": m["mod"].bfloat16()})
    if norms == "weights":
        parts_b.norm_q = host_block.NormWeights(m["wq"].bfloat16(), None, 1e-6)
        parts_b.norm_k = host_block.NormWeights(m["wk"].bfloat16(), None, 1e-6)
        parts_b.norm3 = host_block.NormWeights(m["w3"].bfloat16(), m["b3"].bfloat16(), 1e-6)
    else:
        parts_b.norm_q, parts_b.norm_k = parts.norm_q.bfloat16(), parts.norm_k.bfloat16()
    got_b = host_block.forward(parts_b, xb, eb, rope, attend_fn(mix))
    fused.FUSE_ON_CPU = False
    plain_b = host_block.forward(parts_b, xb, eb, rope, attend_fn(mix))
    fused.FUSE_ON_CPU = True
    assert got_b.dtype == torch.bfloat16
    want_b = core_reference({**m, "mod": m["mod"].bfloat16()}, xb, eb, rope, mix)
    assert rel(got_b, want_b) < 2e-2 and rel(plain_b, want_b) < 2e-2 and rel(got_b, plain_b) < 2e-2


@interpreted
def test_residual_into_another_buffer_and_bf16_stream(on_cpu):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 9, 40, generator=g) * 3).bfloat16()
    y = torch.randn(2, 9, 40, generator=g).bfloat16()
    gate, shift, scale = (torch.randn(2, 1, 40, generator=g).bfloat16() for _ in range(3))
    before = x.clone()
    want_x = torch.addcmul(x, y, gate)                        # the host's own addcmul, rounded to bf16 once
    want = fused.modulate(want_x, shift, scale, 1e-6).to(torch.bfloat16)
    out = torch.empty_like(x)
    got, _ = fused.residual_norm(x, y, gate, 1e-6, torch.bfloat16, shift=shift, scale=scale, x_out=out)
    assert torch.equal(x, before)
    ulp = torch.pow(2.0, torch.floor(torch.log2(want_x.float().abs().clamp_min(1e-30))) - 7)
    assert torch.all((out.float() - want_x.float()).abs() <= ulp)  # one bf16 step (the interpreter truncates)
    assert rel(got, want) < 1e-2
    # in place, as the library calls it: the stream's own rounding, the norm from the rounded values
    got2, _ = fused.residual_norm(x, y, gate, 1e-6, torch.bfloat16, shift=shift, scale=scale)
    assert torch.equal(x, out) and torch.equal(got2, got)
    with pytest.raises(ValueError, match="x_out"):
        fused.residual_norm(x, None, None, 1e-6, torch.bfloat16, x_out=out)


@interpreted
def test_rope_alone_in_place(on_cpu):
    from moga.attention.layer import apply_rope
    layout = TokenLayout(2, 3, 4)
    rope = rope_freqs(layout, 16)
    t = torch.randn(2, layout.num_tokens, 64, generator=torch.Generator().manual_seed(8))
    want = apply_rope(t.view(2, -1, 4, 16), rope).view(2, -1, 64)
    buf = t.clone()
    got = fused.rms_norm_rope(buf, None, 0.0, rope, 4)
    assert got.data_ptr() == buf.data_ptr() and torch.allclose(got, want, atol=1e-5)
