"""moga.diagnostics against references built here from the definitions (float64, full N x N)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moga.attention import MoGAConfig, TokenLayout
from moga.diagnostics import attention_flops, attention_recall, inspect_step, relative_error
from moga.testing import random_inputs, tiny_model, write_tiny_checkpoint

SHOTS = (2, 3)   # latent frames per shot
SIZE = 12        # latent pixels -> 6 x 6 tokens per frame (a 2x2 grid of 3x3 cells; 4x4 is ragged)


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_groups=4, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def inputs(model):
    return random_inputs(model.config, frames=sum(SHOTS), height=SIZE, width=SIZE, shots=len(SHOTS), seed=5)


def capture_layers(model, x, t, ctx, cfg):
    """Every self-attention call's (input, layout, rope, config), from a plain forward."""
    seen = {}

    def grab(i):
        def hook(module, args, kw):
            seen[i] = (args[0], args[1], kw.get("rope"), kw.get("config"))
        return hook

    hs = [b.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(x, t, ctx, shot_frames=SHOTS, moga=cfg)
    finally:
        for h in hs:
            h.remove()
    return seen


def _cell(r: int, size: int, parts: int) -> int:
    """Index of the grid band holding row r: edges at floor(b * size / parts)."""
    return max(b for b in range(parts) if (b * size) // parts <= r)


def reference_masks(layout: TokenLayout, cfg: MoGAConfig, group_ids):
    """{branch: [N, N] bool}, written from the definitions token pair by token pair."""
    n, hh, ww = layout.num_tokens, layout.height, layout.width
    tpf = hh * ww
    shot_of = [layout.shot_of_frame(f) for f in range(layout.frames)]
    ranges = layout.shot_ranges
    assert cfg.window[0] == 0, "this reference covers whole-shot windows"

    def window_frames(shot):  # frames of a window group's keys: the shot, plus neighbours' edge frames
        a, b = ranges[shot]
        frames = set(range(a, b))
        if shot > 0:
            pa, pb = ranges[shot - 1]
            frames |= set(range(max(pa, pb - cfg.context_frames), pb))
        if shot + 1 < len(ranges):
            na, nb = ranges[shot + 1]
            frames |= set(range(na, min(nb, na + cfg.context_frames)))
        return frames

    pos = [(i // tpf, (i % tpf) // ww, i % ww) for i in range(n)]
    cell = [(_cell(r, hh, cfg.window[1]), _cell(c, ww, cfg.window[2])) for _, r, c in pos]
    out = {}
    if cfg.routed:
        out["routed"] = torch.tensor([[int(group_ids[i]) == int(group_ids[j]) for j in range(n)] for i in range(n)])
    if cfg.windowed:
        keyframes = [window_frames(s) for s in range(len(ranges))]
        out["window"] = torch.tensor([[cell[i] == cell[j] and pos[j][0] in keyframes[shot_of[pos[i][0]]]
                                       for j in range(n)] for i in range(n)])
    if cfg.per_frame:
        out["frame"] = torch.tensor([[pos[i][0] == pos[j][0] for j in range(n)] for i in range(n)])
    return out


def dense_probs(q, k):
    """Full dense attention probabilities [H, N, N] in float64."""
    q64, k64 = q[0].double().transpose(0, 1), k[0].double().transpose(0, 1)
    return torch.softmax(q64 @ k64.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)


def reference_recall(probs, masks):
    """-> (recall [N, H], overlap mass [N, H], overlap [N]) from the full probabilities."""
    count = sum(m.long() for m in masks.values())
    union, dup = (count > 0).double(), (count > 1).double()
    recall = (probs * union).sum(-1).T
    ov_mass = (probs * dup).sum(-1).T
    overlap = dup.sum(1) / union.sum(1)
    return recall, ov_mass, overlap


@pytest.mark.parametrize("cfg", [
    MoGAConfig(num_groups=4),
    MoGAConfig(num_groups=3, window=(0, 2, 3), context_frames=2, fusion="lse"),
    MoGAConfig(num_groups=4, windowed=False),
    MoGAConfig(num_groups=4, routed=False, window=(0, 4, 4)),   # ragged cells
])
def test_recall_matches_full_dense_reference(model, inputs, cfg):
    x, t, ctx = inputs
    seen = capture_layers(model, x, t, ctx, cfg)
    for i, (xin, layout, rope, _) in seen.items():
        module = model.blocks[i].self_attn
        with torch.no_grad():
            q, k, _ = module.qkv(xin, rope)
            if cfg.num_groups == module.router.num_groups:   # top-1 of the router's logits
                ids = (xin[0].double() @ module.router.weight.double().T).argmax(-1)
            else:  # merged rows: the layer's own routing (merging is tested in the router tests)
                ids = module.router(xin, num_groups=cfg.num_groups).group_ids[0]
        masks = reference_masks(layout, cfg, ids)
        probs = dense_probs(q, k)
        ref, ref_ov_mass, ref_ov = reference_recall(probs, masks)
        n, heads = layout.num_tokens, q.shape[2]
        # all queries, in chunks of 7 (the last one shorter)
        full = attention_recall(q.double(), k.double(), layout, cfg, ids, chunk_elements=7 * heads * n)
        torch.testing.assert_close(full.recall, ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(full.overlap_mass, ref_ov_mass, rtol=0, atol=1e-10)
        torch.testing.assert_close(full.overlap, ref_ov, rtol=0, atol=1e-12)
        for b, m in masks.items():
            torch.testing.assert_close(full.branch_recall[b], reference_recall(probs, {b: m})[0], rtol=0, atol=1e-10)
        assert torch.equal(full.kept, sum(m.long() for m in masks.values()).gt(0).sum(1).double() / n)
        # a sampled subset, float32 scores: the same numbers for those queries
        sel = torch.randperm(n, generator=torch.Generator().manual_seed(i))[:17]
        part = attention_recall(q, k, layout, cfg, ids, queries=sel, chunk_elements=5000)
        torch.testing.assert_close(part.recall.double(), ref[sel], rtol=0, atol=1e-5)
        assert 0.0 < float(ref.mean()) < 1.0


def test_inspect_recall_is_the_reference_mean(model, inputs):
    """With as many sampled queries as tokens, a layer's recall is the mean of the full reference."""
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=4, fusion="lse")
    report = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=10_000, stream="dense")
    seen = capture_layers(model, x, t, ctx, cfg.replace(dense=True))   # dense stream: the dense model's inputs
    for i, (xin, layout, rope, _) in seen.items():
        module = model.blocks[i].self_attn
        with torch.no_grad():
            q, k, _ = module.qkv(xin, rope)
            ids = (xin[0].double() @ module.router.weight.double().T).argmax(-1)
        ref, ref_ov_mass, _ = reference_recall(dense_probs(q, k), reference_masks(layout, cfg, ids))
        row = report.layers[i]
        assert row.mode == "moga"
        assert row.recall == pytest.approx(float(ref.mean()), abs=1e-5)
        assert row.overlap_mass == pytest.approx(float(ref_ov_mass.mean()), abs=1e-5)
        assert sorted(row.group_sizes) == sorted(torch.bincount(ids, minlength=4).tolist())
        assert row.recall < 0.99 and row.error > 1e-3
    assert report.queries == report.tokens == sum(SHOTS) * (SIZE // 2) ** 2
    assert report.step_error < 1e-6   # the dense stream's output is the dense model's output


@pytest.mark.parametrize("fusion", ["mean", "lse"])
def test_one_group_without_static_branches_is_exact(model, inputs, fusion):
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=1, windowed=False, per_frame=False, fusion=fusion)
    report = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=50)
    for row in report.layers:
        assert row.mode == "moga"
        assert row.recall == pytest.approx(1.0, abs=1e-6)
        assert row.error < 1e-5 and row.error_proj < 1e-5
        assert row.overlap == 0.0 and row.group_sizes == [report.tokens]
        assert row.flops == row.dense_flops
    assert report.step_error < 1e-5


def test_lse_single_window_covering_all_keys_is_exact(model, inputs):
    """One shot, a 1x1 grid: the window group of every query holds every key."""
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=4, routed=False, per_frame=False, window=(0, 1, 1), fusion="lse")
    report = inspect_step(model, x, t, ctx[0], shot_frames=None, moga=cfg, queries=40)
    for row in report.layers:
        assert row.recall == pytest.approx(1.0, abs=1e-6) and row.kept == 1.0
        assert row.error < 1e-5
    # the same branch with two shots no longer sees the other shot (beyond its context frame)
    report = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=40)
    assert all(row.recall < 0.999 and row.error > 1e-4 for row in report.layers)


def test_lse_with_overlap_covers_everything_but_counts_twice(model, inputs):
    """routed with one group holds every key, so recall is 1; the frame branch's keys lie in both
    branches and count twice in the lse softmax, so the output is not dense: overlap says why."""
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=1, windowed=False, fusion="lse")
    report = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=30)
    tpf = (SIZE // 2) ** 2
    for row in report.layers:
        assert row.recall == pytest.approx(1.0, abs=1e-6)
        assert row.overlap == pytest.approx(tpf / report.tokens, abs=1e-12)
        assert 0 < row.overlap_mass < 1 and row.error > 1e-3


def test_stream_choice(model, inputs):
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=2)
    a = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=20, stream="moga")
    b = inspect_step(model, x, t, ctx, shot_frames=SHOTS, moga=cfg, queries=20, stream="dense")
    assert a.layers[0].error == pytest.approx(b.layers[0].error, rel=1e-6)   # same input to layer 0
    assert a.layers[1].error != pytest.approx(b.layers[1].error, rel=1e-6)
    assert a.step_error > 1e-4 and b.step_error < 1e-6


def test_dense_layers_are_reported_dense(model, inputs):
    x, t, ctx = inputs
    report = inspect_step(model, x, t, ctx, shot_frames=SHOTS, dense_layers=(1,), queries=20)
    assert [r.mode for r in report.layers] == ["moga", "dense"]
    assert report.layers[1].flops == report.layers[1].dense_flops
    assert report.layers[0].flops < report.layers[0].dense_flops
    assert "dense" in report.table() and json.dumps(report.to_dict())


def test_attention_flops_match_mask_counts(model, inputs):
    x, t, ctx = inputs
    cfg = MoGAConfig(num_groups=3, window=(0, 2, 3))
    seen = capture_layers(model, x, t, ctx, cfg)
    expected = 0.0
    heads, hd = model.config.num_heads, model.config.head_dim
    for i, (xin, layout, _, _) in seen.items():
        ids = model.blocks[i].self_attn.router(xin, num_groups=3).group_ids[0]
        pairs = sum(int(m.sum()) for m in reference_masks(layout, cfg, ids).values())
        expected += 4.0 * pairs * heads * hd
    n = seen[0][1].num_tokens
    with torch.no_grad(), attention_flops(model) as count:
        model(x, t, ctx, shot_frames=SHOTS, moga=cfg)
        model(x, t, ctx, shot_frames=SHOTS, moga=cfg.replace(dense=True))
    assert count.flops == pytest.approx(expected + 2 * 4.0 * n * n * heads * hd, rel=1e-12)
    assert count.dense_flops == pytest.approx(4 * 4.0 * n * n * heads * hd, rel=1e-12)
    assert (count.moga_calls, count.dense_calls) == (2, 2)
    assert count.calls_by_layer == {0: ["moga", "dense"], 1: ["moga", "dense"]}
    assert 0 < count.ratio < 1


def test_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(torch.zeros(2), a) == pytest.approx(1.0)
    assert relative_error(a + torch.tensor([0.3, 0.4]), a) == pytest.approx(0.1)


def test_bad_input(model, inputs):
    x, t, ctx = inputs
    with pytest.raises(ValueError, match="one input at a time"):
        inspect_step(model, torch.cat([x, x]), t.expand(2), ctx, shot_frames=SHOTS)
    with pytest.raises(ValueError, match="stream"):
        inspect_step(model, x, t, ctx, shot_frames=SHOTS, stream="sparse")
    with pytest.raises(ValueError, match="queries"):
        inspect_step(model, x, t, ctx, shot_frames=SHOTS, queries=0)
    layout = TokenLayout(2, 2, 2)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="group ids"):
        attention_recall(q, q, layout, MoGAConfig(num_groups=2))


def test_inspect_command(tmp_path, capsys):
    from moga.cli import main as cli_main
    from moga.diagnostics import main
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors", num_groups=4, fusion="lse")
    out = tmp_path / "report.json"
    rc = cli_main(["inspect", str(ckpt), "--prompt", "one", "--prompt", "two", "--seconds", "0.3", "--width", "64",
               "--height", "48", "--steps", "3", "--at", "1", "--groups", "2", "--queries", "16",
               "--device", "cpu", "--dense-layers", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recall" in text and "seeded random text embedding" in text
    data = json.loads(out.read_text())
    assert data["config"]["num_groups"] == 2 and data["config"]["fusion"] == "lse"
    assert [r["mode"] for r in data["layers"]] == ["moga", "dense"]
    assert data["step"] == 1 and 0 < data["layers"][0]["recall"] < 1
    plain = write_tiny_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no routers"):
        main([str(plain), "--device", "cpu"])
