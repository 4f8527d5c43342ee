"""MoGA's three branches and both fusions against an independent dense masked float64 reference.

The reference builds each branch's boolean mask token by token from the definitions (router
groups, window cells over shot chunks plus context frames, latent frames) and runs one dense
softmax per branch; it shares no index code with moga.attention.mixture.
"""
import math
import zlib

import pytest
import torch

from moga.attention import MoGAAttention, MoGAConfig, TokenLayout, dense_attention, moga_attention
from moga.attention.router import Routing


# ---------------------------------------------------------------- the reference
def _coords(layout, t):
    tpf = layout.height * layout.width
    return t // tpf, (t % tpf) // layout.width, t % layout.width


def _part(x, size, parts):
    """Index of the grid part holding position x when `size` is cut into `parts` (floor edges)."""
    for p in range(parts):
        if math.floor(p * size / parts) <= x < math.floor((p + 1) * size / parts):
            return p
    raise AssertionError("position outside the grid")


def _chunks(layout, frames):
    out, start = [], 0
    for n in layout.shot_frames:
        shot = list(range(start, start + n))
        step = n if frames == 0 else frames
        out += [shot[i:i + step] for i in range(0, n, step)]
        start += n
    return out


def reference_masks(layout, cfg, group_ids):
    """{branch: bool [N, N]} for one batch element; mask[i, j] = query i may see key j."""
    n = layout.num_tokens
    wf, rows, cols = cfg.window
    chunks = _chunks(layout, wf)
    chunk_of = {f: ci for ci, ch in enumerate(chunks) for f in ch}
    masks = {}
    if cfg.routed:
        masks["routed"] = torch.tensor([[bool(group_ids[i] == group_ids[j]) for j in range(n)]
                                        for i in range(n)])
    if cfg.windowed:
        cell = [(_coords(layout, t)[0], _part(_coords(layout, t)[1], layout.height, rows),
                 _part(_coords(layout, t)[2], layout.width, cols)) for t in range(n)]
        frame = torch.tensor([c[0] for c in cell])
        same_cell = torch.tensor([[cell[i][1:] == cell[j][1:] for j in range(n)] for i in range(n)])
        seen = torch.zeros(n, layout.frames, dtype=torch.bool)  # frames query i's window sees
        for i in range(n):
            cj = chunk_of[cell[i][0]]
            frames = list(chunks[cj])
            if cj > 0 and cfg.context_frames:
                frames += chunks[cj - 1][-cfg.context_frames:]
            if cj + 1 < len(chunks):
                frames += chunks[cj + 1][:cfg.context_frames]
            seen[i, frames] = True
        masks["window"] = same_cell & seen[:, frame]
    if cfg.per_frame:
        f = torch.tensor([_coords(layout, t)[0] for t in range(n)])
        masks["frame"] = f[:, None] == f[None, :]
    return masks


def _masked(q, k, v, weight):
    """softmax with per-key multiplicities `weight` [N, N] (0 = masked) -> out [N, H, D]."""
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    s = s + torch.log(weight.to(s.dtype))[None]
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def reference_attention(q, k, v, routing, layout, cfg):
    q, k, v = (t.double() for t in (q, k, v))
    outs = []
    for b in range(q.shape[0]):
        ids = routing.group_ids[b].tolist() if routing is not None else None
        masks = reference_masks(layout, cfg, ids)
        if cfg.fusion == "lse":
            count = sum(m.double() for m in masks.values())  # a key in two branches counts twice
            outs.append(_masked(q[b], k[b], v[b], count))
            continue
        acc = 0
        for name, m in masks.items():
            o = _masked(q[b], k[b], v[b], m.double())
            if name == "routed":
                o = o * routing.gate[b].double()[:, None, None]
            acc = acc + o
        outs.append(acc / len(masks))
    return torch.stack(outs)


# ---------------------------------------------------------------- inputs
def _routing(ids, num_groups, gen):
    probs = torch.softmax(torch.randn(*ids.shape, num_groups, generator=gen, dtype=torch.float64), -1)
    return Routing(ids, probs.gather(-1, ids[..., None])[..., 0], probs)


def _ids(kind, b, n, gen):
    if kind == "many":
        return torch.randint(0, 7, (b, n), generator=gen), 7
    if kind == "one":
        return torch.zeros(b, n, dtype=torch.long), 1
    if kind == "empty":  # groups 1, 2, 4, 5 stay empty
        return torch.randint(0, 2, (b, n), generator=gen) * 3, 6
    if kind == "one_token":  # two groups of a single token, the rest together
        ids = torch.zeros(b, n, dtype=torch.long)
        ids[:, 3], ids[:, n - 1] = 1, 2
        return ids, 3
    if kind == "more_groups_than_tokens":
        return torch.stack([torch.randperm(n + 9, generator=gen)[:n] for _ in range(b)]), n + 9
    if kind == "uneven":
        ids = (torch.rand(b, n, generator=gen) > 0.9).long() * torch.randint(1, 4, (b, n), generator=gen)
        return ids, 4
    raise KeyError(kind)


def _qkv(shape, gen, dtype=torch.float64):
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LAYOUT_ONE = TokenLayout(4, 3, 4)
LAYOUT_SHOTS = TokenLayout(6, 3, 5, (1, 3, 2))


# ---------------------------------------------------------------- the tests
@pytest.mark.parametrize("kind", ["many", "one", "empty", "one_token", "more_groups_than_tokens",
                                  "uneven"])
@pytest.mark.parametrize("fusion", ["mean", "lse"])
def test_groups_match_reference(kind, fusion):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, fusion)).encode()))
    lay = LAYOUT_SHOTS
    ids, m = _ids(kind, 2, lay.num_tokens, gen)  # batch 2: different assignments per element
    routing = _routing(ids, m, gen)
    q, k, v = _qkv((2, lay.num_tokens, 2, 8), gen)
    cfg = MoGAConfig(num_groups=m, fusion=fusion, backend="sdpa")
    out = moga_attention(q, k, v, routing, lay, cfg)
    assert _rel(out, reference_attention(q, k, v, routing, lay, cfg)) < 1e-12
    assert torch.equal(out, moga_attention(q, k, v, routing, lay, cfg))  # deterministic


@pytest.mark.parametrize("layout", [LAYOUT_ONE, LAYOUT_SHOTS, TokenLayout(7, 2, 3, (3, 1, 3))])
@pytest.mark.parametrize("window", [(0, 2, 2), (0, 2, 3), (2, 2, 2), (0, 1, 1), (1, 3, 2),
                                    (0, 4, 6)])
@pytest.mark.parametrize("context", [0, 1, 2])
def test_static_branches_match_reference(layout, window, context):
    """Ragged cells (2x3 or 3x2 on odd frames), cells finer than the frame (4x6 on 3 rows:
    empty cells), chunks inside shots, context 0/1/2 at the first and last shot and chunk."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, window, context)).encode()))
    q, k, v = _qkv((1, layout.num_tokens, 2, 4), gen)
    ids, m = _ids("many", 1, layout.num_tokens, gen)
    routing = _routing(ids, m, gen)
    for fusion in ("mean", "lse"):
        cfg = MoGAConfig(num_groups=m, window=window, context_frames=context, fusion=fusion,
                         backend="sdpa")
        ref = reference_attention(q, k, v, routing, layout, cfg)
        assert _rel(moga_attention(q, k, v, routing, layout, cfg), ref) < 1e-12
    only = MoGAConfig(window=window, context_frames=context, routed=False, per_frame=False,
                      backend="reference")
    assert _rel(moga_attention(q, k, v, None, layout, only),
                reference_attention(q, k, v, None, layout, only)) < 1e-12


@pytest.mark.parametrize("branches", [(True, False, False), (False, True, False),
                                      (False, False, True), (True, True, False), (False, True, True)])
def test_branch_subsets(branches):
    gen = torch.Generator().manual_seed(7)
    lay = LAYOUT_SHOTS
    ids, m = _ids("many", 2, lay.num_tokens, gen)
    routing = _routing(ids, m, gen)
    q, k, v = _qkv((2, lay.num_tokens, 3, 4), gen)
    for fusion in ("mean", "lse"):
        cfg = MoGAConfig(num_groups=m, routed=branches[0], windowed=branches[1],
                         per_frame=branches[2], fusion=fusion, backend="sdpa")
        assert _rel(moga_attention(q, k, v, routing, lay, cfg),
                    reference_attention(q, k, v, routing, lay, cfg)) < 1e-12


def test_lse_fusion_overlap_counted_twice():
    """With window (1,1,1) and no context, window groups are the frames: every key of the frame
    branch appears twice, so lse fusion must differ from a union without multiplicity."""
    gen = torch.Generator().manual_seed(3)
    lay = LAYOUT_SHOTS
    q, k, v = _qkv((1, lay.num_tokens, 2, 4), gen)
    ids, m = _ids("uneven", 1, lay.num_tokens, gen)
    routing = _routing(ids, m, gen)
    cfg = MoGAConfig(num_groups=m, window=(1, 1, 1), context_frames=0, fusion="lse", backend="sdpa")
    out = moga_attention(q, k, v, routing, lay, cfg)
    masks = reference_masks(lay, cfg, ids[0].tolist())
    assert torch.equal(masks["window"], masks["frame"])
    twice = _masked(q[0], k[0], v[0], sum(mm.double() for mm in masks.values()))
    once = _masked(q[0], k[0], v[0], (masks["routed"] | masks["frame"]).double())
    assert _rel(out[0], twice) < 1e-12
    assert _rel(out[0], once) > 1e-3


def test_one_group_without_static_branches_is_dense_exactly():
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    lay = LAYOUT_SHOTS
    for dtype in (torch.float32, torch.bfloat16):
        layer = MoGAAttention(32, 4, num_groups=1).to(dtype)
        x = torch.randn(2, lay.num_tokens, 32, generator=gen).to(dtype)
        dense = layer(x, lay, config=layer.config.replace(dense=True))
        for fusion in ("mean", "lse"):
            cfg = MoGAConfig(num_groups=1, windowed=False, per_frame=False, fusion=fusion)
            assert torch.equal(layer(x, lay, config=cfg), dense)
        q, k, v = _qkv((2, lay.num_tokens, 2, 8), gen, dtype)
        routing = Routing(torch.zeros(2, lay.num_tokens, dtype=torch.long),
                          torch.ones(2, lay.num_tokens), torch.ones(2, lay.num_tokens, 1))
        cfg = MoGAConfig(num_groups=1, windowed=False, per_frame=False)
        assert torch.equal(moga_attention(q, k, v, routing, lay, cfg), dense_attention(q, k, v))


def test_layer_matches_reference_with_rope_and_merged_groups():
    torch.manual_seed(5)
    lay = TokenLayout(5, 3, 4, (2, 3))
    layer = MoGAAttention(48, 3, num_groups=6).double()
    x = torch.randn(2, lay.num_tokens, 48, dtype=torch.float64)
    angles = torch.rand(lay.num_tokens, 8, dtype=torch.float64) * 6.3
    rope = torch.polar(torch.ones_like(angles), angles)
    cfg = layer.config.replace(num_groups=4, context_frames=2)  # run-time merge 6 -> 4
    layer.record_routing = True
    out = layer(x, lay, rope=rope, config=cfg)
    routing = layer.last_routing
    assert routing.probs.shape[-1] == 4
    q, k, v = layer.qkv(x, rope)
    ref = layer.o(reference_attention(q, k, v, routing, lay, cfg).flatten(2))
    assert _rel(out, ref) < 1e-12


def test_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    lay = LAYOUT_ONE
    n = lay.num_tokens
    base = [torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # [B, N, H, D] views, not contiguous
    assert not q.is_contiguous()
    ids, m = _ids("many", 2, n, gen)
    ids = torch.cat([ids, ids], 1)[:, ::2]  # non-contiguous ids too
    routing = _routing(ids, m, gen)
    for fusion in ("mean", "lse"):
        cfg = MoGAConfig(num_groups=m, fusion=fusion, backend="sdpa")
        assert _rel(moga_attention(q, k, v, routing, lay, cfg),
                    reference_attention(q, k, v, routing, lay, cfg)) < 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                        (torch.float16, 3e-3)])
@pytest.mark.parametrize("fusion", ["mean", "lse"])
def test_low_precision(dtype, tol, fusion):
    gen = torch.Generator().manual_seed(4)
    lay = LAYOUT_SHOTS
    q, k, v = _qkv((2, lay.num_tokens, 2, 16), gen)
    ids, m = _ids("many", 2, lay.num_tokens, gen)
    routing = _routing(ids, m, gen)
    cfg = MoGAConfig(num_groups=m, fusion=fusion, backend="sdpa")
    ref = reference_attention(q, k, v, routing, lay, cfg)
    low = Routing(ids, routing.gate.float(), routing.probs.float())
    out = moga_attention(q.to(dtype), k.to(dtype), v.to(dtype), low, lay, cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel(out, ref) < tol


def test_inference_keeps_no_autograd_state():
    lay = LAYOUT_ONE
    layer = MoGAAttention(16, 2, num_groups=3)
    x = torch.randn(1, lay.num_tokens, 16)
    with torch.no_grad():
        out = layer(x, lay)
    assert out.grad_fn is None and layer.last_routing is None
    out = layer(x, lay)
    out.square().sum().backward()  # training: gradients reach every parameter, the router too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_lse_gradients_through_sdpa():
    gen = torch.Generator().manual_seed(8)
    lay = TokenLayout(3, 1, 2, (1, 2))
    q, k, v = (t.requires_grad_() for t in _qkv((1, lay.num_tokens, 1, 2), gen))
    ids, m = _ids("many", 1, lay.num_tokens, gen)
    routing = _routing(ids, m, gen)
    cfg = MoGAConfig(num_groups=m, window=(0, 1, 2), fusion="lse", backend="sdpa")
    assert torch.autograd.gradcheck(lambda a, b, c: moga_attention(a, b, c, routing, lay, cfg),
                                    (q, k, v))


# ---------------------------------------------------------------- bad input
def _inputs(n=LAYOUT_ONE.num_tokens):
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv((1, n, 2, 4), gen)
    ids, m = _ids("many", 1, n, gen)
    return q, k, v, _routing(ids, m, gen), m


def test_bad_shapes():
    q, k, v, routing, m = _inputs()
    with pytest.raises(ValueError, match="one shape"):
        moga_attention(q, k[:, :-1], v, routing, LAYOUT_ONE, MoGAConfig(num_groups=m))
    with pytest.raises(ValueError, match="batch, tokens"):
        moga_attention(q, k, v, routing.gather(lambda t: t[:, :-1]), LAYOUT_ONE,
                       MoGAConfig(num_groups=m))
    with pytest.raises(ValueError, match="no routing"):
        moga_attention(q, k, v, None, LAYOUT_ONE, MoGAConfig(num_groups=m))


def test_group_ids_out_of_range():
    q, k, v, routing, m = _inputs()
    for bad in (m, -1):
        ids = routing.group_ids.clone()
        ids[0, 5] = bad
        with pytest.raises(ValueError, match="group ids must lie"):
            moga_attention(q, k, v, Routing(ids, routing.gate, routing.probs), LAYOUT_ONE,
                           MoGAConfig(num_groups=m))


def test_layout_mismatch_and_negative_grid():
    q, k, v, routing, m = _inputs()
    with pytest.raises(ValueError, match="layout"):
        moga_attention(q, k, v, routing, TokenLayout(3, 3, 4), MoGAConfig(num_groups=m))
    layer = MoGAAttention(8, 2, num_groups=2)
    with pytest.raises(ValueError, match="layout"):
        layer(torch.randn(1, 10, 8), TokenLayout(3, 3, 4))
    with pytest.raises(ValueError, match="window"):
        MoGAConfig(window=(0, -2, 2))
    with pytest.raises(ValueError, match="window"):
        MoGAConfig(window=(-1, 2, 2))
