"""moga.model: the equations against hand-written formulas, a float64 reference forward (per-shot
text included), chunking, MoGA switches, fp8 upcast, and the sequence-parallel path on simulated
ranks."""
from __future__ import annotations

import math

import pytest
import torch

from moga.attention import MoGAConfig, TokenLayout
from moga.model import (WanConfig, WanModel, local_shot_ranges, modulate, rope_freqs, shard_range,
                        shard_tokens, sinusoidal_embedding)
from moga.testing import ThreadExchange, init_random_, random_inputs, tiny_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- equations ----------------------------------------------------------------------------------


def test_sinusoidal_embedding_formula():
    t = torch.tensor([0.0, 1.5, 999.0])
    dim = 8
    got = sinusoidal_embedding(dim, t)
    for r, tv in enumerate(t.tolist()):
        for j in range(dim // 2):
            angle = tv * 10000 ** (-j / (dim // 2))
            assert got[r, j].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert got[r, j + dim // 2].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_freqs_formula_and_wan_split():
    layout = TokenLayout(3, 2, 4, shot_frames=(2, 1))
    head_dim = 12                          # 6 complex channels: split (2, 2, 2)
    got = rope_freqs(layout, head_dim, dtype=torch.complex128)
    assert got.shape == (3 * 2 * 4, 6)
    split = (2, 2, 2)
    for f in range(3):
        for h in range(2):
            for w in range(4):
                row = got[(f * 2 + h) * 4 + w]
                col = 0
                for pos, n in zip((f, h, w), split):
                    for j in range(n):
                        angle = pos * 10000.0 ** (-2 * j / (2 * n))
                        assert row[col].real.item() == pytest.approx(math.cos(angle), abs=1e-12)
                        assert row[col].imag.item() == pytest.approx(math.sin(angle), abs=1e-12)
                        col += 1
    # the frame index runs on across shot cuts: shots change nothing in the positions
    assert torch.equal(got, rope_freqs(TokenLayout(3, 2, 4), head_dim, dtype=torch.complex128))
    assert WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30).rope_split == (22, 21, 21)


def test_modulate_formula():
    g = torch.Generator().manual_seed(1)
    x, shift, scale = (torch.randn(2, 5, 16, generator=g) for _ in range(3))
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    assert rel(modulate(x, shift, scale, 1e-6), want) < 1e-6


def test_config_from_state_dict_shapes():
    def shapes(dim, ffn, layers, text=4096):
        sd = {"patch_embedding.weight": (dim, 16, 1, 2, 2), "head.head.weight": (64, dim),
              "head.modulation": (1, 2, dim), "text_embedding.0.weight": (dim, text),
              "time_embedding.0.weight": (dim, 256)}
        for i in range(layers):
            sd[f"blocks.{i}.ffn.0.weight"] = (ffn, dim)
            sd[f"blocks.{i}.norm3.weight"] = (dim,)
        return sd

    small = WanConfig.from_state_dict(shapes(1536, 8960, 30))
    assert (small.dim, small.num_layers, small.num_heads, small.ffn_dim, small.out_dim) == (1536, 30, 12, 8960, 16)
    assert small.name == "Wan2.1 T2V 1.3B"
    big = WanConfig.from_state_dict(shapes(5120, 13824, 40))
    assert (big.num_heads, big.name) == (40, "Wan2.1 T2V 14B")
    sd = shapes(1536, 8960, 3)
    sd["blocks.0.self_attn.router.weight"] = (8, 1536)
    sd["blocks.2.self_attn.router.weight"] = (8, 1536)
    cfg = WanConfig.from_state_dict(sd)
    assert (cfg.num_groups, cfg.moga_layers) == (8, (0, 2))
    sd["blocks.2.self_attn.router.weight"] = (6, 1536)
    with pytest.raises(ValueError, match="disagree on the group count"):
        WanConfig.from_state_dict(sd)
    sd["blocks.2.self_attn.router.weight"] = (8, 1000)
    with pytest.raises(ValueError, match="router of layer 2"):
        WanConfig.from_state_dict(sd)
    with pytest.raises(ValueError, match="head count cannot be"):
        WanConfig.from_state_dict(shapes(64, 128, 2))


# ---- a float64 reference forward, written from the equations ---------------------------------------


def reference_forward(model: WanModel, x, t, contexts, shot_frames):
    """Wan2.1 T2V in float64 with explicit loops: patchify by reshaping, softmax attention by hand,
    every shot's tokens attend to that shot's (zero-padded) text only."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    lin = lambda v, n: v @ sd[n + ".weight"].T + sd[n + ".bias"]  # noqa: E731
    b, c, f, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    patches = x.double().reshape(b, c, f, h, 2, w, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * h * w, c * 4)
    tok = patches @ sd["patch_embedding.weight"].reshape(cfg.dim, -1).T + sd["patch_embedding.bias"]
    half = cfg.freq_dim // 2
    ang = t.double()[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    sin = torch.cat([ang.cos(), ang.sin()], 1)
    silu = torch.nn.functional.silu
    e = lin(silu(lin(sin, "time_embedding.0")), "time_embedding.2")
    e0 = lin(silu(e), "time_projection.1").reshape(b, 6, cfg.dim)
    gelu = lambda v: torch.nn.functional.gelu(v, approximate="tanh")  # noqa: E731
    texts = []
    for ctx in contexts:
        padded = torch.cat([ctx.double(), torch.zeros(b, cfg.text_len - ctx.shape[1], cfg.text_dim, dtype=torch.float64)], 1)
        texts.append(lin(gelu(lin(padded, "text_embedding.0")), "text_embedding.2"))

    def ln(v, eps=cfg.eps):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + eps)

    def rms(v, wt):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + cfg.eps) * wt

    def attend(q, k, v):  # [n, H, D] x [m, H, D]
        s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), v)

    nh, hd = cfg.num_heads, cfg.head_dim
    # RoPE by explicit rotation of channel pairs
    split = cfg.rope_split
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    angles = torch.cat([pos[:, a:a + 1].double() * 10000.0 ** (-torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))
                        for a, n in enumerate(split)], 1)                    # [N, hd/2]

    def rope(v):  # [N, H, D]
        v2 = v.reshape(v.shape[0], nh, hd // 2, 2)
        cos, sin_ = angles.cos()[:, None], angles.sin()[:, None]
        out = torch.stack([v2[..., 0] * cos - v2[..., 1] * sin_, v2[..., 0] * sin_ + v2[..., 1] * cos], -1)
        return out.reshape(v.shape)

    bounds = [0]
    for s in shot_frames:
        bounds.append(bounds[-1] + s * h * w)
    out_rows = []
    for bi in range(b):
        xb = tok[bi]
        for i in range(cfg.num_layers):
            p = f"blocks.{i}."
            m = sd[p + "modulation"][0] + e0[bi]
            y = ln(xb) * (1 + m[1]) + m[0]
            q = rope(rms(lin(y, p + "self_attn.q"), sd[p + "self_attn.norm_q.weight"]).reshape(-1, nh, hd))
            k = rope(rms(lin(y, p + "self_attn.k"), sd[p + "self_attn.norm_k.weight"]).reshape(-1, nh, hd))
            v = lin(y, p + "self_attn.v").reshape(-1, nh, hd)
            xb = xb + lin(attend(q, k, v).reshape(-1, cfg.dim), p + "self_attn.o") * m[2]
            y = ln(xb) * sd[p + "norm3.weight"] + sd[p + "norm3.bias"]
            cross = []
            for s in range(len(shot_frames)):
                ys = y[bounds[s]:bounds[s + 1]]
                ctx = texts[s][bi]
                q = rms(lin(ys, p + "cross_attn.q"), sd[p + "cross_attn.norm_q.weight"]).reshape(-1, nh, hd)
                k = rms(lin(ctx, p + "cross_attn.k"), sd[p + "cross_attn.norm_k.weight"]).reshape(-1, nh, hd)
                v = lin(ctx, p + "cross_attn.v").reshape(-1, nh, hd)
                cross.append(lin(attend(q, k, v).reshape(-1, cfg.dim), p + "cross_attn.o"))
            xb = xb + torch.cat(cross)
            y = ln(xb) * (1 + m[4]) + m[3]
            xb = xb + lin(gelu(lin(y, p + "ffn.0")), p + "ffn.2") * m[5]
        mh = sd["head.modulation"][0] + e[bi]
        out_rows.append(lin(ln(xb) * (1 + mh[1]) + mh[0], "head.head"))
    out = torch.stack(out_rows)                                              # [B, N, 4 * C]
    out = out.reshape(b, f, h, w, 1, 2, 2, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, cfg.out_dim, f, hh, ww)


@pytest.mark.parametrize("shots", [(3,), (1, 2), (1, 1, 1)])
def test_forward_matches_float64_reference_with_per_shot_text(shots):
    model = tiny_model(seed=3, num_layers=2)
    x, t, ctx = random_inputs(model.config, frames=sum(shots), height=6, width=8, batch=2,
                              shots=len(shots), seed=4, t=421.0)
    contexts = ctx if isinstance(ctx, list) else [ctx]
    with torch.inference_mode():
        got = model(x, t, ctx, shot_frames=shots)
    want = reference_forward(model, x, t, contexts, shots)
    assert rel(got, want) < 1e-5


def test_shot_tokens_see_only_their_own_text():
    # one layer: self-attention runs before the cross-attention, so shot 0's output cannot depend
    # on shot 1's text at all
    model = tiny_model(seed=5, num_layers=1)
    x, t, ctx = random_inputs(model.config, frames=3, height=4, width=4, shots=2, seed=6)
    other = [ctx[0], torch.randn_like(ctx[1])]
    with torch.inference_mode():
        a = model(x, t, ctx, shot_frames=(1, 2))
        b = model(x, t, other, shot_frames=(1, 2))
    assert torch.equal(a[:, :, :1], b[:, :, :1])
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_one_text_for_all_shots_equals_single_shot():
    model = tiny_model(seed=7)
    x, t, ctx = random_inputs(model.config, frames=4, height=4, width=6, seed=8)
    with torch.inference_mode():
        one = model(x, t, ctx)
        shared = model(x, t, ctx, shot_frames=(1, 3))
        listed = model(x, t, [ctx, ctx], shot_frames=(1, 3))
    assert torch.allclose(one, shared, atol=1e-6) and torch.equal(shared, listed)


def test_chunking_does_not_change_the_output():
    model = tiny_model(seed=9)
    x, t, ctx = random_inputs(model.config, frames=3, height=6, width=6, shots=2, seed=10)
    with torch.inference_mode():
        whole = model(x, t, ctx, shot_frames=(2, 1))
        model.chunk_tokens = 5
        chunked = model(x, t, ctx, shot_frames=(2, 1))
    assert rel(chunked, whole) < 1e-6


def test_moga_switches_and_dense_layers():
    plain = tiny_model(seed=11, num_layers=3)
    routed = tiny_model(seed=11, num_layers=3, num_groups=4)   # same weights + routers
    x, t, ctx = random_inputs(plain.config, frames=4, height=8, width=8, seed=12)
    cfg = routed.moga_config
    assert cfg.num_groups == 4
    with torch.inference_mode():
        dense = plain(x, t, ctx)
        sparse = routed(x, t, ctx)
        all_dense = routed(x, t, ctx, dense_layers=(0, 1, 2))
        off = routed(x, t, ctx, moga=cfg.replace(dense=True))
        one_layer = routed(x, t, ctx, dense_layers=(0, 2))
        merged = routed(x, t, ctx, moga=cfg.replace(num_groups=2))
    assert torch.equal(all_dense, dense) and torch.equal(off, dense)
    for other in (sparse, one_layer, merged):
        assert not torch.allclose(other, dense, atol=1e-4)
    assert not torch.allclose(sparse, one_layer, atol=1e-4)
    with pytest.raises(ValueError, match="moga patch --groups"):
        with torch.inference_mode():
            routed(x, t, ctx, moga=cfg.replace(num_groups=9))


def test_one_group_without_static_branches_is_dense():
    plain = tiny_model(seed=13)
    routed = tiny_model(seed=13, num_groups=1)
    x, t, ctx = random_inputs(plain.config, frames=3, height=6, width=6, seed=14)
    only_routed = MoGAConfig(num_groups=1, windowed=False, per_frame=False)
    with torch.inference_mode():
        assert rel(routed(x, t, ctx, moga=only_routed), plain(x, t, ctx)) < 1e-5


def test_fp8_weights_upcast_per_layer():
    model = tiny_model(seed=15)
    ref = tiny_model(seed=15)
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2:
            q = p.data.to(torch.float8_e4m3fn)
            p.data = q
            dict(ref.named_parameters())[name].data = q.float()
    model.compute_dtype = torch.float32
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    x, t, ctx = random_inputs(model.config, seed=16)
    with torch.inference_mode():
        assert rel(model(x, t, ctx), ref(x, t, ctx)) < 1e-6
        model.compute_dtype = None                  # default: bfloat16 compute for fp8 weights
        assert rel(model(x, t, ctx), ref(x, t, ctx)) < 0.05


def test_bad_inputs_name_the_problem():
    model = tiny_model()
    x, t, ctx = random_inputs(model.config, frames=3)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"x must be \[B, 16"):
            model(x[:, :8], t, ctx)
        with pytest.raises(ValueError, match="add up to"):
            model(x, t, ctx, shot_frames=(1, 1))
        with pytest.raises(ValueError, match="one per shot"):
            model(x, t, [ctx], shot_frames=(1, 2))
        with pytest.raises(ValueError, match="text embedding must be"):
            model(x, t, torch.randn(1, 5, 99))


def test_bfloat16_model_runs_and_stays_close():
    model = tiny_model(seed=17)
    x, t, ctx = random_inputs(model.config, seed=18)
    with torch.inference_mode():
        want = model(x, t, ctx)
        got = model.to(torch.bfloat16)(x, t, ctx)
    assert got.dtype == torch.float32 and rel(got, want) < 0.05


def test_inference_in_place_path_equals_autograd_path():
    model = tiny_model(seed=23)
    model.chunk_tokens = 7
    x, t, ctx = random_inputs(model.config, frames=3, height=6, width=6, shots=2, batch=2, seed=24)
    with torch.inference_mode():
        fast = model(x, t, ctx, shot_frames=(1, 2))
    with torch.enable_grad():
        slow = model(x, t, ctx, shot_frames=(1, 2))
    assert rel(fast, slow) < 1e-6


def _backward_grads(checkpointing: bool):
    model = tiny_model(seed=19, num_groups=3).train().requires_grad_(True)
    model.gradient_checkpointing = checkpointing
    x, t, ctx = random_inputs(model.config, frames=2, height=4, width=4, seed=20)
    model.chunk_tokens = 3
    model(x, t, ctx).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_training_backward_reaches_every_parameter():
    grads = _backward_grads(False)
    assert not [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]


@pytest.mark.slow  # torch's first checkpoint call costs seconds of imports
def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = _backward_grads(False), _backward_grads(True)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n


# ---- sequence parallel ----------------------------------------------------------------------------


def test_shard_helpers():
    assert [shard_range(27, r, 4) for r in range(4)] == [(0, 7, 7), (7, 14, 7), (14, 21, 7), (21, 27, 7)]
    assert shard_range(3, 3, 4) == (3, 3, 1)   # more ranks than tokens: an empty, padded shard
    t = torch.arange(10.0).reshape(1, 10, 1)
    part = shard_tokens(t, 7, 10, 4)
    assert part.flatten().tolist() == [7, 8, 9, 0]
    layout = TokenLayout(3, 2, 2, shot_frames=(1, 2))   # shots: tokens [0, 4), [4, 12)
    assert local_shot_ranges(layout, 2, 8) == [(0, 0, 2), (1, 2, 6)]
    assert local_shot_ranges(layout, 8, 12) == [(1, 0, 4)]
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


@pytest.mark.parametrize("world,routed", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_sequence_parallel_matches_single_process(world, routed):
    model = tiny_model(seed=21, num_groups=4 if routed else 0)
    # 3 x 3 x 3 = 27 tokens: the last shard is padded for P = 2 and P = 4
    x, t, ctx = random_inputs(model.config, frames=3, height=6, width=6, shots=2, seed=22)
    with torch.inference_mode():
        want = model(x, t, ctx, shot_frames=(2, 1))
    outs = ThreadExchange.run(world, lambda ex: model(x, t, ctx, shot_frames=(2, 1), parallel=ex))
    for out in outs:
        assert rel(out, want) < 1e-5
