"""Training-free MoGA (docs/training-free.md): dense warm-up steps/layers really run dense attention (counted by
wrapping the attention functions, not by timing), from the library, the command line and the settings node; and a
checkpoint's metadata picks the defaults (calibrated routers -> lse + dense warm-up, trained -> mean, none)."""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

import moga.attention.layer as layer_mod
import moga.attention.mixture as mixture_mod
from moga import checkpoint as ckpt
from moga.sampling import sample
from moga.testing import random_inputs, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test-training-free-encoders"
LAYERS = 2


class CallLog:
    """Every self-attention call, in order: ("dense", layer) or ("moga", layer, fusion, num_groups, capacity)."""

    def __init__(self):
        self.entries, self._layer, self.handles = [], None, []

    def watch(self, model):
        """Note which layer runs (a pre-hook on every self-attention module)."""
        for i, block in enumerate(model.blocks):
            self.handles.append(block.self_attn.register_forward_pre_hook(
                lambda m, a, i=i: setattr(self, "_layer", i)))

    def kinds(self):
        return [e[0] for e in self.entries]


@pytest.fixture
def calls(monkeypatch):
    log = CallLog()
    real_dense, real_moga = layer_mod.dense_attention, mixture_mod.moga_attention

    def dense(q, k, v):
        log.entries.append(("dense", log._layer))
        return real_dense(q, k, v)

    def sparse(q, k, v, routing, layout, cfg):
        log.entries.append(("moga", log._layer, cfg.fusion, cfg.num_groups, cfg.capacity))
        return real_moga(q, k, v, routing, layout, cfg)

    monkeypatch.setattr(layer_mod, "dense_attention", dense)
    monkeypatch.setattr(mixture_mod, "moga_attention", sparse)
    monkeypatch.setattr(layer_mod, "moga_attention", sparse, raising=False)  # should it become a top-level import
    yield log
    for h in log.handles:
        h.remove()


def _expected(steps, warm, passes, layers=LAYERS, dense_layers=()):
    out = []
    for s in range(steps):
        for _ in range(passes):
            out += ["dense" if (s < warm or i in dense_layers) else "moga" for i in range(layers)]
    return out


@pytest.fixture(scope="module")
def moga_model():
    from moga.testing import tiny_model
    return tiny_model(num_groups=3, num_layers=LAYERS, seed=2)


def _sample(model, **kw):
    x, _, ctx = random_inputs(model.config, frames=3, height=8, width=8, shots=1, seed=1)
    neg = torch.randn_like(ctx)
    args = dict(shot_frames=(2, 1), latent_size=(3, 8, 8), steps=4, solver="euler", seed=3, cfg=1.0)
    args.update(kw)
    return sample(model, [ctx, ctx * 0.5], neg, **args)


@pytest.mark.parametrize("dense_steps, warm", [(0.0, 0), (0.5, 2), (0.3, 1), (1.0, 4)])
def test_warmup_steps_run_dense(calls, moga_model, dense_steps, warm):
    calls.watch(moga_model)
    _sample(moga_model, moga=moga_model.moga_config.replace(fusion="lse"), dense_steps=dense_steps)
    assert calls.kinds() == _expected(4, warm, passes=1)
    assert all(e[2] == "lse" for e in calls.entries if e[0] == "moga")


def test_warmup_with_guidance_and_dense_layers(calls, moga_model):
    calls.watch(moga_model)
    _sample(moga_model, cfg=4.0, dense_steps=0.25, dense_layers=(1,))
    assert calls.kinds() == _expected(4, 1, passes=2, dense_layers=(1,))
    layers = [e[1] for e in calls.entries]
    assert layers == [0, 1] * 8 and {e[1] for e in calls.entries if e[0] == "moga"} == {0}


def test_full_warmup_is_the_dense_model(moga_model):
    lse = moga_model.moga_config.replace(fusion="lse")
    dense = _sample(moga_model, moga=lse.replace(dense=True))
    warm = _sample(moga_model, moga=lse, dense_steps=1.0)
    sparse = _sample(moga_model, moga=lse, dense_steps=0.0)
    assert torch.equal(warm, dense)
    assert float((sparse - dense).norm() / dense.norm()) > 1e-4


# ---- checkpoint defaults by metadata -----------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ckpt.register_extras(EXTRAS, lambda source, meta, device, dtype: {"text_encoder": _Text(), "vae": _VAE()})
    d = tmp_path_factory.mktemp("tf")
    plain = write_tiny_checkpoint(d / "plain.safetensors", num_layers=LAYERS, seed=4,
                                  metadata={"moga.extras": EXTRAS, "moga.demo": '{"kept": 1}'})
    small = dict(calibration_size=(2, 8, 8), calibration_steps=1, calibration_tokens=64)
    cal = d / "calibrated.safetensors"
    ckpt.patch_checkpoint(plain, cal, num_groups=3, **small)
    model = ckpt.load_model(cal)
    routers = {i: b.self_attn.router.weight.clone() for i, b in enumerate(model.blocks)}
    trained = d / "trained.safetensors"
    ckpt.patch_checkpoint(plain, trained, num_groups=None, routers=routers)
    custom = d / "custom.safetensors"
    ckpt.patch_checkpoint(plain, custom, num_groups=3, fusion="mean", dense_warmup=0.5, **small)
    return {"plain": plain, "calibrated": cal, "trained": trained, "custom": custom, "dir": d}


def test_checkpoint_defaults(files):
    cal = ckpt.load_model(files["calibrated"])
    assert cal.moga_config.fusion == "lse"
    assert cal.dense_warmup == ckpt.CALIBRATED_DENSE_WARMUP > 0
    info = ckpt.inspect_checkpoint(files["calibrated"]).moga
    assert info["fusion"] == "lse" and info["dense_warmup"] == ckpt.CALIBRATED_DENSE_WARMUP
    trained = ckpt.load_model(files["trained"])
    assert (trained.moga_config.fusion, trained.dense_warmup) == ("mean", 0.0)
    for b0, b1 in zip(cal.blocks, trained.blocks):   # same routers, other defaults
        assert torch.equal(b0.self_attn.router.weight, b1.self_attn.router.weight)
    custom = ckpt.load_model(files["custom"])
    assert (custom.moga_config.fusion, custom.dense_warmup) == ("mean", 0.5)
    for name in ("calibrated", "trained"):   # a model's own metadata (the demo model's settings) survives patching
        meta = ckpt.TensorSource(files[name]).metadata
        assert meta["moga.demo"] == '{"kept": 1}' and meta["moga.extras"] == EXTRAS


# ---- the command line --------------------------------------------------------------------------------


class _Text:
    def encode(self, prompts):
        return [torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]


class _VAE:
    def decode(self, latent):
        b, c, f, h, w = latent.shape
        img = torch.tanh(latent[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
        return torch.cat([img[:, :, :1], img[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)


def _generate(files, name, *extra):
    from moga.cli import main
    shots = files["dir"] / "shots.txt"
    shots.write_text("[5] a red circle\n[1] it moves\n")
    return main(["generate", "--model", str(files[name]), "--shots", str(shots), "--size", "32x32", "--steps", "4",
                 "--seed", "1", "--out", str(files["dir"] / f"{name}.mp4"), "--device", "cpu", "--quiet",
                 "--cfg", "1", "--overwrite", *extra])  # the module's tests write the same names again


def _watch_loaded(calls, monkeypatch):
    real = ckpt.load_model

    def load(*a, **kw):
        model = real(*a, **kw)
        calls.watch(model)
        return model
    monkeypatch.setattr(ckpt, "load_model", load)


def test_cli_uses_the_checkpoint_warmup(calls, files, monkeypatch):
    _watch_loaded(calls, monkeypatch)
    assert _generate(files, "calibrated") == 0
    warm = round(ckpt.CALIBRATED_DENSE_WARMUP * 4)
    assert calls.kinds() == _expected(4, warm, passes=1)
    assert {e[2] for e in calls.entries if e[0] == "moga"} == {"lse"}
    assert {e[4] for e in calls.entries if e[0] == "moga"} == {ckpt.CALIBRATED_CAPACITY}


def test_cli_flags_override(calls, files, monkeypatch):
    _watch_loaded(calls, monkeypatch)
    assert _generate(files, "calibrated", "--dense-steps", "0.5", "--dense-layers", "0", "--fusion", "mean",
                     "--groups", "2", "--capacity", "0") == 0
    assert calls.kinds() == _expected(4, 2, passes=1, dense_layers=(0,))
    assert {(e[1], e[2], e[3], e[4]) for e in calls.entries if e[0] == "moga"} == {(1, "mean", 2, None)}


def test_cli_trained_checkpoint_runs_sparse_from_the_start(calls, files, monkeypatch):
    _watch_loaded(calls, monkeypatch)
    assert _generate(files, "trained") == 0
    assert calls.kinds() == _expected(4, 0, passes=1)
    assert {(e[2], e[4]) for e in calls.entries if e[0] == "moga"} == {("mean", None)}


# ---- the MoGA Attention Settings node ----------------------------------------------------------------


def test_settings_node_keeps_or_overrides_the_warmup(files, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_fakes
    with comfy_fakes.installed(str(tmp_path), str(ROOT)) as env:
        folder = Path(env.folder_paths.models_dir) / "diffusion_models"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cal.safetensors").write_bytes(files["calibrated"].read_bytes())
        env.nodes.loader.CACHE.clear()
        handle = env.nodes.MoGAModelLoader.execute(ckpt_name="cal.safetensors").args[0]
        assert handle.dense_warmup == ckpt.CALIBRATED_DENSE_WARMUP
        node = env.nodes.MoGAAttentionSettings
        keep = node.execute(model=handle, num_groups=2).args[0]
        assert keep.dense_warmup == ckpt.CALIBRATED_DENSE_WARMUP and keep.moga.fusion == "lse"
        off = node.execute(model=handle, dense_warmup=0.0, fusion="mean", route_layers="1").args[0]
        assert (off.dense_warmup, off.moga.fusion, off.dense_layers) == (0.0, "mean", (0,))
        with pytest.raises(Exception, match="dense_warmup"):
            node.execute(model=handle, dense_warmup=-0.5)
        # group capacity: -1 keeps the checkpoint's, 0 turns it off, a number sets it
        assert handle.moga.capacity == ckpt.CALIBRATED_CAPACITY and keep.moga.capacity == ckpt.CALIBRATED_CAPACITY
        assert node.execute(model=handle, capacity=0.0).args[0].moga.capacity is None
        two = node.execute(model=handle, capacity=2.0).args[0]
        assert two.moga.capacity == 2.0 and two.settings["capacity"] == 2.0
        with pytest.raises(Exception, match="capacity"):
            node.execute(model=handle, capacity=-0.5)
        env.nodes.loader.CACHE.clear()



# ---- the measurement script ---------------------------------------------------------------------------


@pytest.mark.slow
def test_measurement_script_smoke(tmp_path):
    """benchmarks/training_free.py end to end on a tiny random dense demo-format model: calibration, patching,
    rendering, scoring, FLOP counts and per-layer diagnostics all run and land in the JSON."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("training_free_bench", ROOT / "benchmarks" / "training_free.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tf.json"
    result = bench.main(["--smoke", "--groups", "2", "--fusions", "lse", "--warmups", "0,0.5", "--steps", "2",
                         "--out", str(out), "--markdown", str(tmp_path / "tf.md")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "M=2 lse warm-up 0", "M=2 lse warm-up 0.5"}
    assert rows["dense"]["flops_ratio"] == 1.0
    assert 0 < rows["M=2 lse warm-up 0"]["flops_ratio"] < rows["M=2 lse warm-up 0.5"]["flops_ratio"] < 1
    layers = result["diagnostics"]["M=2 lse"]["layers"]
    assert len(layers) == 2 and all(0 < v["recall"] < 1 for v in layers.values())
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| dense |" in (tmp_path / "tf.md").read_text()
    # --resume measures only what is missing: here a warm-up over every step, which is the dense model
    again = bench.main(["--smoke", "--groups", "2", "--fusions", "lse", "--warmups", "0,1", "--steps", "2",
                        "--out", str(out), "--resume"])
    rows2 = {r["variant"]: r for r in again["rows"]}
    assert set(rows2) == set(rows) | {"M=2 lse warm-up 1"}
    assert rows2["M=2 lse warm-up 0"] == rows["M=2 lse warm-up 0"]
    assert rows2["M=2 lse warm-up 1"]["flops_ratio"] == 1.0 and rows2["M=2 lse warm-up 1"]["latent_error"] == 0.0
    assert len(again["commands"]) == 2


def _bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("training_free_bench", ROOT / "benchmarks" / "training_free.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("name", ["training_free.json", "training_free-twin5.json",
                                  "training_free-twin5-16.json"])
def test_doc_tables_are_the_json(name):
    """docs/training-free.md shows the tables generated from each result file (the first measurement on the
    undertrained dense twin, the re-measurement on the better-trained one and its 16-story check), every row."""
    import json
    bench = _bench()
    source = f"benchmarks/results/{name}"
    result = json.loads((ROOT / source).read_text())
    doc = (ROOT / "docs" / "training-free.md").read_text()
    assert bench.source_name(ROOT / source) == source
    assert bench.doc_tables(result, source) in doc, ("docs/training-free.md is out of date: run python "
                                                      f"benchmarks/training_free.py --table {source} "
                                                      "--doc docs/training-free.md")
    for row in result["rows"]:
        assert f"| {row['variant']} |" in doc


def test_doc_tables_rewrite(tmp_path):
    bench = _bench()
    result = {"rows": [{"variant": "dense", "groups": None, "fusion": None, "warmup": None, "score": 50.0,
                        "colour": 1.0, "shape": 2.0, "size": 3.0, "direction": 4.0, "background": 5.0,
                        "consistency": None, "smoothness": 6.0, "latent_error": 0.0, "attention_gflops": 1.0,
                        "flops_ratio": 1.0}], "diagnostics": {}}
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{bench.DOC_BEGIN}\nold table\n{bench.DOC_END}\nafter\n")
    bench.write_doc_tables(doc, result)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\nafter\n") and "old table" not in text
    assert "| dense | 50.0 | 100% |" in text
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one line"):
        bench.write_doc_tables(doc, result)


def test_doc_tables_two_blocks(tmp_path):
    """One doc, one block per result file: rewriting one block leaves the other as it was."""
    bench = _bench()
    row = {"variant": "dense", "groups": None, "fusion": None, "warmup": None, "score": 50.0, "colour": 10.0,
           "shape": 20.0, "size": 30.0, "direction": 40.0, "background": 50.0, "consistency": 60.0,
           "smoothness": 70.0, "latent_error": 0.0, "attention_gflops": 2.0, "flops_ratio": 1.0}
    sparse = dict(row, variant="M=8 lse warm-up 0.25 cap 1", groups=8, fusion="lse", warmup=0.25, capacity=1.0,
                  score=45.0, shape=15.0, latent_error=0.5, attention_gflops=0.8, flops_ratio=0.4)
    new, old = {"rows": [row, sparse], "diagnostics": {}}, {"rows": [dict(row, score=40.0)], "diagnostics": {}}
    a, b = "benchmarks/results/a.json", "benchmarks/results/b.json"
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{bench.doc_begin(a)}\nold a\n{bench.DOC_END}\nmiddle\n"
                   f"{bench.doc_begin(b)}\nold b\n{bench.DOC_END}\nafter\n")
    bench.write_doc_tables(doc, new, a)
    text = doc.read_text()
    assert bench.doc_tables(new, a) in text and "old a" not in text and "old b" in text
    assert "| M=8 lse warm-up 0.25 cap 1 | 45.0 | 90% |" in text and "| shape 75% |" in text
    bench.write_doc_tables(doc, old, b)
    text = doc.read_text()
    assert bench.doc_tables(new, a) in text and bench.doc_tables(old, b) in text and "old b" not in text
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("\nafter\n")
    with pytest.raises(SystemExit, match="needs one line"):
        bench.write_doc_tables(doc, new, "benchmarks/results/c.json")
