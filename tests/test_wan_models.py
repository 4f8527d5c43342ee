"""Wan2.1 I2V, Wan2.2 I2V / TI2V and the A14B expert pair: conditioning, per-shot start images,
expert switching at the boundary, step-distilled sampling, CFG as one batch of 2, sequence parallel."""
import pytest
import torch

from moga.conditioning import image_condition
from moga.experts import ExpertPair
from moga.sampling import dense_step_count, distill_schedule, sample, sampler_settings
from moga.testing import ThreadExchange, tiny_model


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _texts(cfg, shots, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = [torch.randn(1, 6 + s, cfg.text_dim, generator=g) for s in range(shots)]
    return pos, torch.randn(1, 5, cfg.text_dim, generator=g)


# ---- conditioning ----------------------------------------------------------------------------
def test_per_shot_start_images_land_in_their_shots_first_latent_frames():
    cfg = tiny_model(in_dim=36, num_layers=1).config
    g = torch.Generator().manual_seed(1)
    shots = (3, 2, 4)                         # shots start at latent frames 0, 3, 5
    first = torch.randn(1, 16, 3, 4, 6, generator=g)   # shot 1: the whole encoded clip
    third = torch.randn(1, 16, 1, 4, 6, generator=g)   # shot 3: the image alone
    fill = torch.randn(1, 16, 9, 4, 6, generator=g)
    cond = image_condition(cfg, shots, (9, 4, 6), {0: first, 2: third}, fill=fill)
    assert cond.kind == "concat" and cond.clip is None and cond.y.shape == (1, 20, 9, 4, 6)
    mask, lat = cond.y[:, :4], cond.y[:, 4:]
    on = [f for f in range(9) if bool((mask[:, :, f] == 1).all())]
    assert on == [0, 5] and bool((mask[:, :, [1, 2, 3, 4, 6, 7, 8]] == 0).all())
    assert torch.equal(lat[:, :, 0:3], first) and torch.equal(lat[:, :, 5:6], third)
    assert torch.equal(lat[:, :, 3:5], fill[:, :, 3:5]) and torch.equal(lat[:, :, 6:], fill[:, :, 6:])
    with pytest.raises(ValueError, match="shot 4"):
        image_condition(cfg, shots, (9, 4, 6), {3: third})
    with pytest.raises(ValueError, match=r"start latent of shot 2"):
        image_condition(cfg, shots, (9, 4, 6), {1: torch.randn(1, 16, 3, 4, 6)})  # shot 2 has 2 frames
    with pytest.raises(ValueError, match="no CLIP image branch"):
        image_condition(cfg, shots, (9, 4, 6), {0: third}, clip=torch.randn(1, 257, 1280))
    t2v = tiny_model(num_layers=1).config
    with pytest.raises(ValueError, match="text-to-video model"):
        image_condition(t2v, shots, (9, 4, 6), {0: third})
    assert image_condition(t2v, shots, (9, 4, 6), {}) is None


def test_clip_embedding_per_shot_else_the_first_images():
    cfg = tiny_model(in_dim=36, image_dim=24, num_layers=1).config
    a, b = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    lat = torch.randn(1, 16, 1, 4, 4)
    cond = image_condition(cfg, (2, 2, 2), (6, 4, 4), {1: lat}, clip={1: a, 2: b})
    assert [id(c) for c in cond.clip] == [id(a), id(a), id(b)]
    with pytest.raises(ValueError, match="needs a CLIP-vision embedding"):
        image_condition(cfg, (2, 2, 2), (6, 4, 4), {0: lat})


def test_i2v_cross_attention_reads_each_shots_own_clip_tokens():
    # one layer: self-attention comes before the cross-attention and the FFN/head are per token, so a
    # shot's output depends on its own CLIP tokens only
    model = tiny_model(seed=5, in_dim=36, image_dim=24, num_layers=1)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 4, 4, 4, generator=g)
    y = torch.randn(1, 20, 4, 4, 4, generator=g)
    pos, _ = _texts(cfg, 2)
    c1, c2, c3 = (torch.randn(1, 9, 24, generator=g) for _ in range(3))
    with torch.inference_mode():
        a = model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), y=y, clip=[c1, c2])
        b = model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), y=y, clip=[c1, c3])
        same = model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), y=y, clip=c1)
        both = model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), y=y, clip=[c1, c1])
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and rel(a[:, :, 2:], b[:, :, 2:]) > 1e-3
    assert torch.equal(same, both)
    with pytest.raises(ValueError, match="pass clip="):
        model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), y=y)
    with pytest.raises(ValueError, match="pass y"):
        model(x, torch.tensor([500.0]), pos, shot_frames=(2, 2), clip=c1)


def test_ti2v_holds_the_image_frame_at_timestep_zero():
    model = tiny_model(seed=6, in_dim=48, out_dim=48, num_layers=1)
    cfg = model.config
    assert cfg.conditioning == "replace"
    seen = []
    real = model.time_segments
    model.time_segments = lambda t, b, grid: (seen.append(torch.as_tensor(t).clone()) or real(t, b, grid))
    img1, img2 = torch.randn(1, 48, 1, 4, 4), torch.randn(1, 48, 1, 4, 4)
    cond = image_condition(cfg, (2, 3), (5, 4, 4), {0: img1, 1: img2})
    pos, _ = _texts(cfg, 2)
    out = sample(model, pos, None, shot_frames=(2, 3), latent_size=(5, 4, 4), steps=3, cfg=1.0,
                 seed=3, image=cond)
    assert torch.equal(out[:, :, 0:1], img1) and torch.equal(out[:, :, 2:3], img2)
    assert len(seen) == 3
    for t in seen:
        assert t.shape == (1, 5) and bool((t[0, [0, 2]] == 0).all()) and bool((t[0, [1, 3, 4]] > 0).all())
    # the model's segments: a per-frame t with equal runs costs one row per run
    rows, segs = model.time_segments(seen[0], 1, (5, 2, 2))
    assert rows.shape == (1, 4) and segs == [(0, 4, 0), (4, 8, 1), (8, 12, 2), (12, 20, 3)]


def test_i2v_sampling_needs_an_image():
    model = tiny_model(in_dim=36, num_layers=1)
    pos, _ = _texts(model.config, 1)
    with pytest.raises(ValueError, match="image-to-video model"):
        sample(model, pos, None, shot_frames=(2,), latent_size=(2, 4, 4), steps=1, cfg=1.0)


# ---- Wan2.2 A14B: two experts ----------------------------------------------------------------
def _pair(boundary=None, **conf):
    high = tiny_model(seed=11, num_groups=3, **conf)
    low = tiny_model(seed=12, num_groups=4, **conf)
    return ExpertPair(high, low, boundary=boundary)


def test_experts_switch_at_the_boundary_step():
    pair = _pair()
    assert pair.boundary == 0.875
    calls = {"high": [], "low": []}
    for name in calls:
        getattr(pair, name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls[name].append((float(args[1].reshape(-1)[0]), kwargs["moga"])),
            with_kwargs=True)
    steps = []
    pos, neg = _texts(pair.config, 2)
    sample(pair, pos, neg, shot_frames=(2, 1), latent_size=(3, 4, 4), steps=8, cfg=3.0, shift=5.0,
           solver="euler", seed=0, cfg_batch=False, on_step=lambda i, t, e: steps.append((i, t, e)))
    ts = [t for _, t, _ in steps]
    switch = next(i for i, t in enumerate(ts) if t < 875.0)
    assert 0 < switch < len(ts)
    assert [e for _, _, e in steps] == ["high"] * switch + ["low"] * (len(ts) - switch)
    # two passes per step (cfg), each expert with its own routers' config
    assert [t for t, _ in calls["high"]] == [t for t in ts[:switch] for _ in (0, 1)]
    assert [t for t, _ in calls["low"]] == [t for t in ts[switch:] for _ in (0, 1)]
    assert {c.num_groups for _, c in calls["high"]} == {3} and {c.num_groups for _, c in calls["low"]} == {4}


def test_a_moga_config_per_expert_reaches_its_expert():
    """moga=(high, low): each expert runs its own (None in the pair: that expert's own); one model refuses a pair."""
    pair = _pair(boundary=0.95)   # 2 steps: t = 1000 high, 833 low
    seen = {"high": set(), "low": set()}
    for name in seen:
        getattr(pair, name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen[name].add(kwargs["moga"]), with_kwargs=True)
    pos, neg = _texts(pair.config, 1)
    kw = dict(shot_frames=(2,), latent_size=(2, 4, 4), steps=2, cfg=3.0, shift=5.0, seed=2, solver="euler")
    high = pair.high.moga_config.replace(num_groups=2, window=(1, 2, 1))
    low = pair.low.moga_config.replace(num_groups=3, fusion="lse")
    a = sample(pair, pos, neg, moga=(high, low), **kw)
    assert seen == {"high": {high}, "low": {low}}
    seen["high"].clear(), seen["low"].clear()
    b = sample(pair, pos, neg, moga=(high, None), **kw)
    assert seen == {"high": {high}, "low": {pair.low.moga_config}} and rel(a, b) > 1e-4
    with pytest.raises(ValueError, match="got 1 configs for one model"):
        sample(pair.high, pos, neg, moga=(high,), **kw)
    with pytest.raises(ValueError, match=r"moga is one MoGAConfig \(or \(moga_high, moga_low\)"):
        sample(pair, pos, neg, moga=(high, low, low), **kw)


def test_i2v_pair_boundary_and_override():
    pair = _pair(in_dim=36)
    assert pair.boundary == 0.9 and pair.name_for(900.0) == "high" and pair.name_for(899.9) == "low"
    assert _pair(boundary=0.5).name_for(499.0) == "low"
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        _pair(boundary=1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        ExpertPair(tiny_model(), tiny_model(num_layers=3))


def test_pair_with_per_expert_cfg_and_offload_on_cpu():
    pair = _pair()
    pair.offload = True  # on a CPU device nothing moves, the run is the same
    pos, neg = _texts(pair.config, 1)
    kw = dict(shot_frames=(2,), latent_size=(2, 4, 4), steps=4, shift=5.0, seed=1, cfg_batch=False)
    a = sample(pair, pos, neg, cfg=(3.0, 2.0), **kw)
    b = sample(pair, pos, neg, cfg=(3.0, 3.0), **kw)
    assert rel(a, b) > 1e-4 and pair.switches == 0
    with pytest.raises(ValueError, match="one number"):
        sample(tiny_model(), pos, neg, cfg=(3.0, 2.0), **kw)


# ---- step-distilled sampling -----------------------------------------------------------------
def test_distill_schedule_is_lightx2vs():
    s = distill_schedule(4, 5.0)
    want = [1.0, 0.9375, 5 * 0.5 / 3.0, 5 * 0.25 / 2.0, 0.0]
    assert s.sigmas == pytest.approx(want, abs=1e-12)
    assert s.timesteps == pytest.approx([w * 1000 for w in want[:4]], abs=1e-9)
    with pytest.raises(ValueError, match="strictly decreasing"):
        distill_schedule(2, 5.0, timesteps=[500, 700])


def test_cfg_one_never_evaluates_the_negative():
    model = tiny_model(seed=2)
    pos, neg = _texts(model.config, 2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    sample(model, pos, neg, shot_frames=(1, 1), latent_size=(2, 4, 4), steps=4, cfg=1.0,
           schedule="distill", seed=0)
    assert len(seen) == 4 and all(c is not neg and isinstance(c, list) and c[0].shape[0] == 1 for c in seen)


def test_dense_warmup_in_steps_and_checkpoint_defaults():
    assert dense_step_count(0.0, 4, 1) == 1 and dense_step_count(0.5, 4) == 2
    with pytest.raises(ValueError, match="step count in 0..4"):
        dense_step_count(0.0, 4, 5)
    model = tiny_model(seed=2, num_groups=3)
    model.sampler_defaults = {"steps": 4, "cfg": 1.0, "shift": 5.0, "schedule": "distill"}
    assert sampler_settings(model) == dict(steps=4, cfg=1.0, shift=5.0, schedule="distill", solver="euler")
    assert sampler_settings(model, steps=6)["steps"] == 6
    moga = []
    model.register_forward_pre_hook(lambda m, a, kw: moga.append(kw["moga"].dense), with_kwargs=True)
    pos, _ = _texts(model.config, 1)
    sample(model, pos, None, shot_frames=(2,), latent_size=(2, 4, 4), dense_warmup_steps=1, seed=0)
    assert moga == [True, False, False, False]


# ---- CFG as one batch of 2 -------------------------------------------------------------------
@pytest.mark.parametrize("routed", [False, True])
def test_cfg_batch_of_two_equals_two_passes(routed):
    model = tiny_model(seed=9, num_groups=3 if routed else 0, in_dim=36, image_dim=24)
    pos, neg = _texts(model.config, 2, seed=4)
    g = torch.Generator().manual_seed(5)
    cond = image_condition(model.config, (2, 2), (4, 4, 6), {0: torch.randn(1, 16, 2, 4, 6, generator=g),
                                                            1: torch.randn(1, 16, 1, 4, 6, generator=g)},
                           clip={0: torch.randn(1, 7, 24, generator=g), 1: torch.randn(1, 7, 24, generator=g)})
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    kw = dict(shot_frames=(2, 2), latent_size=(4, 4, 6), steps=3, cfg=4.0, seed=2, image=cond)
    one = sample(model, pos, neg, cfg_batch=True, **kw)
    assert calls == [2, 2, 2]
    two = sample(model, pos, neg, cfg_batch=False, **kw)
    assert calls[3:] == [1] * 6
    assert rel(one, two) < 1e-5
    auto = sample(model, pos, neg, **kw)  # automatic: two passes on a CPU
    assert calls[9:] == [1] * 6 and torch.equal(auto, two)


# ---- sequence parallel -----------------------------------------------------------------------
def test_two_experts_with_image_over_two_ranks_match_one_process():
    pair = _pair(in_dim=48, out_dim=48, num_heads=4)
    pos, neg = _texts(pair.config, 2)
    cond = image_condition(pair.config, (2, 2), (4, 4, 6), {1: torch.randn(1, 48, 1, 4, 6)})
    kw = dict(shot_frames=(2, 2), latent_size=(4, 4, 6), steps=4, cfg=3.0, shift=5.0, seed=4,
              image=cond, cfg_batch=False)
    want = sample(pair, pos, neg, **kw)
    outs = ThreadExchange.run(2, lambda ex: sample(pair, pos, neg, parallel=ex, **kw))
    for out in outs:
        assert rel(out, want) < 1e-5


def _pair_run(ex, cfg_batch):
    """Rank body (spawned, gloo): the TI2V-shaped expert pair with a shot-2 start image."""
    torch.manual_seed(0)
    pair = _pair(in_dim=48, out_dim=48, num_heads=4)
    pos, neg = _texts(pair.config, 2)
    g = torch.Generator().manual_seed(8)
    cond = image_condition(pair.config, (2, 2), (4, 4, 6), {1: torch.randn(1, 48, 1, 4, 6, generator=g)})
    kw = dict(shot_frames=(2, 2), latent_size=(4, 4, 6), steps=4, cfg=3.0, shift=5.0, seed=4,
              image=cond, cfg_batch=cfg_batch)
    return sample(pair, pos, neg, parallel=ex, **kw).numpy()


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_two_experts_on_two_gloo_ranks_match_one_process(cfg_batch):
    from moga.parallel.group import run_on_ranks

    want = torch.from_numpy(_pair_run(None, False))
    for out in run_on_ranks(_pair_run, 2, args=(cfg_batch,), timeout=120):
        assert rel(torch.from_numpy(out), want) < 1e-5


# ---- loading the model kinds -----------------------------------------------------------------
KINDS = {"Wan2.1 I2V": dict(in_dim=36, image_dim=24), "Wan2.2 I2V": dict(in_dim=36),
         "Wan2.2 TI2V": dict(in_dim=48, out_dim=48)}


@pytest.mark.parametrize("layout", ["wan", "comfyui", "diffusers"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_image_models_load_in_every_layout(tmp_path, kind, layout):
    from moga.checkpoint import inspect_checkpoint, load_model
    from moga.testing import write_tiny_checkpoint

    conf = KINDS[kind]
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", layout=layout, seed=3, **conf)
    model = load_model(path)
    want = tiny_model(seed=3, **conf)
    assert model.config == want.config
    assert inspect_checkpoint(path).config["in_dim"] == conf["in_dim"]
    g = torch.Generator().manual_seed(1)
    out_dim = conf.get("out_dim", 16)
    x = torch.randn(1, out_dim, 2, 4, 4, generator=g)
    kw = {}
    if conf["in_dim"] != out_dim:
        kw["y"] = torch.randn(1, conf["in_dim"] - out_dim, 2, 4, 4, generator=g)
    if conf.get("image_dim"):
        kw["clip"] = torch.randn(1, 5, 24, generator=g)
    ctx = torch.randn(1, 6, model.config.text_dim, generator=g)
    with torch.inference_mode():
        assert torch.equal(model(x, torch.tensor([300.0]), ctx, **kw), want(x, torch.tensor([300.0]), ctx, **kw))


def test_expert_pair_loads_from_two_files_or_one_folder(tmp_path):
    from moga.checkpoint import CheckpointError, load_experts, sampler_metadata
    from moga.testing import write_tiny_checkpoint

    folder = tmp_path / "wan22"
    folder.mkdir()
    meta = sampler_metadata(steps=4, cfg=1.0, shift=5.0, schedule="distill")
    hi = write_tiny_checkpoint(folder / "wan2.2_i2v_high_noise_14B.safetensors", layout="comfyui", seed=1,
                               num_groups=3, in_dim=36, metadata=meta)
    lo = write_tiny_checkpoint(folder / "wan2.2_i2v_low_noise_14B.safetensors", layout="comfyui", seed=2,
                               num_groups=5, in_dim=36)
    pair = load_experts(folder)
    assert pair.boundary == 0.9 and pair.high.moga_config.num_groups == 3 and pair.low.moga_config.num_groups == 5
    assert sampler_settings(pair)["schedule"] == "distill" and pair.high.sampler_defaults["steps"] == 4
    pair2 = load_experts(hi, lo, boundary=0.8)
    assert pair2.boundary == 0.8
    sub = tmp_path / "release"
    (sub / "high_noise_model").mkdir(parents=True)
    (sub / "low_noise_model").mkdir()
    write_tiny_checkpoint(sub / "high_noise_model" / "diffusion_pytorch_model.safetensors", layout="diffusers", seed=1)
    write_tiny_checkpoint(sub / "low_noise_model" / "diffusion_pytorch_model.safetensors", layout="diffusers", seed=2)
    assert load_experts(sub).boundary == 0.875
    write_tiny_checkpoint(folder / "another_high_noise.safetensors", seed=3)
    with pytest.raises(CheckpointError, match="2 high-noise and 1 low-noise"):
        load_experts(folder)
    with pytest.raises(CheckpointError, match="pass the low-noise expert"):
        load_experts(hi)
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_experts(hi, write_tiny_checkpoint(tmp_path / "t2v.safetensors", seed=4))


def test_bad_sampler_metadata_is_named(tmp_path):
    from moga.checkpoint import CheckpointError, load_model
    from moga.testing import write_tiny_checkpoint

    bad = write_tiny_checkpoint(tmp_path / "b.safetensors", metadata={"moga.sampler.schedule": "fancy"})
    with pytest.raises(CheckpointError, match="moga.sampler.schedule"):
        load_model(bad)


@pytest.mark.parametrize("kind", ["Wan2.1 I2V", "Wan2.2 TI2V"])
def test_patch_calibrates_image_models(tmp_path, kind):
    from moga.checkpoint import load_model, patch_checkpoint
    from moga.testing import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path / "src.safetensors", seed=3, **KINDS[kind])
    dst = tmp_path / "dst.safetensors"
    patch_checkpoint(src, dst, num_groups=3, calibration_size=(3, 4, 4), calibration_steps=2)
    model = load_model(dst)
    assert model.config.num_groups == 3 and model.config.conditioning == tiny_model(**KINDS[kind]).config.conditioning


def test_offload_moves_only_the_expert_whose_turn_it_is():
    class Fake:
        def __init__(self, where):
            self.config = tiny_model(num_layers=1).config
            self.where, self.moves = torch.device(where), []

        @property
        def device(self):
            return self.where

        def to(self, device):
            self.where = torch.device(device)
            self.moves.append(str(device))
            return self

    high, low = Fake("cuda:0"), Fake("cpu")
    pair = ExpertPair(high, low, offload=True, device="cuda:0")
    assert pair.expert_for(999.0) is high and (high.moves, low.moves, pair.switches) == ([], [], 0)
    assert pair.expert_for(870.0) is low
    assert (high.moves, low.moves, pair.switches) == (["cpu"], ["cuda:0"], 2)
    assert pair.expert_for(500.0) is low and pair.switches == 2   # no move while the same expert runs


def test_a_pair_folder_is_not_loaded_as_one_model(tmp_path):
    from moga.checkpoint import CheckpointError, inspect_checkpoint, load_model
    from moga.testing import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "a_high_noise.safetensors", seed=1)
    write_tiny_checkpoint(tmp_path / "a_low_noise.safetensors", seed=2)
    for fn in (load_model, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="expert pair"):
            fn(tmp_path)


def test_expert_loras_go_to_their_expert(tmp_path):
    from safetensors.torch import save_file

    from moga.checkpoint import load_experts, load_model
    from moga.testing import write_tiny_checkpoint

    hi = write_tiny_checkpoint(tmp_path / "x_high_noise.safetensors", seed=1)
    lo = write_tiny_checkpoint(tmp_path / "x_low_noise.safetensors", seed=2)
    delta = 0.1 * torch.randn(64)
    save_file({"diffusion_model.blocks.0.norm3.diff_b": delta}, str(tmp_path / "low_lora.safetensors"))
    lora = [(str(tmp_path / "low_lora.safetensors"), 1.0)]
    base_hi, base_lo = load_model(hi), load_model(lo)
    pair = load_experts(hi, lo, loras_low=lora)
    assert torch.equal(pair.high.blocks[0].norm3.bias, base_hi.blocks[0].norm3.bias)
    assert torch.allclose(pair.low.blocks[0].norm3.bias, base_lo.blocks[0].norm3.bias + delta, atol=1e-6)
    both = load_experts(tmp_path, loras=lora, loras_low=lora)
    assert torch.allclose(both.high.blocks[0].norm3.bias, base_hi.blocks[0].norm3.bias + delta, atol=1e-6)
