"""Group capacity (MoGAConfig.capacity, moga.attention.router.cap_routing): routed groups over
ceil(capacity * N / M) tokens are cut into near-equal parts: runs of consecutive tokens, or (split
"stride") round-robin parts that each span the whole group.

Checked against a plain python-loop reference of the definition, through the MoGA layer against the
float64 dense masked reference of tests/test_attention_layer.py (over the reference's capped groups),
in the checkpoint metadata (`moga.capacity`), and over 2 gloo ranks of sequence parallelism.
"""
from __future__ import annotations

import math
import zlib
from fractions import Fraction

import pytest
import torch

from moga import checkpoint as ckpt
from moga.attention import MoGAAttention, MoGAConfig, TokenLayout, moga_attention
from moga.attention.router import Routing, cap_routing, capacity_limit
from moga.testing import write_tiny_checkpoint
from test_attention_layer import LAYOUT_SHOTS, _qkv, _rel, reference_attention


# ---------------------------------------------------------------- the reference: a python loop
def reference_cap(ids: list[int], m: int, capacity: float, split: str = "runs") -> list[int]:
    """Capped ids of one batch element: group g of s tokens over the limit L = ceil(capacity * N / M)
    becomes r = ceil(s / L) parts with ids g + M * k: "runs": part k holds member positions
    [ceil(k * s / r), ceil((k + 1) * s / r)) in sequence order; "stride": positions k, k + r, k + 2r..."""
    n = len(ids)
    limit = max(1, math.ceil(Fraction(capacity) * n / m))   # exact for the binary fractions used here
    out = list(ids)
    for g in range(m):
        members = [i for i in range(n) if ids[i] == g]
        s = len(members)
        if s <= limit:
            continue
        r = -(-s // limit)
        for k in range(r):
            lo, hi = -(-k * s // r), -(-(k + 1) * s // r)
            for p in (range(lo, hi) if split == "runs" else range(k, s, r)):
                out[members[p]] = g + m * k
    return out


def _routing(ids, m, gen, dtype=torch.float64):
    probs = torch.softmax(torch.randn(*ids.shape, m, generator=gen, dtype=dtype), -1)
    return Routing(ids, probs.gather(-1, ids[..., None])[..., 0], probs)


def _case(kind, gen):
    """(ids [B, N], M, capacity) of one named routing."""
    if kind == "skewed":          # one big group, a few small ones, some empty
        b, n, m = 2, 60, 6
        ids = torch.where(torch.rand(b, n, generator=gen) < 0.6, 2, torch.randint(0, 4, (b, n), generator=gen))
        return ids, m, 1.0
    if kind == "empty_group":     # groups 1 and 3 of 4 never chosen
        b, n, m = 2, 40, 4
        return torch.randint(0, 2, (b, n), generator=gen) * 2, m, 1.0
    if kind == "exactly_at_capacity":   # N=12, M=3, capacity 1: L = 4; group 0 has 4 tokens (kept), group 1 has 8
        ids = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]])
        return ids, 3, 1.0
    if kind == "more_groups_than_tokens":   # M > N: L = ceil(5 / 9) = 1 token
        return torch.tensor([[4, 4, 0, 4, 8]]), 9, 1.0
    if kind == "capacity_below_one":   # balanced-ish groups are cut too
        return torch.randint(0, 3, (2, 50), generator=gen), 3, 0.5
    if kind == "quarter":
        return torch.randint(0, 5, (1, 37), generator=gen), 5, 0.25
    if kind == "large_capacity":   # nothing to cut
        return torch.randint(0, 4, (2, 30), generator=gen), 4, 4.0
    raise KeyError(kind)


KINDS = ["skewed", "empty_group", "exactly_at_capacity", "more_groups_than_tokens", "capacity_below_one",
         "quarter", "large_capacity"]


@pytest.mark.parametrize("split", ["runs", "stride"])
@pytest.mark.parametrize("kind", KINDS)
def test_cap_matches_loop_reference(kind, split):
    gen = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    ids, m, capacity = _case(kind, gen)
    routing = _routing(ids, m, gen)
    capped = cap_routing(routing, capacity, split)
    want = torch.tensor([reference_cap(row, m, capacity, split) for row in ids.tolist()])
    assert torch.equal(capped.group_ids, want)
    assert torch.equal(capped.gate, routing.gate) and torch.equal(capped.probs, routing.probs)
    assert torch.equal(capped.group_ids % m, ids)           # every run stays in its router group
    assert capped.router_groups == m and int(capped.group_ids.max()) < capped.num_groups
    limit = capacity_limit(ids.shape[1], m, capacity)
    for b in range(ids.shape[0]):
        sizes = torch.bincount(capped.group_ids[b])
        assert int(sizes.max()) <= limit
        for g in range(m):     # the runs of one group differ by at most one token
            runs = sizes[g::m][sizes[g::m] > 0]
            if len(runs):
                assert int(runs.max() - runs.min()) <= 1
    assert torch.equal(cap_routing(routing, capacity, split).group_ids, capped.group_ids)   # deterministic
    assert cap_routing(capped, capacity, split) is capped                                  # idempotent


def test_specific_cuts():
    gen = torch.Generator().manual_seed(1)
    ids, m, c = _case("exactly_at_capacity", gen)
    capped = cap_routing(_routing(ids, m, gen), c).group_ids[0].tolist()
    # group 0 (4 tokens = the limit) stays whole; group 1 (8 tokens) becomes two runs of 4 in sequence order
    assert capped == [1, 0, 1, 1, 0, 1, 4, 0, 4, 4, 0, 4]
    ids, m, c = _case("more_groups_than_tokens", gen)
    assert cap_routing(_routing(ids, m, gen), c).group_ids[0].tolist() == [4, 13, 0, 22, 8]   # one token each
    assert capacity_limit(10, 3, 0.3) == 1       # 0.3 * 10 / 3 is 1.0000000000000002 in floats
    assert capacity_limit(1280, 8, 1.0) == 160
    # stride: group 1's 8 tokens go to its two parts in turn, so both parts span the whole sequence
    ids, m, c = _case("exactly_at_capacity", gen)
    capped = cap_routing(_routing(ids, m, gen), c, "stride").group_ids[0].tolist()
    assert capped == [1, 0, 4, 1, 0, 4, 1, 0, 4, 1, 0, 4]


def test_capacity_off_and_errors():
    gen = torch.Generator().manual_seed(2)
    routing = _routing(torch.randint(0, 3, (1, 20), generator=gen), 3, gen)
    assert cap_routing(routing, None) is routing and cap_routing(routing, 0.0) is routing
    assert MoGAConfig(capacity=0).capacity is None and MoGAConfig(capacity=1).capacity == 1.0
    for bad in (-1.0, float("nan"), float("inf"), "big"):
        with pytest.raises(ValueError, match="capacity"):
            MoGAConfig(capacity=bad)
    capped = cap_routing(routing, 0.5)
    with pytest.raises(ValueError, match="already capped"):
        cap_routing(capped, 1.0)
    with pytest.raises(ValueError, match="already capped"):
        cap_routing(capped, 0.5, "stride")
    with pytest.raises(ValueError, match="split"):
        cap_routing(routing, 0.5, "random")
    with pytest.raises(ValueError, match="capacity_split"):
        MoGAConfig(capacity=1, capacity_split="interleave")
    with pytest.raises(ValueError, match="gather"):
        capped.gather(lambda t: t)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cap_routing(Routing(routing.group_ids + 5, routing.gate, routing.probs), 0.5)


# ---------------------------------------------------------------- the layer with capacity
def _layer_case(kind, gen):
    """(layout, ids [2, N], M, capacity) for the layer tests: routings spread over the whole sequence."""
    lay = LAYOUT_SHOTS   # 90 tokens in shots (1, 3, 2)
    n = lay.num_tokens
    if kind == "skewed":
        ids = torch.where(torch.rand(2, n, generator=gen) < 0.6, 2, torch.randint(0, 6, (2, n), generator=gen))
        return lay, ids, 6, 1.0
    if kind == "empty_group":
        return lay, torch.randint(0, 2, (2, n), generator=gen) * 2, 4, 1.0
    if kind == "capacity_below_one":
        return lay, torch.randint(0, 3, (2, n), generator=gen), 3, 0.5
    if kind == "more_groups_than_tokens":   # 6 tokens, 9 groups: the limit is 1 token
        lay = TokenLayout(3, 1, 2, (1, 2))
        return lay, torch.randint(0, 3, (2, 6), generator=gen) * 3, 9, 1.0
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["skewed", "empty_group", "capacity_below_one", "more_groups_than_tokens"])
@pytest.mark.parametrize("fusion", ["mean", "lse"])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("split", ["runs", "stride"])
def test_moga_attention_with_capacity_matches_reference(kind, fusion, backend, split):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, fusion, backend, split)).encode()))
    lay, ids, m, capacity = _layer_case(kind, gen)
    routing = _routing(ids, m, gen)
    q, k, v = _qkv((2, lay.num_tokens, 2, 8), gen)
    cfg = MoGAConfig(num_groups=m, fusion=fusion, backend=backend, capacity=capacity, capacity_split=split)
    out = moga_attention(q, k, v, routing, lay, cfg)
    capped = Routing(torch.tensor([reference_cap(row, m, capacity, split) for row in ids.tolist()]),
                     routing.gate, routing.probs)
    assert not torch.equal(capped.group_ids, ids)     # every case cuts some group
    assert _rel(out, reference_attention(q, k, v, capped, lay, cfg)) < 1e-12
    uncapped = moga_attention(q, k, v, routing, lay, cfg.replace(capacity=None))
    assert _rel(out, uncapped) > 1e-6                 # and the cut changes the output


def test_layer_with_router_and_capacity():
    """MoGAAttention (router, RoPE, run-time merge M' < M) with capacity: the reference attends over the
    loop-capped groups of the router's own routing, then the output projection."""
    gen = torch.Generator().manual_seed(7)
    lay = TokenLayout(5, 3, 4, (2, 3))
    n, dim, heads = lay.num_tokens, 32, 4
    torch.manual_seed(3)
    layer = MoGAAttention(dim, heads, num_groups=6).double().eval()
    for prm in layer.parameters():
        prm.data.normal_(0, 0.4)
    x = torch.randn(2, n, dim, generator=gen, dtype=torch.float64)
    angle = torch.rand(n, 4, generator=gen, dtype=torch.float64) * 6.283
    rope = torch.polar(torch.ones_like(angle), angle)
    for fusion, m in (("lse", 4), ("mean", 6)):
        cfg = layer.config.replace(num_groups=m, fusion=fusion, backend="sdpa", capacity=0.75)
        with torch.no_grad():
            out = layer(x, lay, rope=rope, config=cfg)
            routing = layer.router(x, num_groups=m)
            capped = Routing(torch.tensor([reference_cap(r, m, 0.75) for r in routing.group_ids.tolist()]),
                             routing.gate, routing.probs)
            assert not torch.equal(capped.group_ids, routing.group_ids)
            q, k, v = layer.qkv(x, rope)
            ref = layer.o(reference_attention(q, k, v, capped, lay, cfg).flatten(2))
        assert _rel(out, ref) < 1e-12


# ---------------------------------------------------------------- checkpoint metadata
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cap")
    plain = write_tiny_checkpoint(d / "plain.safetensors", num_layers=2, seed=5)
    small = dict(calibration_size=(2, 8, 8), calibration_steps=1, calibration_tokens=64)
    out = {"dir": d, "plain": plain}
    out["calibrated"] = d / "calibrated.safetensors"
    ckpt.patch_checkpoint(plain, out["calibrated"], num_groups=3, **small)
    routers = {i: b.self_attn.router.weight.clone() for i, b in enumerate(ckpt.load_model(out["calibrated"]).blocks)}
    out["trained"] = d / "trained.safetensors"
    ckpt.patch_checkpoint(plain, out["trained"], num_groups=None, routers=routers)
    out["half"] = d / "half.safetensors"
    ckpt.patch_checkpoint(plain, out["half"], num_groups=None, routers=routers, capacity=0.5)
    return out


def test_patch_writes_and_load_reads_capacity(files):
    meta = lambda name: ckpt.TensorSource(files[name]).metadata   # noqa: E731
    assert meta("calibrated")["moga.capacity"] == "1.0" == repr(ckpt.CALIBRATED_CAPACITY)
    assert meta("trained")["moga.capacity"] == "0.0" and meta("half")["moga.capacity"] == "0.5"
    assert ckpt.load_model(files["calibrated"]).moga_config.capacity == ckpt.CALIBRATED_CAPACITY
    assert ckpt.load_model(files["trained"]).moga_config.capacity is None
    assert ckpt.load_model(files["half"]).moga_config.capacity == 0.5
    assert ckpt.inspect_checkpoint(files["calibrated"]).moga["capacity"] == 1.0
    assert ckpt.inspect_checkpoint(files["trained"]).moga["capacity"] is None
    assert "group capacity 1.0" in str(ckpt.inspect_checkpoint(files["calibrated"]))
    assert "group capacity off" in str(ckpt.inspect_checkpoint(files["trained"]))
    # save_checkpoint keeps it, and the split with it
    model = ckpt.load_model(files["half"])
    assert model.moga_config.capacity_split == "runs"
    back = ckpt.save_checkpoint(model, files["dir"] / "saved.safetensors")
    assert ckpt.load_model(back).moga_config.capacity == 0.5
    model.moga_config = model.moga_config.replace(capacity_split="stride")
    back = ckpt.save_checkpoint(model, files["dir"] / "saved-stride.safetensors")
    assert ckpt.TensorSource(back).metadata["moga.capacity_split"] == "stride"
    assert ckpt.load_model(back).moga_config.capacity_split == "stride"
    assert "group capacity 0.5 (stride)" in str(ckpt.inspect_checkpoint(back))


def test_capacity_metadata_absent_or_bad(files):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(files["calibrated"]))
    meta = dict(ckpt.TensorSource(files["calibrated"]).metadata)
    old = dict(meta)
    del old["moga.capacity"]           # a file from before the key existed: off
    old.pop("moga.capacity_split", None)
    save_file(tensors, str(files["dir"] / "old.safetensors"), old)
    assert ckpt.load_model(files["dir"] / "old.safetensors").moga_config.capacity is None
    for key, bad in (("moga.capacity", "-1"), ("moga.capacity", "lots"), ("moga.capacity_split", "diagonal")):
        save_file(tensors, str(files["dir"] / "bad.safetensors"), dict(meta, **{key: bad}))
        with pytest.raises(ckpt.CheckpointError, match="capacity"):
            ckpt.load_model(files["dir"] / "bad.safetensors")


def test_cli_patch_capacity(files):
    from moga.cli import main
    dst = files["dir"] / "cli.safetensors"
    assert main(["patch", str(files["plain"]), str(dst), "--groups", "2", "--capacity", "2",
                 "--calibration-size", "2,8,8", "--calibration-steps", "1"]) == 0
    assert ckpt.TensorSource(dst).metadata["moga.capacity"] == "2.0"
    dst0 = files["dir"] / "cli0.safetensors"
    assert main(["patch", str(files["plain"]), str(dst0), "--groups", "2", "--capacity", "0",
                 "--calibration-size", "2,8,8", "--calibration-steps", "1"]) == 0
    assert ckpt.load_model(dst0).moga_config.capacity is None


def test_cli_generate_capacity_flag(files):
    import argparse

    from moga.cli import CliError, moga_settings
    info = ckpt.inspect_checkpoint(files["calibrated"])
    args = lambda **kw: argparse.Namespace(**dict(dict(groups=None, window=None, fusion=None, capacity=None,  # noqa: E731
                                                       attention_backend=None, dense=False, model="m"), **kw))
    assert moga_settings(args(), info).capacity == 1.0
    assert moga_settings(args(capacity=0.0), info).capacity is None
    assert moga_settings(args(capacity=2.5), info).capacity == 2.5
    assert moga_settings(args(), info).capacity_split == "runs"
    assert moga_settings(args(capacity_split="stride"), info).capacity_split == "stride"
    # the split written in a file reaches `moga generate` (the demo model's is "stride")
    from moga.demo import DEMO_PATH
    assert moga_settings(args(), ckpt.inspect_checkpoint(DEMO_PATH)).capacity_split == "stride"
    with pytest.raises(CliError, match="--capacity"):
        moga_settings(args(capacity=-1.0), info)


# ---------------------------------------------------------------- sequence parallelism
HEADS = 4


def _sp_capacity(ex, seed, split="runs"):
    """Over the exchange vs one process: the capped ids every rank computes, and the layer's output."""
    from moga.attention.router import cap_routing as cap
    layout = TokenLayout(frames=5, height=2, width=3, shot_frames=(2, 3))   # 30 tokens, 15 a rank
    n, dim = layout.num_tokens, HEADS * 4
    torch.manual_seed(1234)   # identical weights on every rank
    layer = MoGAAttention(dim, HEADS, num_groups=3).eval()
    for prm in layer.parameters():
        prm.data.normal_(0, 0.3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, dim, generator=gen)
    angle = torch.rand(n, 2, generator=gen) * 6.283
    rope = torch.polar(torch.ones_like(angle), angle)
    cfg = layer.config.replace(window=(0, 1, 2), capacity=0.5, capacity_split=split)
    with torch.no_grad():
        local = layer.router(ex.shard(x, n), num_groups=3)
        ids = cap(local.gather(lambda t: ex.all_gather_tokens(t, n)), 0.5, split).group_ids
        full = ex.all_gather_tokens(layer(ex.shard(x, n), layout, rope=ex.shard(rope, n, dim=0), config=cfg,
                                          parallel=ex), n)
        ref_ids = cap(layer.router(x, num_groups=3), 0.5, split).group_ids
        ref = layer(x, layout, rope=rope, config=cfg)
        uncapped = layer(x, layout, rope=rope, config=cfg.replace(capacity=None))
    return {"ids": ids, "ref_ids": ref_ids, "rel": _rel(full, ref), "capped_vs_uncapped": _rel(ref, uncapped)}


@pytest.mark.parametrize("split", ["runs", "stride"])
def test_sequence_parallel_capacity_matches_one_process(split):
    from moga.parallel.group import run_on_ranks
    ranks = run_on_ranks(_sp_capacity, 2, args=(31, split), timeout=90)
    for res in ranks:
        assert torch.equal(res["ids"], res["ref_ids"])     # the same cut on every rank as in one process
        assert res["rel"] < 1e-5
        assert res["capped_vs_uncapped"] > 1e-4           # the cut happened
    assert len(torch.unique(ranks[0]["ref_ids"])) > 3       # more groups than the router's 3


# ---------------------------------------------------------------- diagnostics and FLOP counts
def test_inspect_and_flop_count_use_the_capped_groups():
    from collections import Counter

    from moga.attention.mixture import attention_pairs
    from moga.diagnostics import attention_flops, inspect_step
    from moga.testing import random_inputs, tiny_model
    model = tiny_model(num_groups=4, num_layers=2, seed=3)
    shots = (2, 3)
    x, t, ctx = random_inputs(model.config, frames=5, height=12, width=12, shots=2, seed=5)
    cfg = MoGAConfig(num_groups=4, fusion="lse", capacity=0.5)
    seen = {}
    hooks = [b.self_attn.register_forward_pre_hook(
        lambda mod, args, kw, i=i: seen.__setitem__(i, (args[0], args[1])), with_kwargs=True)
        for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad(), attention_flops(model) as count:
            model(x, t, ctx, shot_frames=shots, moga=cfg)
        flops = 0.0
        for i, (xin, layout) in seen.items():
            module = model.blocks[i].self_attn
            ids = module.router(xin, num_groups=4).group_ids[0].tolist()
            sizes = list(Counter(reference_cap(ids, 4, 0.5)).values())
            assert max(sizes) <= capacity_limit(layout.num_tokens, 4, 0.5)
            pairs = attention_pairs(layout, cfg, sizes)
            flops += 4.0 * module.num_heads * module.head_dim * sum(v for k, v in pairs.items() if k != "dense")
        assert count.flops == pytest.approx(flops, rel=1e-12)
        seen.clear()
        report = inspect_step(model, x, t, ctx, shot_frames=shots, moga=cfg, queries=32)
        for row in report.layers:   # the same inputs as the forward above (stream "moga")
            xin, layout = seen[row.layer]
            ids = model.blocks[row.layer].self_attn.router(xin, num_groups=4).group_ids[0].tolist()
            want = sorted(Counter(reference_cap(ids, 4, 0.5)).values())
            assert sorted(s for s in row.group_sizes if s) == want and len(want) > 4
    finally:
        for h in hooks:
            h.remove()


def test_generate_reports_effective_groups_of_the_capped_groups():
    from moga.cli import effective_groups
    layer = MoGAAttention(16, 2, num_groups=3)
    probs = torch.full((1, 12, 3), 1 / 3)
    layer.last_routing = Routing(torch.zeros(1, 12, dtype=torch.long), probs[..., 0], probs)   # one group of 12
    assert effective_groups(layer) == pytest.approx(1.0)
    assert effective_groups(layer, 1.0) == pytest.approx(3.0)     # limit 4: three runs of 4


def test_dit_benchmark_caps_groups(tmp_path):
    """benchmarks/dit.py --capacity: the MoGA steps run capped, and the JSON's capped sizes are the router's
    groups cut to at most ceil(N / M) tokens (the smoke config's calibrated groups are uneven)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "dit.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "dit.py"), "--smoke", "--capacity", "1",
                    "--capacity-split", "stride", "--json", str(out)], check=True, cwd=root, timeout=300,
                   capture_output=True)
    info = json.loads(out.read_text())
    assert (info["capacity"], info["capacity_split"]) == (1.0, "stride")
    rows = [r for r in info["results"] if r["mode"].startswith("moga")]
    assert rows
    for r in rows:
        m = int(r["mode"].split("=")[1])
        sizes, capped = r["last_layer_group_sizes"], r["last_layer_capped_sizes"]
        n = sum(sizes)
        assert sum(capped) == n and max(capped) <= capacity_limit(n, m, 1.0)
        assert max(sizes) > capacity_limit(n, m, 1.0) or capped == sizes
    assert any(max(r["last_layer_group_sizes"]) > capacity_limit(sum(r["last_layer_group_sizes"]), 8, 1.0)
               for r in rows if r["mode"] == "moga M=8")
