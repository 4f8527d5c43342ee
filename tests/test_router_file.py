"""Router files (moga.checkpoint.router_file), `moga patch --routers-out`, and moga.host_patch (the maths MoGA Patch
Model runs inside ComfyUI's own Wan blocks), against the library's own layer."""
from __future__ import annotations

import pytest
import torch

from moga.attention import MoGAAttention, MoGAConfig, TokenLayout
from moga.checkpoint import CheckpointError, load_model
from moga.checkpoint.router_file import (compare_fingerprint, make_fingerprint, read_routers, tensor_probe,
                                         write_routers)
from moga.cli import main
from moga.host_patch import HostPatch, HostPatchError, patch_from_routers
from moga.model import _dequant, rope_freqs
from moga.testing import init_random_, write_tiny_checkpoint


def _getter(model):
    """canonical name -> the model's float weight (fp8 dequantised, as ComfyUI would hand it over)."""
    def get(name):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        return _dequant(module)
    return get


def test_router_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {i: torch.randn(5, 64, generator=g) for i in (0, 2, 3)}
    cfg = MoGAConfig(num_groups=5, window=(0, 2, 3), context_frames=2, fusion="lse", capacity=1.5,
                     capacity_split="stride")
    fp = {"source": "base.safetensors", "tensors": [tensor_probe("head.head.weight", torch.randn(8, 4, generator=g))]}
    path = write_routers(tmp_path / "r.safetensors", weights, cfg, dense_warmup=0.2, fingerprint=fp)
    rs = read_routers(path)
    assert rs.kind == "routers" and rs.layers == (0, 2, 3) and rs.num_groups == 5
    for i, w in weights.items():
        assert torch.equal(rs.weights[i], w)
    assert rs.config == cfg and rs.dense_warmup == 0.2 and rs.fingerprint == fp
    with pytest.raises(ValueError, match="rows"):
        write_routers(tmp_path / "bad.safetensors", weights, cfg.replace(num_groups=4))


def test_routers_embedded_in_a_moga_checkpoint_and_a_plain_one(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "moga.safetensors", layout="comfyui", num_groups=4, seed=1,
                                 fusion="lse", moga_layers=(0, 1))
    rs = read_routers(path)
    model = load_model(path)
    assert rs.kind == "checkpoint" and rs.layers == (0, 1) and rs.config.fusion == "lse"
    for i in rs.layers:
        assert torch.equal(rs.weights[i], model.blocks[i].self_attn.router.weight.float())
    assert compare_fingerprint(rs.fingerprint, _getter(model))[0] == "same"  # the checkpoint is its own base
    plain = write_tiny_checkpoint(tmp_path / "plain.safetensors", seed=1)
    with pytest.raises(CheckpointError, match="no MoGA routers.*--routers-out"):
        read_routers(plain)


def test_fingerprint_same_close_different(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "a.safetensors", layout="comfyui", seed=2)
    fp8 = write_tiny_checkpoint(tmp_path / "a_fp8.safetensors", layout="comfyui", seed=2, fp8="scaled")
    other = write_tiny_checkpoint(tmp_path / "b.safetensors", layout="comfyui", seed=3)
    a = load_model(base)
    fp = make_fingerprint(_getter(a), a.config.num_layers, "a.safetensors")
    assert compare_fingerprint(fp, _getter(a)) == ("same", "the same weights")
    assert compare_fingerprint(fp, _getter(load_model(fp8)))[0] == "close"
    verdict, why = compare_fingerprint(fp, _getter(load_model(other)))
    assert verdict == "different" and "cosine" in why
    assert compare_fingerprint(None, _getter(a))[0] == "unknown"
    bigger = write_tiny_checkpoint(tmp_path / "c.safetensors", seed=2, dim=96, num_heads=4)
    assert compare_fingerprint(fp, _getter(load_model(bigger)))[0] == "different"


def test_patch_routers_out_writes_only_routers(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "plain.safetensors", seed=4)
    out = tmp_path / "routers.safetensors"
    rc = main(["patch", str(src), "--routers-out", str(out), "--groups", "3", "--calibration-size", "2,4,4",
               "--calibration-steps", "1", "--layers", "0"])
    assert rc == 0, capsys.readouterr().err
    rs = read_routers(out)
    assert rs.kind == "routers" and rs.layers == (0,) and rs.num_groups == 3 and rs.config.fusion == "lse"
    assert rs.weights[0].shape == (3, 64) and torch.isfinite(rs.weights[0]).all()
    assert compare_fingerprint(rs.fingerprint, _getter(load_model(src)))[0] == "same"
    assert out.stat().st_size < src.stat().st_size / 10
    assert main(["patch", str(src), str(tmp_path / "x.safetensors"), "--routers-out", str(out), "--groups", "3"]) == 2
    assert "not both" in capsys.readouterr().err


def _layer(seed, dim=48, heads=3, groups=4):
    layer = MoGAAttention(dim, heads, num_groups=groups).double().eval()
    return init_random_(layer, seed).requires_grad_(False)


@pytest.mark.parametrize("cfg", [
    MoGAConfig(num_groups=4, backend="reference"),
    MoGAConfig(num_groups=3, fusion="lse", capacity=1.0, backend="reference"),
    MoGAConfig(num_groups=4, window=(1, 2, 1), per_frame=False, capacity=0.5, capacity_split="stride",
               backend="reference"),
])
def test_host_patch_equals_the_library_layer(cfg):
    """What the host computes (its own q/k/v/o) + HostPatch.attend == MoGAAttention, float64, two shots."""
    layer = _layer(5)
    layout = TokenLayout(4, 3, 4, shot_frames=(3, 1))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, layout.num_tokens, 48, generator=g, dtype=torch.float64)
    rope = rope_freqs(layout, 16, dtype=torch.complex128)
    expect = layer(x, layout, rope=rope, config=cfg)
    q, k, v = layer.qkv(x, rope)
    patch = HostPatch({7: layer.router.weight}, cfg)
    got = layer.o(patch.attend(7, q.flatten(2), k.flatten(2), v.flatten(2), 3, x, layout))
    assert float((got - expect).abs().max() / expect.abs().max()) < 1e-12
    dense = layer(x, layout, rope=rope, config=cfg.replace(dense=True))
    assert float((got - dense).abs().max()) > 1e-3  # MoGA is not dense attention


def test_host_patch_settings_and_errors(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", num_groups=4, seed=1, moga_layers=(0, 1))
    rs = read_routers(path)
    p = patch_from_routers(rs, groups=2, window="2x1", windowed=False, fusion="lse", capacity=0.0, dense_warmup=0.4,
                           layers=(1,))
    assert p.config.num_groups == 2 and p.config.window == (0, 2, 1) and not p.config.windowed
    assert p.config.capacity is None and p.dense_warmup == 0.4 and p.layers == {1}
    assert patch_from_routers(rs).config == rs.config
    with pytest.raises(HostPatchError, match="4 groups but 5"):
        patch_from_routers(rs, groups=5)
    with pytest.raises(HostPatchError, match="no router for layers \\[1\\]"):
        HostPatch({0: rs.weights[0]}, rs.config, layers=(0, 1))
    with pytest.raises(HostPatchError, match="width 64 but .* width 128"):
        p.check_model(128, 2)
    with pytest.raises(HostPatchError, match="has 1 blocks"):
        HostPatch(rs.weights, rs.config).check_model(64, 1)
    layout = p.layout((2, 2, 2))
    q = torch.randn(1, 9, 64)
    with pytest.raises(HostPatchError, match="9 tokens .* has 8.*reference latent"):
        p.attend(1, q, q, q, 4, torch.randn(1, 9, 64), layout)
    assert HostPatch.dense_at(0.9, 0.5) and not HostPatch.dense_at(0.5, 0.5)
