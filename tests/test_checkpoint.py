"""moga.checkpoint: key layouts, MoGA format round trips, `patch` (byte-identical copies, calibration),
and a specific error for every kind of wrong file."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from moga.attention import MoGAConfig
from moga.checkpoint import (EXTRA_LOADERS, CheckpointError, TensorSource, calibrate_routers,
                             inspect_checkpoint, load_model, patch_checkpoint, register_extras,
                             save_checkpoint, spherical_kmeans, to_layout, write_safetensors)
from moga.testing import random_inputs, tiny_model, write_tiny_checkpoint

CALIB = dict(calibration_size=(3, 8, 8), calibration_steps=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model, inputs, **kw):
    with torch.inference_mode():
        return model(*inputs, **kw)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "plain.safetensors", seed=1)


# ---- layouts ----------------------------------------------------------------------------------------


def test_three_layouts_give_identical_outputs(tmp_path):
    outs = {}
    for layout in ("wan", "comfyui", "diffusers"):
        path = write_tiny_checkpoint(tmp_path / f"{layout}.safetensors", layout=layout, seed=2, num_groups=3)
        info = inspect_checkpoint(path)
        assert info.layout == layout and info.moga["num_groups"] == 3
        model = load_model(path)
        outs[layout] = run(model, random_inputs(model.config, seed=3))
    assert torch.equal(outs["wan"], outs["comfyui"]) and torch.equal(outs["wan"], outs["diffusers"])


def test_diffusers_names_match_the_published_mapping():
    sd = {k: torch.zeros(1) for k in ("blocks.3.self_attn.o.weight", "blocks.3.norm3.bias", "blocks.3.ffn.0.weight",
                                      "blocks.3.modulation", "head.modulation", "head.head.bias",
                                      "time_projection.1.weight", "text_embedding.2.weight",
                                      "blocks.3.cross_attn.norm_k.weight")}
    assert set(to_layout(sd, "diffusers")) == {
        "blocks.3.attn1.to_out.0.weight", "blocks.3.norm2.bias", "blocks.3.ffn.net.0.proj.weight",
        "blocks.3.scale_shift_table", "scale_shift_table", "proj_out.bias", "condition_embedder.time_proj.weight",
        "condition_embedder.text_embedder.linear_2.weight", "blocks.3.attn2.norm_k.weight"}


def test_sharded_diffusers_folder(tmp_path):
    single = write_tiny_checkpoint(tmp_path / "one.safetensors", layout="diffusers", seed=4)
    src = TensorSource(single)
    keys = sorted(src.keys())
    folder = tmp_path / "transformer"
    folder.mkdir()
    halves = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in halves.items():
        write_safetensors(folder / name, {k: src.get(k) for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 4, "attention_head_dim": 16}))
    a, b = load_model(single), load_model(tmp_path)        # the pipeline folder holds transformer/
    inputs = random_inputs(a.config, seed=5)
    assert torch.equal(run(a, inputs), run(b, inputs))


def test_dtype_and_fp8_files(tmp_path):
    bf16 = write_tiny_checkpoint(tmp_path / "bf16.safetensors", dtype=torch.bfloat16, seed=6)
    model = load_model(bf16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert load_model(bf16, dtype=torch.float32).blocks[0].ffn[0].weight.dtype == torch.float32
    for kind in ("fp8", "scaled"):
        path = write_tiny_checkpoint(tmp_path / f"{kind}.safetensors", layout="comfyui", fp8=kind, seed=6)
        info = inspect_checkpoint(path)
        assert info.scaled_fp8 == (kind == "scaled") and "F8_E4M3" in info.dtypes
        model = load_model(path, dtype=torch.float32)
        assert model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
        # the same weights dequantised by hand into a float32 model
        src = TensorSource(path)
        ref = tiny_model(seed=6)
        for name, p in ref.named_parameters():
            w = src.get("model.diffusion_model." + name).float()
            scale_key = "model.diffusion_model." + name[: -len("weight")] + "scale_weight"
            if scale_key in src.entries:
                w = w * src.get(scale_key).float()
            p.data = w
        inputs = random_inputs(ref.config, seed=7)
        assert (run(model, inputs) - run(ref, inputs)).abs().max() / run(ref, inputs).abs().max() < 1e-5


# ---- MoGA format ------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(seed=8, num_groups=4, moga_layers=(0,))
    model.moga_config = MoGAConfig(num_groups=4, window=(2, 1, 2), context_frames=0, fusion="lse")
    model.dense_warmup = 0.1
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": "hello"})
    back = load_model(path)
    assert back.moga_config == model.moga_config and back.dense_warmup == 0.1
    assert back.config.moga_layers == (0,) and back.blocks[1].self_attn.router is None
    assert torch.equal(back.blocks[0].self_attn.router.weight, model.blocks[0].self_attn.router.weight)
    info = inspect_checkpoint(path)
    assert info.metadata["note"] == "hello" and info.moga["window"] == "2,1,2" and info.moga["layers"] == "0"
    json.dumps(info.to_dict())
    text = str(info)
    assert "4 groups" in text and "dim 64" in text and "lse" in text
    inputs = random_inputs(model.config, seed=9)
    assert torch.equal(run(model, inputs), run(back, inputs))


def _raw(src: TensorSource, key: str) -> bytes:
    e = src.entries[key]
    with open(e.file, "rb") as fh:
        fh.seek(e.begin)
        return fh.read(e.end - e.begin)


@pytest.mark.parametrize("layout,kw", [("wan", dict(dtype=torch.bfloat16)), ("comfyui", dict(fp8="scaled")),
                                       ("diffusers", {})])
def test_patch_calibrates_and_copies_every_other_tensor_unchanged(tmp_path, layout, kw):
    src = write_tiny_checkpoint(tmp_path / "src.safetensors", layout=layout, seed=10, **kw)
    dst = tmp_path / "dst.safetensors"
    info = patch_checkpoint(src, dst, num_groups=4, window="0,2,2", **CALIB)
    assert info.moga == dict(num_groups=4, window="0,2,2", context_frames=1, layers="0-1", fusion="lse",
                             dense_warmup=0.25, capacity=1.0, capacity_split="runs")
    a, b = TensorSource(src), TensorSource(dst)
    added = set(b.keys()) - set(a.keys())
    assert len(added) == 2 and all("router" in k for k in added)
    for key in a.keys():
        assert a.entries[key].dtype == b.entries[key].dtype and a.entries[key].shape == b.entries[key].shape
        assert _raw(a, key) == _raw(b, key), key
    model = load_model(dst)
    assert model.moga_config.fusion == "lse" and model.config.num_groups == 4
    # the routers are the calibration's centroids, deterministically
    again = calibrate_routers(src, 4, (0, 1), size=(3, 8, 8), steps=2)
    for i in (0, 1):
        got = model.blocks[i].self_attn.router.weight
        assert torch.equal(got, again[i]) and torch.allclose(got.norm(dim=1), torch.ones(4), atol=1e-5)


def test_patch_from_router_file_and_one_group_is_dense(tmp_path, plain):
    dense = load_model(plain)
    g = torch.Generator().manual_seed(11)
    routers = {i: torch.randn(1, 64, generator=g) for i in range(2)}
    router_file = write_safetensors(tmp_path / "routers.safetensors",
                                    {f"blocks.{i}.self_attn.router.weight": w for i, w in routers.items()})
    out = tmp_path / "one.safetensors"
    info = patch_checkpoint(plain, out, num_groups=None, routers=router_file, window="0,1,1")
    assert info.moga["num_groups"] == 1 and info.moga["fusion"] == "mean"
    model = load_model(out)
    assert torch.equal(model.blocks[1].self_attn.router.weight, routers[1])
    inputs = random_inputs(dense.config, seed=12)
    cfg = model.moga_config.replace(windowed=False, per_frame=False)
    diff = run(model, inputs, moga=cfg) - run(dense, inputs)
    assert diff.abs().max() / run(dense, inputs).abs().max() < 1e-5
    # patching again replaces the routers instead of adding a second set
    twice = tmp_path / "twice.safetensors"
    patch_checkpoint(out, twice, num_groups=3, **CALIB)
    assert inspect_checkpoint(twice).moga["num_groups"] == 3
    assert sum("router" in k for k in TensorSource(twice).keys()) == 2


def test_patch_refuses_bad_requests(tmp_path, plain):
    with pytest.raises(ValueError, match="new file"):
        patch_checkpoint(plain, plain, num_groups=2, **CALIB)
    with pytest.raises(ValueError, match="router file"):
        patch_checkpoint(plain, tmp_path / "x.safetensors", num_groups=3,
                         routers={0: torch.randn(2, 64), 1: torch.randn(2, 64)})
    with pytest.raises(CheckpointError, match="belongs to another model"):
        patch_checkpoint(plain, tmp_path / "x.safetensors", num_groups=None, routers={0: torch.randn(2, 32)})
    with pytest.raises(ValueError, match="give routers"):
        patch_checkpoint(plain, tmp_path / "x.safetensors", num_groups=2, calibrate=False)


def test_spherical_kmeans_finds_clusters():
    g = torch.Generator().manual_seed(13)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    labels = torch.arange(400) % 5
    points = centres[labels] + 0.05 * torch.randn(400, 32, generator=g)
    found = spherical_kmeans(points, 5, seed=1)
    match = (found @ centres.T).max(dim=0).values
    assert (match > 0.99).all()


def test_extras_loader_hook(tmp_path):
    sd = tiny_model(seed=14).dit_state_dict()
    sd["text_encoder.table"] = torch.randn(3, 4)
    path = save_checkpoint(sd, tmp_path / "demo.safetensors", {"moga.extras": "unit-test", "moga.num_heads": "4"})
    with pytest.raises(CheckpointError, match="no loader is registered"):
        load_model(path)
    seen = {}

    def loader(source, metadata, device, dtype):
        seen["table"] = source.get("text_encoder.table")
        return {"text_encoder": "TE", "vae": None}

    register_extras("unit-test", loader)
    try:
        model = load_model(path)
    finally:
        EXTRA_LOADERS.pop("unit-test")
    assert model.text_encoder == "TE" and model.vae is None and torch.equal(seen["table"], sd["text_encoder.table"])
    assert load_model(write_tiny_checkpoint(tmp_path / "p.safetensors")).text_encoder is None


# ---- wrong files ------------------------------------------------------------------------------------


def _write_raw(path, tensors, metadata=None):
    return write_safetensors(path, tensors, metadata)


def test_not_safetensors(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x80\x04\x95 definitely a pickle" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(junk)
    pt = tmp_path / "wan.pth"
    pt.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="pickle"):
        inspect_checkpoint(pt)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tiny)


def test_truncated_files(tmp_path, plain):
    data = plain.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated.*100 missing"):
        load_model(cut)
    (n,) = struct.unpack("<Q", data[:8])
    cut.write_bytes(data[: 8 + n // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(cut)


def test_unsupported_image_variants_are_named(tmp_path):
    # the supported kinds (Wan2.1 I2V, Wan2.2 I2V / TI2V) load: tests/test_wan_models.py
    sd = tiny_model(seed=15, in_dim=36, image_dim=24).dit_state_dict()
    flf = dict(sd, **{"img_emb.emb_pos": torch.ones(1, 514, 24)})
    with pytest.raises(CheckpointError, match="first-last-frame"):
        load_model(_write_raw(tmp_path / "flf.safetensors", to_layout(flf, "comfyui"), {"moga.num_heads": "4"}))
    half = {k: v for k, v in sd.items() if ".k_img." not in k}
    with pytest.raises(CheckpointError, match="incomplete Wan2.1 I2V"):
        load_model(_write_raw(tmp_path / "half.safetensors", half, {"moga.num_heads": "4"}))
    odd = tiny_model(seed=15).dit_state_dict()
    odd["patch_embedding.weight"] = torch.randn(64, 20, 1, 2, 2)
    with pytest.raises(CheckpointError, match="image/control-conditioned"):
        inspect_checkpoint(_write_raw(tmp_path / "odd.safetensors", odd, {"moga.num_heads": "4"}))


def test_text_encoder_and_vae_files_are_named(tmp_path):
    t5 = {"shared.weight": torch.randn(10, 8), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8),
          "encoder.final_layer_norm.weight": torch.ones(8)}
    with pytest.raises(CheckpointError, match="text encoder"):
        load_model(_write_raw(tmp_path / "umt5.safetensors", t5))
    vae = {"encoder.conv1.weight": torch.randn(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.randn(4, 4, 3, 3, 3),
           "conv1.weight": torch.randn(8, 8, 1, 1, 1)}
    with pytest.raises(CheckpointError, match="a VAE"):
        load_model(_write_raw(tmp_path / "wan_vae.safetensors", vae))
    with pytest.raises(CheckpointError, match="not a Wan2.1 diffusion model"):
        load_model(_write_raw(tmp_path / "other.safetensors", {"foo.weight": torch.ones(3)}))


@pytest.mark.parametrize("extra,match", [
    ({"vace_blocks.0.before_proj.weight": torch.ones(2, 2)}, "VACE"),
    ({"control_adapter.conv.weight": torch.ones(2, 2)}, "camera-control"),
    ({"img_emb.proj.0.weight": torch.ones(2), "img_emb.emb_pos": torch.ones(1, 2, 2)}, "first-last-frame"),
])
def test_other_wan_variants_are_named(tmp_path, extra, match):
    sd = dict(tiny_model(seed=18).dit_state_dict(), **extra)
    with pytest.raises(CheckpointError, match=match):
        inspect_checkpoint(_write_raw(tmp_path / "v.safetensors", sd, {"moga.num_heads": "4"}))


def test_lora_and_clip_files_are_named(tmp_path):
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(4, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(64, 4)}
    with pytest.raises(CheckpointError, match="a LoRA"):
        load_model(_write_raw(tmp_path / "lora.safetensors", lora))
    wan_lora = {"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 64)}
    with pytest.raises(CheckpointError, match="a LoRA"):
        load_model(_write_raw(tmp_path / "lora2.safetensors", wan_lora))
    clip = {"visual.conv1.weight": torch.ones(4, 3, 2, 2), "log_scale": torch.ones(())}
    with pytest.raises(CheckpointError, match="CLIP"):
        load_model(_write_raw(tmp_path / "clip.safetensors", clip))


def test_router_disagreements(tmp_path):
    sd = tiny_model(seed=16, num_groups=4).dit_state_dict()
    meta = {"moga.num_heads": "4"}
    uneven = dict(sd, **{"blocks.1.self_attn.router.weight": torch.randn(3, 64)})
    with pytest.raises(CheckpointError, match="disagree on the group count"):
        load_model(_write_raw(tmp_path / "a.safetensors", uneven, meta))
    narrow = dict(sd, **{"blocks.1.self_attn.router.weight": torch.randn(4, 32)})
    with pytest.raises(CheckpointError, match=r"router of layer 1 has shape \(4, 32\)"):
        load_model(_write_raw(tmp_path / "b.safetensors", narrow, meta))
    with pytest.raises(CheckpointError, match="moga.num_groups=8 but the routers have 4"):
        load_model(_write_raw(tmp_path / "c.safetensors", sd, dict(meta, **{"moga.num_groups": "8"})))
    with pytest.raises(CheckpointError, match="moga.layers=0 but routers exist for layers 0-1"):
        load_model(_write_raw(tmp_path / "d.safetensors", sd, dict(meta, **{"moga.layers": "0"})))
    plain = {k: v for k, v in sd.items() if "router" not in k}
    with pytest.raises(CheckpointError, match="no router tensors"):
        load_model(_write_raw(tmp_path / "e.safetensors", plain, dict(meta, **{"moga.layers": "0-1"})))


def test_incomplete_model(tmp_path):
    sd = tiny_model(seed=17).dit_state_dict()
    del sd["blocks.1.ffn.2.weight"]
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*blocks.1.ffn.2.weight"):
        load_model(_write_raw(tmp_path / "x.safetensors", sd, {"moga.num_heads": "4"}))
