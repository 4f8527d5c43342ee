"""WorkerPool with the models users own: a Wan2.2 I2V A14B expert pair with a LoRA per expert, and Wan2.1
I2V (CLIP tokens) with a LoRA, on 2 CPU workers (gloo), against one process; what the pool still refuses,
refused in the host before any worker starts.

Tiny random files and fresh random inputs (start-image latents, fill, CLIP tokens, texts); the expert switch
is checked on the workers' step events, never on timing.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moga.attention import MoGAConfig
from moga.checkpoint import load_experts, load_model
from moga.conditioning import image_condition
from moga.parallel import WorkerPool
from moga.parallel.pool_model import settings_of
from moga.parallel.wire import pack, unpack
from moga.sampling import make_schedule, sample
from moga.testing import write_tiny_checkpoint

DEVICES = ["cpu", "cpu"]
SHOTS, SIZE = (2, 3), (5, 4, 6)   # 2 shots, 5 latent frames of 4 x 6: 30 tokens
CLIP_DIM = 24


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _kohya(path, seed):
    g = torch.Generator().manual_seed(seed)
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(64, 4, generator=g),
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 64, generator=g),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0),
               "diffusion_model.blocks.1.ffn.2.lora_B.weight": torch.randn(64, 2, generator=g),
               "diffusion_model.blocks.1.ffn.2.lora_A.weight": torch.randn(2, 128, generator=g)}, str(path))
    return str(path)


def _texts(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 5 + s, 32, generator=g) for s in range(len(SHOTS))], torch.randn(1, 4, 32, generator=g)


def _latent(g, frames):
    return torch.randn(1, 16, frames, *SIZE[1:], generator=g)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("poolwan")
    return {"high": write_tiny_checkpoint(d / "wan22_i2v_high_noise.safetensors", num_groups=3, seed=31, in_dim=36),
            "low": write_tiny_checkpoint(d / "wan22_i2v_low_noise.safetensors", num_groups=4, seed=32, in_dim=36),
            "i2v21": write_tiny_checkpoint(d / "wan21_i2v.safetensors", num_groups=3, seed=33, in_dim=36,
                                           image_dim=CLIP_DIM),
            "t2v": write_tiny_checkpoint(d / "t2v.safetensors", num_groups=3, seed=34),
            "lora_high": _kohya(d / "high_lora.safetensors", 1), "lora_low": _kohya(d / "low_lora.safetensors", 2),
            "dir": d}


def _run_pool(checkpoint, settings, job):
    """(latent, the workers' step events) of one job on a fresh 2-worker pool."""
    pool = WorkerPool(DEVICES, checkpoint, dict(settings, threads=1), start_timeout=90, stall_timeout=60)
    events = []
    try:  # the timeout only guards against a hang
        out = pool.run(job, on_step=lambda i, t, e: events.append((i, t, e)), timeout=120)
    finally:
        pool.close()
    return out, events


@pytest.mark.slow
def test_wan22_i2v_pair_with_a_lora_per_expert_matches_one_process(files):
    lora_h, lora_l = [(files["lora_high"], 0.7)], [(files["lora_low"], 0.9)]
    ref = load_experts(files["high"], files["low"], loras=lora_h, loras_low=lora_l)
    g = torch.Generator().manual_seed(41)
    image = image_condition(ref.config, SHOTS, SIZE, {0: _latent(g, 2), 1: _latent(g, 1)},
                            fill=_latent(g, sum(SHOTS)))
    pos, neg = _texts(42)
    job = dict(positive=pos, negative=neg, shot_frames=SHOTS, latent_size=SIZE, steps=4, cfg=(3.0, 2.0), shift=5.0,
               solver="unipc", seed=43, image=image)
    want_events = []
    want = sample(ref, on_step=lambda i, t, e: want_events.append((i, t, e)), **job)
    got, events = _run_pool(files["high"], {"low_noise": files["low"], "loras": lora_h, "loras_low": lora_l}, job)
    assert _rel(got, want) < 1e-5, _rel(got, want)
    # Wan2.2 I2V's boundary 0.9: timesteps 999, 937 run the high-noise expert, 833 and 624 the low-noise one
    timesteps = make_schedule(4, 5.0).timesteps
    assert ref.boundary == 0.9 and [round(t) for t in timesteps] == [999, 937, 833, 624]
    assert events == want_events == [(i, t, "high" if i < 2 else "low") for i, t in enumerate(timesteps)]
    # each expert's LoRA and its guidance matter: another LoRA on the low expert, or one cfg, is another video
    other = load_experts(files["high"], files["low"], loras=lora_h, loras_low=lora_h)
    assert _rel(sample(other, **job), want) > 1e-3
    assert _rel(sample(ref, **dict(job, cfg=3.0)), want) > 1e-3


@pytest.mark.slow
def test_wan21_i2v_with_clip_tokens_and_a_lora_matches_one_process(files):
    lora = [(files["lora_high"], 0.8)]
    ref = load_model(files["i2v21"], loras=lora)
    g = torch.Generator().manual_seed(51)
    clip = {0: torch.randn(1, 9, CLIP_DIM, generator=g), 1: torch.randn(1, 9, CLIP_DIM, generator=g)}
    image = image_condition(ref.config, SHOTS, SIZE, {0: _latent(g, 1), 1: _latent(g, 3)}, clip=clip,
                            fill=_latent(g, sum(SHOTS)))
    pos, neg = _texts(52)
    job = dict(positive=pos, negative=neg, shot_frames=SHOTS, latent_size=SIZE, steps=3, cfg=4.0, shift=5.0,
               solver="euler", seed=53, image=image)
    want = sample(ref, **job)
    got, events = _run_pool(files["i2v21"], {"loras": lora}, job)
    assert _rel(got, want) < 1e-5, _rel(got, want)
    assert [e for _, _, e in events] == ["single"] * 3
    # the CLIP tokens of shot 2 reach the workers: other tokens there, another video
    swapped = image_condition(ref.config, SHOTS, SIZE, {0: image.y[:, 4:, :1], 1: image.y[:, 4:, 2:5]},
                              clip={0: clip[0], 1: clip[0]}, fill=image.y[:, 4:])
    assert _rel(sample(ref, **dict(job, image=swapped)), want) > 1e-4


def test_an_image_condition_crosses_the_pipe_intact():
    from moga.testing import tiny_config
    g = torch.Generator().manual_seed(61)
    shared = torch.randn(1, 9, CLIP_DIM, generator=g)
    cond = image_condition(tiny_config(in_dim=36, image_dim=CLIP_DIM), SHOTS, SIZE, {1: _latent(g, 1)},
                           clip=shared, fill=_latent(g, 5))
    job = {"image": cond, "positive": [shared.bfloat16()], "cfg": (3.0, 2.0)}
    back = unpack(pack(job))
    assert back["cfg"] == (3.0, 2.0) and back["image"].kind == "clip+concat"
    assert torch.equal(back["image"].y, cond.y) and back["image"].latent is None
    assert all(torch.equal(c, shared) for c in back["image"].clip)
    # one tensor for every shot stays one tensor (sent once, embedded once by the worker)
    assert back["image"].clip[0] is back["image"].clip[1]
    assert back["positive"][0].dtype == torch.bfloat16 and torch.equal(back["positive"][0], shared.bfloat16())
    ti2v = image_condition(tiny_config(in_dim=48, out_dim=48), SHOTS, SIZE,
                           {1: torch.randn(1, 48, 1, *SIZE[1:], generator=g)})
    again = unpack(pack(ti2v))
    assert torch.equal(again.latent, ti2v.latent) and torch.equal(again.fixed, ti2v.fixed) and again.y is None


def test_a_folder_or_a_loaded_model_names_the_same_pair(files, tmp_path):
    import shutil
    folder = tmp_path / "a14b"
    folder.mkdir()
    hi, lo = (shutil.copy(files[k], folder / files[k].name) for k in ("high", "low"))
    pool = WorkerPool(DEVICES, folder)
    assert pool.pair and pool.checkpoint == str(folder / files["high"].name)
    assert pool.settings["low_noise"] == str(Path(lo).resolve()) and pool.settings["boundary"] is None
    assert pool.matches(DEVICES, hi, {"low_noise": lo})
    assert not pool.matches(DEVICES, hi, {"low_noise": lo, "loras_low": [(files["lora_low"], 1.0)]})
    loaded = load_experts(hi, lo, boundary=0.8, loras_low=[(files["lora_low"], 1.0)])
    checkpoint, settings = settings_of(loaded)
    again = WorkerPool(DEVICES, checkpoint, settings)
    assert again.settings["boundary"] == 0.8 and again.settings["loras"] == ()
    assert again.settings["loras_low"] == ((files["lora_low"], 1.0),)
    single = WorkerPool(DEVICES, files["t2v"])
    assert not single.pair and single.matches(DEVICES, files["t2v"], {"loras_low": (), "offload_expert": False})
    assert pool.starts == again.starts == single.starts == 0


def test_what_the_pool_refuses_is_refused_in_the_host(files):
    g = torch.Generator().manual_seed(71)
    pos, neg = _texts(72)
    base = dict(positive=pos, negative=neg, shot_frames=SHOTS, latent_size=SIZE, steps=2, cfg=3.0)
    pair = WorkerPool(DEVICES, files["high"], {"low_noise": files["low"]})
    i2v21 = WorkerPool(DEVICES, files["i2v21"])
    t2v = WorkerPool(DEVICES, files["t2v"])
    concat = image_condition(pair.config, SHOTS, SIZE, {0: _latent(g, 1)})
    with_clip = image_condition(i2v21.config, SHOTS, SIZE, {0: _latent(g, 1)},
                                clip=torch.randn(1, 9, CLIP_DIM, generator=g))
    small = image_condition(pair.config, (2, 2), (4, 4, 6), {0: _latent(g, 1)})
    cases = [(pair, {}, "image-to-video model: the job needs image="),
             (t2v, {"image": concat}, "text-to-video model: it takes no image condition"),
             (i2v21, {"image": concat}, "of the 'concat' kind but .* takes 'clip\\+concat'"),
             (pair, {"image": with_clip}, "of the 'clip\\+concat' kind"),
             (pair, {"image": small}, r"y of shape \(1, 20, 4, 4, 6\), but this latent needs \(1, 20, 5, 4, 6\)"),
             (i2v21, {"image": with_clip.__class__(with_clip.kind, y=with_clip.y, clip=with_clip.clip[:1])},
              "CLIP tokens .* for each of the 2 shots"),
             (t2v, {"cfg": (3.0, 2.0)}, "is one model: give one number"),
             (t2v, {"moga": (MoGAConfig(num_groups=3),) * 2}, "is one model: give one MoGAConfig"),
             (pair, {"moga": (MoGAConfig(num_groups=3),) * 3}, r"\(moga_high, moga_low\) for an expert pair, got 3"),
             (t2v, {"image": concat.y}, "give a moga.conditioning.ImageCondition"),
             (t2v, {"on_step": print}, "not sample\\(\\) options")]
    for pool, extra, match in cases:
        with pytest.raises(ValueError, match=match):
            pool.run(dict(base, **extra))
    assert pair.starts == i2v21.starts == t2v.starts == 0, "refused before any worker started"
    settings_errors = [({"loras_low": [(files["lora_low"], 1.0)]}, "for a Wan2.2 A14B pair: give settings"),
                       ({"offload_expert": True}, "for a Wan2.2 A14B pair"),
                       ({"low_noise": files["dir"] / "gone.safetensors"}, "low-noise expert .* does not exist"),
                       ({"low_noise": files["low"], "boundary": 1.5}, r"fraction of the timestep range in \(0, 1\)"),
                       ({"low_noise": files["t2v"]}, "the two experts differ in shape")]
    for settings, match in settings_errors:
        with pytest.raises(ValueError, match=match):
            WorkerPool(DEVICES, files["high"], settings)
    from moga.testing import tiny_model
    with pytest.raises(ValueError, match="not loaded from a file"):
        settings_of(tiny_model())
