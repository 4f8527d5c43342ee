"""Each MoGA node's function on tiny random checkpoints and real tensors, without ComfyUI (tests/comfy_fakes.py
stands in for the few ComfyUI modules the nodes import)."""
import asyncio
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_fakes  # noqa: E402
from comfy_fakes import FakeClip, FakeVAE, FakeVAE22  # noqa: E402

from moga.checkpoint import load_model  # noqa: E402
from moga.sampling import sample  # noqa: E402
from moga.shots import ShotPlan  # noqa: E402
from moga.testing import write_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM = 32
CLIP_DIM = 24
SHOTS = "a cat walks [5]\na cat sleeps [9]\na cat walks [5]"   # 2 + 3 + 2 latent frames, one prompt twice


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    with comfy_fakes.installed(str(base), str(ROOT)) as env:
        models = Path(env.folder_paths.models_dir)
        for sub in ("diffusion_models", "moga", "loras"):
            (models / sub).mkdir(parents=True, exist_ok=True)
        write_tiny_checkpoint(models / "diffusion_models" / "tiny_moga.safetensors", layout="comfyui",
                              num_groups=4, text_dim=TEXT_DIM)
        write_tiny_checkpoint(models / "moga" / "tiny_wan.safetensors", layout="wan", num_groups=0,
                              text_dim=TEXT_DIM, seed=1)
        (models / "diffusion_models" / "old.ckpt").write_bytes(b"not loaded")
        dm = models / "diffusion_models"
        # a Wan2.2 A14B pair (two experts of one shape, different weights) and the two image-to-video kinds
        write_tiny_checkpoint(dm / "tiny_t2v_high_noise.safetensors", layout="comfyui", num_groups=4,
                              text_dim=TEXT_DIM, seed=21)
        write_tiny_checkpoint(dm / "tiny_t2v_low_noise.safetensors", layout="comfyui", num_groups=4,
                              text_dim=TEXT_DIM, seed=22)
        # a low-noise expert whose own routers differ from the high-noise one's: 2 groups, lse, another window
        write_tiny_checkpoint(dm / "tiny_t2v_g2_low_noise.safetensors", layout="comfyui", num_groups=2,
                              text_dim=TEXT_DIM, seed=27, fusion="lse", window="1,1,2")
        write_tiny_checkpoint(dm / "tiny_i2v_22.safetensors", layout="comfyui", num_groups=4, text_dim=TEXT_DIM,
                              seed=23, in_dim=36)
        write_tiny_checkpoint(dm / "tiny_i2v_high_noise.safetensors", layout="comfyui", num_groups=4,
                              text_dim=TEXT_DIM, seed=25, in_dim=36)   # a Wan2.2 I2V A14B pair
        write_tiny_checkpoint(dm / "tiny_i2v_low_noise.safetensors", layout="comfyui", num_groups=4,
                              text_dim=TEXT_DIM, seed=26, in_dim=36)
        write_tiny_checkpoint(dm / "tiny_i2v_21.safetensors", layout="comfyui", num_groups=4, text_dim=TEXT_DIM,
                              seed=24, in_dim=36, image_dim=CLIP_DIM)
        write_tiny_checkpoint(dm / "tiny_ti2v_5b.safetensors", layout="comfyui", num_groups=4, text_dim=TEXT_DIM,
                              seed=28, in_dim=48, out_dim=48)   # TI2V-5B: 48 channels in and out
        _write_loras(models / "loras")
        env.nodes.loader.CACHE.clear()
        yield env


def _write_loras(folder):
    """A kohya LoRA for the tiny models (width 64), one for a 5120-wide model, and a pickle."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(8)
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(64, 4, generator=g),
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 64, generator=g),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0),
               "diffusion_model.blocks.1.ffn.2.lora_B.weight": torch.randn(64, 2, generator=g),
               "diffusion_model.blocks.1.ffn.2.lora_A.weight": torch.randn(2, 128, generator=g)},
              str(folder / "style.safetensors"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(5120, 2, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 5120, generator=g)},
              str(folder / "wan14b.safetensors"))
    (folder / "old.pt").write_bytes(b"not loaded")


@pytest.fixture(autouse=True)
def clean_state(env):
    env.mm.state["interrupt"] = False
    env.utils.updates.clear()
    env.mm.calls.clear()
    yield
    env.mm.state["interrupt"] = False


def run(node, **kw):
    return node.execute(**kw).args


def load(env, name="tiny_moga.safetensors", dtype="default", backend="auto"):
    return run(env.nodes.MoGAModelLoader, ckpt_name=name, weight_dtype=dtype, attention_backend=backend)[0]


def shots(env, model=None, clip=None, text=SHOTS, **kw):
    return run(env.nodes.MoGAShotPrompts, shots=text, story=kw.pop("story", "home video"),
               negative=kw.pop("negative", "blurry"), default_seconds=kw.pop("default_seconds", 1.0),
               fps=kw.pop("fps", 16), clip=clip, model=model, **kw)[0]


SAMPLER = dict(width=32, height=32, steps=2, cfg=3.0, shift=5.0, solver="euler", seed=7, gpus="auto")


# ---- registration and schemas ---------------------------------------------------------------------------------
def test_entrypoint_lists_the_nodes(env):
    ext = asyncio.run(env.nodes.comfy_entrypoint())
    assert isinstance(ext, env.ComfyExtension)
    ids = [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())]
    assert ids == ["MoGAModelLoader", "MoGALora", "MoGAAttentionSettings", "MoGAShotPrompts", "MoGASampler",
                   "MoGADecode", "MoGARouterLoader", "MoGAPatchModel", "MoGAShotConditioning",
                   "MoGAEmptyMultiShotLatent"]


def test_every_widget_input_has_a_tooltip_and_options_match_the_library(env):
    from moga.attention.config import BACKENDS, FUSIONS
    from moga.sampling import SOLVERS
    for node in env.nodes.NODES:
        info = env.io.object_info(node)
        for kind in info["input"].values():
            for name, (t, opts) in kind.items():
                assert opts.get("tooltip"), f"{info['name']}.{name} has no tooltip"
    assert set(env.nodes.loader.ATTENTION_BACKENDS) <= set(BACKENDS)
    assert set(env.nodes.settings.FUSIONS) - {"checkpoint"} == set(FUSIONS)
    assert tuple(env.nodes.sampler.SOLVERS) == tuple(SOLVERS)


def test_pack_entry_imports_nothing_heavy(env):
    """The root __init__ inside (fake) ComfyUI: registers the nodes without loading models or kernels."""
    import importlib.util
    before = set(sys.modules)
    name = "comfyui_moga_entry_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        assert [n.__name__ for n in mod.NODES] == [n.__name__ for n in env.nodes.NODES]
        new = set(sys.modules) - before
        assert not {m for m in new if m.startswith(("moga.model", "moga.checkpoint", "moga.sampling"))}
    finally:
        for m in set(sys.modules) - before:
            if m.startswith(name):
                del sys.modules[m]


# ---- MoGA Model Loader ----------------------------------------------------------------------------------------
def test_loader_lists_safetensors_from_both_folders(env):
    names = env.nodes.loader.checkpoint_names()
    assert "tiny_moga.safetensors" in names and "tiny_wan.safetensors" in names
    assert "old.ckpt" not in names
    paths = env.folder_paths.folder_names_and_paths["moga"][0]
    assert any(p.endswith(str(Path("moga") / "demo")) for p in paths), paths


def test_loader_caches_by_file_and_dtype(env):
    cache = env.nodes.loader.CACHE
    cache.clear()
    loads = cache.loads
    a, b = load(env), load(env)
    assert a.model is b.model and cache.loads == loads + 1
    c = load(env, dtype="bf16")
    assert c.model is not a.model and cache.loads == loads + 2
    assert next(c.model.blocks[0].self_attn.q.parameters()).dtype == torch.bfloat16 and c.dtype == torch.bfloat16
    ref = load_model(a.path)
    for (k, p), q in zip(a.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k
    assert a.moga.num_groups == 4 and a.moga.backend == "auto"
    assert load(env, backend="sdpa").moga.backend == "sdpa"


def test_loader_messages_name_the_input(env):
    with pytest.raises(ValueError, match="ckpt_name.*not a .safetensors"):
        load(env, "old.ckpt")
    with pytest.raises(ValueError, match="ckpt_name.*neither"):
        load(env, "nope.safetensors")
    with pytest.raises(ValueError, match="weight_dtype"):
        load(env, dtype="fp4")
    with pytest.raises(ValueError, match="attention_backend"):
        load(env, backend="magic")


# ---- MoGA Attention Settings ----------------------------------------------------------------------------------
def test_settings_return_a_changed_copy(env):
    base = load(env)
    before = (base.moga, base.model.moga_config, base.dense_layers)
    out = run(env.nodes.MoGAAttentionSettings, model=base, num_groups=2, window_frames=1, window_rows=1,
              window_cols=2, context_frames=0, route_layers="1", fusion="lse", dense_warmup=0.25)[0]
    assert out is not base and out.model is base.model
    assert (base.moga, base.model.moga_config, base.dense_layers) == before
    assert out.moga.num_groups == 2 and out.moga.window == (1, 1, 2) and out.moga.context_frames == 0
    assert out.moga.fusion == "lse" and out.moga.backend == base.moga.backend
    assert out.dense_layers == (0,) and out.dense_warmup == 0.25
    keep = run(env.nodes.MoGAAttentionSettings, model=base, num_groups=0, route_layers="all", fusion="checkpoint")[0]
    assert keep.moga.fusion == base.model.moga_config.fusion and keep.dense_layers == ()
    assert keep.moga.num_groups == base.model.moga_config.num_groups == 4
    none = run(env.nodes.MoGAAttentionSettings, model=base, route_layers="none")[0]
    assert none.dense_layers == (0, 1)


def test_settings_messages_name_the_input(env):
    base = load(env)
    with pytest.raises(ValueError, match="num_groups.*moga patch --groups 8"):
        run(env.nodes.MoGAAttentionSettings, model=base, num_groups=8)
    with pytest.raises(ValueError, match="route_layers.*layer 5 does not exist"):
        run(env.nodes.MoGAAttentionSettings, model=base, route_layers="0,5")
    with pytest.raises(ValueError, match="route_layers"):
        run(env.nodes.MoGAAttentionSettings, model=base, route_layers="first two")
    with pytest.raises(ValueError, match="model"):
        run(env.nodes.MoGAAttentionSettings, model="not a model")


# ---- MoGA Shot Prompts ----------------------------------------------------------------------------------------
def test_shot_prompts_encode_each_distinct_prompt_once(env):
    clip = FakeClip(TEXT_DIM)
    out = shots(env, model=load(env), clip=clip)
    assert out.plan.shot_frames == (5, 9, 5) and out.plan.latent_shot_frames() == (2, 3, 2)
    assert out.encoder == "clip"
    assert sorted(clip.encoded) == sorted(["home video a cat walks", "home video a cat sleeps", "blurry"])
    assert len(out.positive) == 3 and out.positive[0] is out.positive[2]
    assert torch.equal(out.positive[1], FakeClip(TEXT_DIM).encode_from_tokens({"text": "home video a cat sleeps"}))
    assert out.negative.shape[-1] == TEXT_DIM


def test_shot_prompts_use_seconds_and_fps(env):
    out = shots(env, clip=FakeClip(TEXT_DIM), text="one\ntwo [0.5s]", default_seconds=1.0, fps=8)
    assert out.plan.shot_frames == (9, 5) and out.plan.fps == 8


def test_shot_prompts_use_the_models_own_encoder(env):
    class OwnEncoder:
        def __init__(self):
            self.calls = []

        def encode(self, texts):
            self.calls.append(list(texts))
            return [torch.full((1, 2, TEXT_DIM), float(len(t))) for t in texts]

    handle = load(env)
    own = OwnEncoder()
    with_own = handle.with_settings(model=_with_attr(handle.model, text_encoder=own))
    out = shots(env, model=with_own)
    assert out.encoder == "model" and len(own.calls) == 1 and len(own.calls[0]) == 3
    assert float(out.positive[1][0, 0, 0]) == len("home video a cat sleeps")


def _with_attr(model, **attrs):
    """The same model object seen through a proxy with extra attributes (the cached model stays as it is)."""
    class Proxy:
        def __getattr__(self, name):
            return attrs[name] if name in attrs else getattr(model, name)
    return Proxy()


def test_shot_prompts_messages_name_the_input(env):
    with pytest.raises(ValueError, match="'clip'.*no text encoder"):
        shots(env, model=load(env))
    with pytest.raises(ValueError, match="'clip'.*64-wide.*expects 32"):
        shots(env, model=load(env), clip=FakeClip(64))
    with pytest.raises(ValueError, match="'shots'.*line 2.*4n\\+1"):
        shots(env, clip=FakeClip(TEXT_DIM), text="ok [5]\nbad [6]")
    with pytest.raises(ValueError, match="'shots'.*empty"):
        shots(env, clip=FakeClip(TEXT_DIM), text="  \n")


# ---- MoGA Sampler ---------------------------------------------------------------------------------------------
def vae_space(latent):
    """What the MoGA Sampler hands on for a Wan model: the sampled latent in the VAE's space (the latent format's
    process_out, as core's samplers apply process_latent_out)."""
    return sys.modules["comfy.latent_formats"].Wan21().process_out(latent)


def test_sampler_latent_is_in_the_vae_space_and_decodes_as_core_would(env):
    """The DiT samples normalised latents; core's Wan VAE decodes raw ones. The sampler's LATENT must be raw, or
    MoGA Decode / core's VAE Decode with the host's VAE would decode (z - mean) / std (wrong colours)."""
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    lat = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga)
    fmt = sys.modules["comfy.latent_formats"].Wan21()
    assert torch.allclose(fmt.process_in(lat["samples"]), ref, atol=1e-5)
    assert not torch.allclose(lat["samples"], ref, atol=1e-2)  # the fake format's mean/std are far from 0/1
    vae = FakeVAE()
    images = run(env.nodes.MoGADecode, samples=lat, vae=vae)[0]
    assert torch.equal(images[:5], vae.decode(vae_space(ref)[:, :, :2])[0])


def test_sampler_is_the_library_call(env):
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    latent = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]
    assert latent["samples"].shape == (1, 16, 7, 4, 4)
    assert latent["moga_shot_frames"] == [2, 3, 2] and latent["moga_fps"] == 16.0
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga)
    assert torch.equal(latent["samples"], vae_space(ref))  # handed on in the VAE's space, as core's samplers do
    assert [u[:2] for u in env.utils.updates] == [(1, 2), (2, 2)]
    assert env.mm.calls == []  # CPU: no VRAM to free, ComfyUI's models stay loaded


def test_sampler_settings_reach_the_model(env):
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    dense = run(env.nodes.MoGAAttentionSettings, model=model, route_layers="none")[0]
    a = run(env.nodes.MoGASampler, model=dense, shots=sh, **SAMPLER)[0]["samples"]
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga.replace(dense=True))
    assert torch.allclose(a, vae_space(ref), atol=1e-5)
    b = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]["samples"]
    assert not torch.allclose(a, b, atol=1e-4)  # routing changes the result: the setting did something


def test_sampler_interrupt_stops_within_one_step_and_next_run_works(env):
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    calls, fire = [], [True]
    original = model.model.forward

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 3 and fire:  # second step, first model call: the user presses cancel
            fire.pop()
            env.mm.interrupt_current_processing()
        return original(*a, **k)

    model.model.forward = counting
    try:
        with pytest.raises(env.mm.InterruptProcessingException):
            run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, steps=10))
        assert len(calls) == 3          # stopped before the next model call
        assert not env.mm.processing_interrupted()  # the flag is consumed: the host is ready again
        calls.clear()
        latent = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]
        assert latent["samples"].shape == (1, 16, 7, 4, 4) and len(calls) == 4
    finally:
        del model.model.forward


def test_sampler_messages_name_the_input(env):
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    with pytest.raises(ValueError, match="'width'.*multiple of 16"):
        run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, width=40))
    with pytest.raises(ValueError, match="'gpus'.*2 GPUs asked but 0 visible"):
        run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, gpus="2"))
    with pytest.raises(ValueError, match="'shots'"):
        run(env.nodes.MoGASampler, model=model, shots="a cat", **SAMPLER)
    with pytest.raises(ValueError, match="'solver'"):
        run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, solver="ddim"))


def test_parse_gpus(env):
    parse = env.nodes.sampler.parse_gpus
    assert parse("auto", 0) == [] and parse("auto", 4) == [0, 1, 2, 3]
    assert parse("2", 4) == [0, 1] and parse("0,2", 4) == [0, 2] and parse("3,", 4) == [3]
    for bad in ("5", "0,4", "0,0", "two", "0", "-1,"):
        with pytest.raises(ValueError, match="'gpus'"):
            parse(bad, 4)


# ---- MoGA Decode ----------------------------------------------------------------------------------------------
def _latent(frames=(2, 3, 2), seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(1, 16, sum(frames), 4, 4, generator=g), "moga_shot_frames": list(frames),
            "moga_fps": 12.0}


def test_decode_shot_by_shot_with_the_host_vae(env):
    vae, lat = FakeVAE(), _latent()
    images, fps = run(env.nodes.MoGADecode, samples=lat, vae=vae)
    assert vae.calls == [(1, 16, 2, 4, 4), (1, 16, 3, 4, 4), (1, 16, 2, 4, 4)]  # one call per shot
    assert images.shape == (5 + 9 + 5, 32, 32, 3) and fps == 12.0
    assert 0 <= images.min() and images.max() <= 1
    # each shot decoded alone: the frames equal a decode of that shot's slice
    assert torch.equal(images[5:14], FakeVAE().decode(lat["samples"][:, :, 2:5])[0])
    assert [u[:2] for u in env.utils.updates] == [(1, 3), (2, 3), (3, 3)]


def test_decode_with_the_models_own_decoder(env):
    class OwnVAE:
        def decode(self, z):  # [B, C, F, H, W] -> [B, 3, 4(F-1)+1, 8H, 8W] in -1..1
            b, c, f, h, w = z.shape
            x = torch.tanh(z[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
            return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, 2)], 2)

    handle = load(env)
    own = handle.with_settings(model=_with_attr(handle.model, vae=OwnVAE()))
    lat = _latent()
    images, fps = run(env.nodes.MoGADecode, samples=lat, model=own)
    assert images.shape == (19, 32, 32, 3)
    z = lat["samples"][0, :3, 0, 0, 0]
    assert torch.allclose(images[0, 0, 0], (torch.tanh(z) + 1) / 2)


def test_decode_messages_name_the_input(env):
    with pytest.raises(ValueError, match="'vae'.*no decoder"):
        run(env.nodes.MoGADecode, samples=_latent())
    bad = _latent()
    bad["moga_shot_frames"] = [2, 2]
    with pytest.raises(ValueError, match="'samples'.*do not add up"):
        run(env.nodes.MoGADecode, samples=bad, vae=FakeVAE())
    with pytest.raises(ValueError, match="'samples'"):
        run(env.nodes.MoGADecode, samples={"samples": torch.zeros(1, 16, 4, 4)}, vae=FakeVAE())


def test_decode_interrupt_between_shots(env):
    env.mm.interrupt_current_processing()
    with pytest.raises(env.mm.InterruptProcessingException):
        run(env.nodes.MoGADecode, samples=_latent(), vae=FakeVAE())


# ---- the whole chain ------------------------------------------------------------------------------------------
def test_chain_gives_the_planned_frame_count(env):
    model = run(env.nodes.MoGAAttentionSettings, model=load(env), num_groups=3)[0]
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    latent = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]
    images, fps = run(env.nodes.MoGADecode, samples=latent, vae=FakeVAE())
    assert images.shape[0] == sh.plan.total_frames == ShotPlan.parse_text(SHOTS).total_frames
    assert fps == 16.0


@pytest.mark.slow
def test_sampler_with_two_devices_drives_the_worker_pool(env, monkeypatch):
    """gpus='2' goes through moga.parallel's persistent workers (two CPU ranks over gloo stand in for GPUs) and
    gives the single-process result."""
    from moga.parallel.pool import release_pool
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    single = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]["samples"]
    monkeypatch.setattr(env.nodes.sampler, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(env.nodes.sampler, "_pool_devices", lambda ids: ["cpu"] * len(ids))
    env.utils.updates.clear()
    try:
        pooled = run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, gpus="2"))[0]
    finally:
        release_pool()
    assert pooled["moga_shot_frames"] == [2, 3, 2]
    assert torch.allclose(pooled["samples"], single, atol=1e-5), (pooled["samples"] - single).abs().max()
    assert [u[:2] for u in env.utils.updates] == [(1, 2), (2, 2)]


# ---- LoRAs: MoGA LoRA -> MoGA Model Loader ---------------------------------------------------------------------
def test_lora_nodes_chain_and_the_loader_merges_them(env):
    names = env.io.object_info(env.nodes.MoGALora)["input"]["required"]["lora_name"][1]["options"]
    assert names == ["style.safetensors", "wan14b.safetensors"], "pickles are not listed"
    folder = Path(env.folder_paths.models_dir) / "loras"
    first = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.5)[0]
    chain = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.25, loras=first)[0]
    style = str(folder / "style.safetensors")
    assert chain == ((style, 0.5, "both"), (style, 0.25, "both"))  # no 'experts' given: both
    handle = run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
                 attention_backend="auto", loras=chain)[0]
    files = [(f, s) for f, s, _ in chain]
    ref = load_model(handle.path, loras=files)
    assert handle.loras == chain and handle.model.loras == files
    for (k, p), q in zip(handle.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k
    plain = load(env)
    assert plain.model is not handle.model and plain.loras == ()
    assert not torch.equal(plain.model.blocks[0].self_attn.q.weight, handle.model.blocks[0].self_attn.q.weight)


def test_lora_node_and_loader_errors_name_the_input(env):
    with pytest.raises(ValueError, match="MoGA LoRA: input 'lora_name'.*not a .safetensors"):
        run(env.nodes.MoGALora, lora_name="old.pt", strength=1.0)
    with pytest.raises(ValueError, match="input 'lora_name'.*not in models/loras"):
        run(env.nodes.MoGALora, lora_name="nope.safetensors", strength=1.0)
    with pytest.raises(ValueError, match="input 'strength'.*not a number"):
        run(env.nodes.MoGALora, lora_name="style.safetensors", strength=float("nan"))
    wide = run(env.nodes.MoGALora, lora_name="wan14b.safetensors", strength=1.0)[0]
    with pytest.raises(ValueError, match="MoGA Model Loader: input 'loras'.*Wan 14B"):
        run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
            attention_backend="auto", loras=wide)


@pytest.mark.slow
def test_pooled_sampler_uses_the_same_loras(env, monkeypatch):
    """The workers merge the handle's LoRAs: 2 gloo ranks give the in-process result of the LoRA'd model."""
    from moga.parallel.pool import release_pool
    chain = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.8)[0]
    model = run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
                attention_backend="auto", loras=chain)[0]
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    single = run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)[0]["samples"]
    base = run(env.nodes.MoGASampler, model=load(env), shots=sh, **SAMPLER)[0]["samples"]
    monkeypatch.setattr(env.nodes.sampler, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(env.nodes.sampler, "_pool_devices", lambda ids: ["cpu"] * len(ids))
    try:
        pooled = run(env.nodes.MoGASampler, model=model, shots=sh, **dict(SAMPLER, gpus="2"))[0]["samples"]
    finally:
        release_pool()
    assert torch.allclose(pooled, single, atol=1e-5), (pooled - single).abs().max()
    assert not torch.allclose(base, single, atol=1e-3)


# ---- the patch path's nodes (MoGA Router Loader, MoGA Patch Model, Empty Multi-Shot Latent) ---------------------------
def test_router_loader_reads_a_checkpoints_routers_and_names_a_plain_file(env):
    patch = env.nodes.patch
    rs = patch.MoGARouterLoader.execute("tiny_moga.safetensors").result[0]
    assert rs.layers == (0, 1) and rs.num_groups == 4 and rs.kind == "checkpoint"
    assert patch.MoGARouterLoader.execute("tiny_moga.safetensors").result[0] is rs  # cached by file identity
    with pytest.raises(ValueError, match="MoGA Router Loader.*routers_name.*no MoGA routers.*--routers-out"):
        patch.MoGARouterLoader.execute("tiny_wan.safetensors")


def test_patch_node_names_bad_inputs(env):
    patch = env.nodes.patch
    with pytest.raises(ValueError, match="MoGA Patch Model.*routers.*MoGA Router Loader"):
        patch.MoGAPatchModel.execute(model=object(), routers="not routers")
    assert patch.parse_layers("all", 4) is None and patch.parse_layers("0-1,3", 4) == (0, 1, 3)
    with pytest.raises(ValueError, match="routed_layers.*layer 7 does not exist"):
        patch.parse_layers("7", 4)
    with pytest.raises(ValueError, match="routed_layers.*not a list"):
        patch.parse_layers("x", 4)
    assert patch.parse_shots("") is None and patch.parse_shots("5, 3") == [5, 3]
    with pytest.raises(ValueError, match="shot_frames.*latent frame counts"):
        patch.parse_shots("5,0")


def test_empty_multi_shot_latent_has_the_shots_length(env):
    from moga.shots import ShotPlan
    plan = ShotPlan.parse_text("a [17]\nb [5]\nc [9]", fps=16)
    shots = env.nodes.common.MoGAShotsValue(plan=plan, positive=[], negative=None, encoder="clip")
    node = env.nodes.patch_shots.EmptyMultiShotLatent
    out = node.execute(shots, width=64, height=48, batch_size=2).result[0]
    assert out["samples"].shape == (2, 16, 5 + 2 + 3, 6, 8) and not out["samples"].any()
    assert out[env.nodes.common.LATENT_SHOT_FRAMES] == [5, 2, 3]
    five = node.execute(shots, width=64, height=48, latent_format="wan2.2 TI2V-5B (48 ch, /16)").result[0]
    assert five["samples"].shape == (1, 48, 10, 3, 4)
    with pytest.raises(ValueError, match="Empty Multi-Shot Latent.*not a multiple of 16"):
        node.execute(shots, width=40, height=48, latent_format="wan2.2 TI2V-5B (48 ch, /16)")


def test_sampler_refuses_a_run_that_cannot_fit_before_any_step(env, monkeypatch):
    import moga.preflight
    model = load(env)
    calls = []
    original = model.model.forward
    model.model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        long = shots(env, model=model, clip=FakeClip(TEXT_DIM), text="a cat walks [1601]\nit sits [1601]\nit runs [1601]")
        with pytest.raises(ValueError, match=r"MoGA Sampler: the video has 1,203 latent frames.*iB.*Fix:"):
            run(env.nodes.MoGASampler, model=model, shots=long, **SAMPLER)
        sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
        monkeypatch.setattr(moga.preflight, "available_bytes", lambda device: 0)
        with pytest.raises(ValueError, match=r"MoGA Sampler: this run needs about .* in RAM.*free\. Fix: "):
            run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)
        assert calls == [] and env.utils.updates == []  # refused before any model call
    finally:
        del model.model.forward


def test_sampler_moves_block_by_block_when_steps_are_long(env, monkeypatch):
    import moga.preflight
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    monkeypatch.setattr(moga.preflight, "CALL_SECONDS_FOR_BLOCK_PROGRESS", 0.0)  # every step counts as long
    nb = len(model.model.blocks)
    run(env.nodes.MoGASampler, model=model, shots=sh, **SAMPLER)  # 2 steps, cfg 3: two calls a step on a CPU
    blocks = [(s, n) for s, n, _ in env.utils.updates]
    expected = []
    for step in (1, 2):  # nb ticks a step: one per two blocks done (cond + uncond), then the step's own
        expected += [((step - 1) * nb + -(-d * nb // (2 * nb)), 2 * nb) for d in range(1, 2 * nb + 1)]
        expected.append((step * nb, 2 * nb))
    assert blocks == expected


# ---- Wan2.2 A14B pairs, the distill schedule, image-to-video ------------------------------------------------------
def load_pair(env, loras=None, **kw):
    return run(env.nodes.MoGAModelLoader, ckpt_name="tiny_t2v_high_noise.safetensors", weight_dtype="default",
               attention_backend="auto", loras=loras, low_noise_model="tiny_t2v_low_noise.safetensors", **kw)[0]


def test_loader_loads_an_expert_pair_with_the_loras_on_both(env):
    from moga.checkpoint import load_experts
    from moga.experts import BOUNDARY_T2V, ExpertPair
    dm = Path(env.folder_paths.models_dir) / "diffusion_models"
    low = env.io.object_info(env.nodes.MoGAModelLoader)["input"]["optional"]["low_noise_model"]
    assert "tiny_t2v_low_noise.safetensors" in low[1]["options"] and low[1]["default"] == "none"
    style = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.7)[0]
    pair = load_pair(env, loras=style)
    assert isinstance(pair.model, ExpertPair) and pair.model.boundary == BOUNDARY_T2V and not pair.model.offload
    ref = load_experts(dm / "tiny_t2v_high_noise.safetensors", dm / "tiny_t2v_low_noise.safetensors",
                       loras=[style[0][:2]], loras_low=[style[0][:2]])
    for got, want in ((pair.model.high, ref.high), (pair.model.low, ref.low)):
        for (k, p), q in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(p, q), k
    plain = load_experts(dm / "tiny_t2v_high_noise.safetensors", dm / "tiny_t2v_low_noise.safetensors")
    key = "blocks.0.self_attn.q.weight"
    assert not torch.equal(pair.model.low.state_dict()[key], plain.low.state_dict()[key])  # the LoRA reached low
    other = load_pair(env, boundary=0.5, offload_expert=True)
    assert other.model is not pair.model and other.model.boundary == 0.5 and other.model.offload


def test_sampler_runs_an_expert_pair_as_the_library_does(env):
    from moga.checkpoint import load_experts
    dm = Path(env.folder_paths.models_dir) / "diffusion_models"
    pair = load_pair(env, boundary=0.95)  # steps at t = 1000 (high) and 833 (low)
    sh = shots(env, model=pair, clip=FakeClip(TEXT_DIM))
    got = run(env.nodes.MoGASampler, model=pair, shots=sh, **SAMPLER)[0]["samples"]
    ref_pair = load_experts(dm / "tiny_t2v_high_noise.safetensors", dm / "tiny_t2v_low_noise.safetensors",
                            boundary=0.95)
    ref = sample(ref_pair, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2, cfg=3.0,
                 shift=5.0, solver="euler", seed=7, moga=pair.moga)
    assert torch.equal(got, vae_space(ref))
    high_only = sample(ref_pair.high, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4),
                       steps=2, cfg=3.0, shift=5.0, solver="euler", seed=7, moga=pair.moga)
    assert not torch.allclose(got, vae_space(high_only), atol=1e-4)  # the low expert ran its steps
    dense = run(env.nodes.MoGAAttentionSettings, model=pair, route_layers="none")[0]   # settings reach both experts
    got_dense = run(env.nodes.MoGASampler, model=dense, shots=sh, **SAMPLER)[0]["samples"]
    ref_dense = sample(ref_pair, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                       cfg=3.0, shift=5.0, solver="euler", seed=7, moga=pair.moga.replace(dense=True))
    assert torch.allclose(got_dense, vae_space(ref_dense), atol=1e-5) and not torch.allclose(got_dense, got, atol=1e-4)


def test_loader_pair_errors_name_the_input(env):
    with pytest.raises(ValueError, match="low_noise_model.*same file"):
        run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
            attention_backend="auto", low_noise_model="tiny_moga.safetensors")
    with pytest.raises(ValueError, match="low_noise_model.*neither"):
        run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
            attention_backend="auto", low_noise_model="gone.safetensors")
    with pytest.raises(ValueError, match="low_noise_model.*Wan2.2 A14B pair.*differ in shape"):
        run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
            attention_backend="auto", low_noise_model="tiny_i2v_22.safetensors")


def test_sampler_distill_schedule_is_the_library_call(env):
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    kw = dict(SAMPLER, cfg=1.0)
    got = run(env.nodes.MoGASampler, model=model, shots=sh, schedule="distill", **kw)[0]["samples"]
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=1.0, shift=5.0, solver="euler", seed=7, moga=model.moga, schedule="distill")
    assert torch.equal(got, vae_space(ref))
    wan = run(env.nodes.MoGASampler, model=model, shots=sh, **kw)[0]["samples"]
    assert not torch.allclose(got, wan, atol=1e-4)
    with pytest.raises(ValueError, match="schedule.*unknown"):
        run(env.nodes.MoGASampler, model=model, shots=sh, schedule="lcm", **kw)


def _image(seed, h=48, w=40):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _capture_image(env, monkeypatch, **kw):
    """Run the sampler, returning (latent, the ImageCondition it gave moga.sampling.sample)."""
    import moga.sampling
    seen = {}
    real = moga.sampling.sample

    def spy(*a, **k):
        seen["image"] = k.get("image")
        return real(*a, **k)
    monkeypatch.setattr(moga.sampling, "sample", spy)
    latent = run(env.nodes.MoGASampler, **kw)[0]["samples"]
    return latent, seen["image"]


def test_sampler_encodes_the_start_image_of_shot_one(env, monkeypatch):
    model = load(env, "tiny_i2v_22.safetensors")
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    vae, img = FakeVAE(), _image(5)
    latent, cond = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=img, vae=vae, **SAMPLER)
    assert cond.kind == "concat" and cond.y.shape == (1, 20, 7, 4, 4)
    mask = cond.y[:, :4]
    assert torch.equal(mask[:, :, 0], torch.ones(1, 4, 4, 4)) and mask[:, :, 1:].abs().sum() == 0
    # shot 1 (5 pixel frames): the host VAE encodes [image resized to 32x32, 4 grey frames], core's Wan21 format
    # normalises it; the other shots hold the encoded grey clip of their length
    fmt = sys.modules["comfy.latent_formats"].Wan21()
    first = torch.nn.functional.interpolate(img.movedim(-1, 1), size=(32, 32), mode="bilinear",
                                            align_corners=False)[0].movedim(0, -1)
    clip1 = torch.full((5, 32, 32, 3), 0.5)
    clip1[0] = first
    want1 = fmt.process_in(FakeVAE().encode(clip1))
    assert torch.allclose(cond.y[:, 4:, :2], want1, atol=1e-6)
    grey9 = fmt.process_in(FakeVAE().encode(torch.full((9, 32, 32, 3), 0.5)))
    assert torch.allclose(cond.y[:, 4:, 2:5], grey9, atol=1e-6)
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga, image=cond)
    assert torch.equal(latent, vae_space(ref))
    other, _ = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=_image(6), vae=vae, **SAMPLER)
    assert not torch.allclose(latent, other, atol=1e-4)  # the image steers the video


def test_sampler_start_images_for_later_shots(env, monkeypatch):
    """A batch of two images with start_image_shots '1,3': image 2 starts shot 3 (a character sheet for a later
    shot), as the library's image_condition builds it from the same pixels; CLIP per image on Wan2.1 I2V."""
    import types

    from moga.conditioning import image_condition
    from moga.wan_image_io import encode_start_images

    model = load(env, "tiny_i2v_22.safetensors")
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    batch = torch.cat([_image(5), _image(8)])
    _, cond = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=batch, vae=FakeVAE(),
                             start_image_shots="1, 3", **SAMPLER)
    mask = cond.y[:, :4]
    assert torch.equal(mask[:, :, 0], torch.ones(1, 4, 4, 4)) and torch.equal(mask[:, :, 5], torch.ones(1, 4, 4, 4))
    assert mask[:, :, 1:5].abs().sum() == 0 and mask[:, :, 6:].abs().sum() == 0
    sampler_module = sys.modules[env.nodes.MoGASampler.__module__]
    pixels = torch.nn.functional.interpolate(batch.movedim(-1, 1), size=(32, 32), mode="bilinear",
                                             align_corners=False) * 2 - 1
    latents, fill = encode_start_images(sampler_module._host_vae_encoder(FakeVAE()), model.model.config,
                                        sh.plan.shot_frames, {0: pixels[0], 2: pixels[1]})
    want = image_condition(model.model.config, sh.plan.latent_shot_frames(), (7, 4, 4), latents, fill=fill)
    assert torch.allclose(cond.y, want.y, atol=1e-6)
    _, one = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=batch[:1], vae=FakeVAE(), **SAMPLER)
    assert not torch.allclose(cond.y[:, 4:, 5:], one.y[:, 4:, 5:], atol=1e-4)  # shot 3 now starts from image 2

    i2v21 = load(env, "tiny_i2v_21.safetensors")
    sh21 = shots(env, model=i2v21, clip=FakeClip(TEXT_DIM))
    tokens = torch.randn(2, 257, CLIP_DIM, generator=torch.Generator().manual_seed(4))
    out = types.SimpleNamespace(penultimate_hidden_states=tokens)
    _, cond = _capture_image(env, monkeypatch, model=i2v21, shots=sh21, start_image=batch, vae=FakeVAE(),
                             clip_vision_output=out, start_image_shots="1,3", **SAMPLER)
    assert [torch.equal(c, tokens[j:j + 1]) for c, j in zip(cond.clip, (0, 0, 1))] == [True] * 3

    for text, match in (("1", "1 shots.*2 start images"), ("1,4", "shots \\[4\\] are not in the plan"),
                        ("3,3", "names a shot twice"), ("one", "not a list of shot numbers")):
        with pytest.raises(ValueError, match="start_image_shots.*" + match):
            run(env.nodes.MoGASampler, model=model, shots=sh, start_image=batch, vae=FakeVAE(),
                start_image_shots=text, **SAMPLER)


def test_sampler_passes_clip_vision_to_wan21_i2v(env, monkeypatch):
    import types
    model = load(env, "tiny_i2v_21.safetensors")
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    tokens = torch.randn(1, 257, CLIP_DIM, generator=torch.Generator().manual_seed(4))
    out = types.SimpleNamespace(penultimate_hidden_states=tokens)
    _, cond = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=_image(5), vae=FakeVAE(),
                             clip_vision_output=out, **SAMPLER)
    assert cond.kind == "clip+concat" and len(cond.clip) == 3 and all(torch.equal(c, tokens) for c in cond.clip)
    with pytest.raises(ValueError, match="clip_vision_output.*CLIP"):
        run(env.nodes.MoGASampler, model=model, shots=sh, start_image=_image(5), vae=FakeVAE(), **SAMPLER)


def test_sampler_image_errors_name_the_input(env):
    i2v = load(env, "tiny_i2v_22.safetensors")
    sh = shots(env, model=i2v, clip=FakeClip(TEXT_DIM))
    with pytest.raises(ValueError, match="start_image.*image-to-video.*no start image"):
        run(env.nodes.MoGASampler, model=i2v, shots=sh, **SAMPLER)
    with pytest.raises(ValueError, match="'vae'.*needs a VAE"):
        run(env.nodes.MoGASampler, model=i2v, shots=sh, start_image=_image(1), **SAMPLER)
    with pytest.raises(ValueError, match="clip_vision_output.*no CLIP image branch"):
        run(env.nodes.MoGASampler, model=i2v, shots=sh, start_image=_image(1), vae=FakeVAE(),
            clip_vision_output=object(), **SAMPLER)
    t2v = load(env)
    with pytest.raises(ValueError, match="start_image.*text-to-video"):
        run(env.nodes.MoGASampler, model=t2v, shots=sh, start_image=_image(1), vae=FakeVAE(), **SAMPLER)


def _pooled(env, **kw):
    """The sampler's LATENT samples with gpus='2' on two CPU workers (gloo), standing in for two GPUs."""
    from moga.parallel.pool import release_pool
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(env.nodes.sampler, "_visible_gpus", lambda: 2)
        mp.setattr(env.nodes.sampler, "_pool_devices", lambda ids: ["cpu"] * len(ids))
        try:
            return run(env.nodes.MoGASampler, **dict(kw, gpus="2"))[0]["samples"]
        finally:
            release_pool()


@pytest.mark.slow
def test_pooled_sampler_runs_an_i2v_pair_with_its_start_image_and_cfg_low(env):
    """A Wan2.2 I2V A14B pair with a LoRA on both experts, a start image (encoded by the host's VAE in this process,
    the workers get its tensors) and the low expert's own guidance: 2 workers give the one-process latent."""
    style = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.6)[0]
    pair = run(env.nodes.MoGAModelLoader, ckpt_name="tiny_i2v_high_noise.safetensors", weight_dtype="default",
               attention_backend="auto", loras=style, low_noise_model="tiny_i2v_low_noise.safetensors",
               boundary=0.95)[0]   # steps at t = 1000 (high) and 833 (low)
    sh = shots(env, model=pair, clip=FakeClip(TEXT_DIM))
    kw = dict(SAMPLER, model=pair, shots=sh, start_image=_image(3), vae=FakeVAE(), cfg_low=2.0)
    single = run(env.nodes.MoGASampler, **kw)[0]["samples"]
    env.utils.updates.clear()
    pooled = _pooled(env, **kw)
    assert torch.allclose(pooled, single, atol=1e-5), (pooled - single).abs().max()
    assert [u[:2] for u in env.utils.updates] == [(1, 2), (2, 2)]
    same_cfg = run(env.nodes.MoGASampler, **dict(kw, cfg_low=-1.0))[0]["samples"]
    assert not torch.allclose(same_cfg, single, atol=1e-4), "cfg_low reaches the low expert's step"


def test_sampler_cfg_low_is_the_low_experts_guidance(env):
    pair = load_pair(env, boundary=0.95)
    sh = shots(env, model=pair, clip=FakeClip(TEXT_DIM))
    got = run(env.nodes.MoGASampler, model=pair, shots=sh, cfg_low=1.5, **SAMPLER)[0]["samples"]
    ref = sample(pair.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=(3.0, 1.5), shift=5.0, solver="euler", seed=7, moga=pair.moga)
    assert torch.equal(got, vae_space(ref))
    assert "cfg_low" in env.io.object_info(env.nodes.MoGASampler)["input"]["optional"]
    with pytest.raises(ValueError, match="'cfg_low'.*below 1.*Fix: use -1"):
        run(env.nodes.MoGASampler, model=pair, shots=sh, cfg_low=0.5, **SAMPLER)
    one = load(env)
    with pytest.raises(ValueError, match="'cfg_low'.*low-noise expert's guidance but .* is one model"):
        run(env.nodes.MoGASampler, model=one, shots=shots(env, model=one, clip=FakeClip(TEXT_DIM)), cfg_low=2.0,
            **SAMPLER)


def test_pooled_sampler_refuses_a_model_its_workers_cannot_load(env):
    """The workers load the model from its files: a model that was not read from one is refused, naming the fix,
    before any worker starts."""
    t2v = load(env)
    built = t2v.with_settings(model=_with_attr(t2v.model, source_path=None))
    with pytest.raises(ValueError, match="'gpus'.*not loaded from a file.*Fix: use one GPU"):
        _pooled(env, model=built, shots=shots(env, model=t2v, clip=FakeClip(TEXT_DIM)), **SAMPLER)


@pytest.mark.slow
def test_pooled_sampler_runs_the_distill_schedule(env, monkeypatch):
    """schedule reaches the workers: 2 gloo ranks give the in-process distill result (not the wan one)."""
    from moga.parallel.pool import release_pool
    model = load(env)
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    kw = dict(SAMPLER, cfg=1.0, schedule="distill")
    single = run(env.nodes.MoGASampler, model=model, shots=sh, **kw)[0]["samples"]
    wan = run(env.nodes.MoGASampler, model=model, shots=sh, **dict(kw, schedule="wan"))[0]["samples"]
    monkeypatch.setattr(env.nodes.sampler, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(env.nodes.sampler, "_pool_devices", lambda ids: ["cpu"] * len(ids))
    try:
        pooled = run(env.nodes.MoGASampler, model=model, shots=sh, **dict(kw, gpus="2"))[0]["samples"]
    finally:
        release_pool()
    assert torch.allclose(pooled, single, atol=1e-5), (pooled - single).abs().max()
    assert not torch.allclose(wan, single, atol=1e-4)


# ---- Wan2.2 A14B: each expert's own MoGA config, a LoRA per expert -----------------------------------------------
MIXED_LOW = "tiny_t2v_g2_low_noise.safetensors"   # 2 groups, lse, window (1, 1, 2); the high expert: 4, mean, (0, 2, 2)


def load_mixed(env, loras=None, **kw):
    return run(env.nodes.MoGAModelLoader, ckpt_name="tiny_t2v_high_noise.safetensors", weight_dtype="default",
               attention_backend="auto", loras=loras, low_noise_model=MIXED_LOW, boundary=0.95, **kw)[0]


def _experts_files(env, low=MIXED_LOW):
    dm = Path(env.folder_paths.models_dir) / "diffusion_models"
    return dm / "tiny_t2v_high_noise.safetensors", dm / low


def test_a_pair_with_different_router_groups_samples_as_the_library_does(env):
    """Each expert runs its own routers' settings: the node's latent is the library's ExpertPair run with each
    expert's own config (steps at t = 1000 high, 833 low); the high expert's config cannot run the low one."""
    from moga.checkpoint import load_experts
    pair = load_mixed(env)
    assert (pair.moga.num_groups, pair.moga.fusion, pair.moga.window) == (4, "mean", (0, 2, 2))
    assert (pair.moga_low.num_groups, pair.moga_low.fusion, pair.moga_low.window) == (2, "lse", (1, 1, 2))
    sh = shots(env, model=pair, clip=FakeClip(TEXT_DIM))
    got = run(env.nodes.MoGASampler, model=pair, shots=sh, **SAMPLER)[0]["samples"]
    ref_pair = load_experts(*_experts_files(env), boundary=0.95)
    kw = dict(shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2, cfg=3.0, shift=5.0, solver="euler", seed=7)
    assert torch.equal(got, vae_space(sample(ref_pair, sh.positive, sh.negative, **kw)))
    with pytest.raises(ValueError, match="num_groups <= 2"):  # what the node did before: high's config on both
        sample(ref_pair, sh.positive, sh.negative, moga=pair.moga, **kw)
    # Attention Settings: what is set applies to both experts, fusion 'checkpoint' keeps each expert's own
    two = run(env.nodes.MoGAAttentionSettings, model=pair, num_groups=2, window_frames=1, window_rows=2,
              window_cols=1)[0]
    assert (two.moga.num_groups, two.moga.fusion) == (2, "mean") and (two.moga_low.num_groups, two.moga_low.fusion) \
        == (2, "lse") and two.moga.window == two.moga_low.window == (1, 2, 1)
    got_two = run(env.nodes.MoGASampler, model=two, shots=sh, **SAMPLER)[0]["samples"]
    want_two = sample(ref_pair, sh.positive, sh.negative, **kw,
                      moga=(ref_pair.high.moga_config.replace(num_groups=2, window=(1, 2, 1)),
                            ref_pair.low.moga_config.replace(window=(1, 2, 1))))
    assert torch.equal(got_two, vae_space(want_two)) and not torch.allclose(got_two, got, atol=1e-4)
    own = run(env.nodes.MoGAAttentionSettings, model=pair, num_groups=0, fusion="mean", capacity=0.5)[0]
    assert (own.moga.num_groups, own.moga_low.num_groups) == (4, 2)
    assert own.moga_low.fusion == "mean" and own.moga.capacity == own.moga_low.capacity == 0.5
    with pytest.raises(ValueError, match=r"MoGA Attention Settings: input 'num_groups': 3 groups but the routers of "
                                         r"the low-noise expert \(tiny_t2v_g2_low_noise.safetensors\) have 2\. "
                                         r"Fix: use 0 \(each expert's own group count\) or at most 2"):
        run(env.nodes.MoGAAttentionSettings, model=pair, num_groups=3)
    with pytest.raises(ValueError, match=r"5 groups but the routers of the high-noise expert .* have 4"):
        run(env.nodes.MoGAAttentionSettings, model=pair, num_groups=5)


def test_a_lora_on_one_expert_changes_only_that_experts_weights(env):
    from safetensors.torch import load_file

    from moga.checkpoint import load_experts
    from moga.parallel.pool_model import settings_of
    style = str(Path(env.folder_paths.models_dir) / "loras" / "style.safetensors")
    low_only = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.7, experts="low_noise")[0]
    assert low_only == ((style, 0.7, "low_noise"),)
    pair = load_pair(env, loras=low_only)
    high_file, low_file = _experts_files(env, "tiny_t2v_low_noise.safetensors")
    plain = load_experts(high_file, low_file)
    for (k, p), q in zip(pair.model.high.state_dict().items(), plain.high.state_dict().values()):
        assert torch.equal(p, q), f"the high-noise expert changed at {k}"
    # the low expert: W + s * alpha / rank * up @ down where the LoRA has a tensor, untouched elsewhere
    lora = {k: v.double() for k, v in load_file(style).items()}
    q, ffn = "blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight"
    want_q = plain.low.state_dict()[q].double() + 0.7 * (2.0 / 4) * (
        lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"] @ lora["lora_unet_blocks_0_self_attn_q.lora_down.weight"])
    got_low = pair.model.low.state_dict()
    assert torch.allclose(got_low[q].double(), want_q, atol=1e-5) and not torch.equal(got_low[q], plain.low.state_dict()[q])
    assert not torch.equal(got_low[ffn], plain.low.state_dict()[ffn])
    for k, p in plain.low.state_dict().items():
        if k not in (q, ffn):
            assert torch.equal(got_low[k], p), k
    # the workers load the same: no LoRA on the high expert, the one on the low expert
    assert settings_of(pair.model)[1]["loras"] == () and settings_of(pair.model)[1]["loras_low"] == ((style, 0.7),)
    # chained: one file for each expert (as Wan2.2 distill LoRAs come) -> each expert's own list, a new model
    chain = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=-0.4, loras=low_only,
                experts="high_noise")[0]
    both = load_pair(env, loras=chain)
    assert both.model is not pair.model
    _, settings = settings_of(both.model)
    assert settings["loras"] == ((style, -0.4),) and settings["loras_low"] == ((style, 0.7),)
    assert torch.equal(both.model.low.state_dict()[q], got_low[q])
    assert torch.allclose(both.model.high.state_dict()[q].double(), plain.high.state_dict()[q].double() - 0.4 * 0.5 * (
        lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"] @ lora["lora_unet_blocks_0_self_attn_q.lora_down.weight"]),
        atol=1e-5)


def test_per_expert_lora_errors_name_the_input_and_the_expert(env):
    with pytest.raises(ValueError, match="MoGA LoRA: input 'experts': unknown choice 'middle'.*Fix: pick one of both"):
        run(env.nodes.MoGALora, lora_name="style.safetensors", strength=1.0, experts="middle")
    low_only = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=1.0, experts="low_noise")[0]
    with pytest.raises(ValueError, match=r"MoGA Model Loader: input 'loras': the LoRA 'style.safetensors' is for the "
                                         r"low-noise expert .* loaded as one model\. Fix: set that MoGA LoRA node's "
                                         r"'experts' to both, or pick the low-noise expert's file in low_noise_model"):
        run(env.nodes.MoGAModelLoader, ckpt_name="tiny_moga.safetensors", weight_dtype="default",
            attention_backend="auto", loras=low_only)
    wide = run(env.nodes.MoGALora, lora_name="wan14b.safetensors", strength=1.0, experts="low_noise")[0]
    with pytest.raises(ValueError, match=r"input 'loras': a LoRA could not be merged into .*the low-noise expert "
                                         r"\(tiny_t2v_low_noise.safetensors\).*Wan 14B.*Fix: .*'experts'"):
        load_pair(env, loras=wide)


@pytest.mark.slow
def test_pooled_sampler_runs_a_pair_with_its_own_groups_and_a_lora_per_expert(env):
    """2 gloo workers load each expert with its own LoRA and run it with its own MoGA config (4 and 2 groups):
    the one-process latent."""
    high = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=0.6, experts="high_noise")[0]
    chain = run(env.nodes.MoGALora, lora_name="style.safetensors", strength=-0.5, loras=high, experts="low_noise")[0]
    pair = run(env.nodes.MoGAAttentionSettings, model=load_mixed(env, loras=chain), window_frames=1)[0]
    sh = shots(env, model=pair, clip=FakeClip(TEXT_DIM))
    single = run(env.nodes.MoGASampler, model=pair, shots=sh, **SAMPLER)[0]["samples"]
    pooled = _pooled(env, model=pair, shots=sh, **SAMPLER)
    assert torch.allclose(pooled, single, atol=1e-5), (pooled - single).abs().max()


TI2V = dict(SAMPLER, width=64, height=64)   # the Wan2.2 VAE's 16x: a 4 x 4 latent, as 32 x 32 gives Wan2.1's


def test_sampler_runs_ti2v_5b_at_the_wan22_vaes_16x(env):
    """TI2V-5B text-to-video: the latent is width/16 x height/16 (the Wan2.2 VAE), the library's call, handed on
    through core's Wan22 format; a size that is not a multiple of 32 is refused with the fix."""
    model = load(env, "tiny_ti2v_5b.safetensors")
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    got = run(env.nodes.MoGASampler, model=model, shots=sh, **TI2V)[0]["samples"]
    assert got.shape == (1, 48, 7, 4, 4)
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga)
    assert torch.equal(got, sys.modules["comfy.latent_formats"].Wan22().process_out(ref))
    with pytest.raises(ValueError, match="'width'.*multiples of 32.*1280 x 704"):
        run(env.nodes.MoGASampler, model=model, shots=sh, **dict(TI2V, width=48))


def test_sampler_encodes_ti2v_start_images_through_the_wan22_format(env, monkeypatch):
    """TI2V-5B with start images for shots 1 and 3: the host's Wan2.2 VAE encodes each image alone, core's Wan22
    format normalises it, and the condition is the library's encode_start_images + image_condition on the same
    pixels (the image latent replaces each shot's first latent frame, at timestep 0); the video is moga's sample
    with it, and another image gives another video."""
    from moga.conditioning import image_condition
    from moga.wan_image_io import encode_start_images

    model = load(env, "tiny_ti2v_5b.safetensors")
    sh = shots(env, model=model, clip=FakeClip(TEXT_DIM))
    vae, batch = FakeVAE22(), torch.cat([_image(5), _image(8)])
    latent, cond = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=batch, vae=vae,
                                  start_image_shots="1,3", **TI2V)
    assert cond.kind == "replace" and cond.y is None and cond.latent.shape == (1, 48, 7, 4, 4)
    assert cond.fixed.tolist() == [True, False, False, False, False, True, False]
    assert vae.calls == [("encode", (1, 64, 64, 3))] * 2   # each image alone, at the video's size
    pixels = torch.nn.functional.interpolate(batch.movedim(-1, 1), size=(64, 64), mode="bilinear",
                                             align_corners=False)
    fmt = sys.modules["comfy.latent_formats"].Wan22()
    first = fmt.process_in(FakeVAE22().encode(pixels[0].movedim(0, -1)[None]))   # [1, 48, 1, 4, 4], by hand
    assert torch.allclose(cond.latent[:, :, :1], first, atol=1e-6)
    assert not torch.allclose(first, FakeVAE22().encode(pixels[0].movedim(0, -1)[None]), atol=1e-3)  # normalised
    sampler_module = sys.modules[env.nodes.MoGASampler.__module__]
    latents, fill = encode_start_images(sampler_module._host_vae_encoder(FakeVAE22(), 48), model.model.config,
                                        sh.plan.shot_frames, {0: pixels[0] * 2 - 1, 2: pixels[1] * 2 - 1})
    want = image_condition(model.model.config, sh.plan.latent_shot_frames(), (7, 4, 4), latents, fill=fill)
    assert torch.allclose(cond.latent, want.latent, atol=1e-6) and torch.equal(cond.fixed, want.fixed)
    ref = sample(model.model, sh.positive, sh.negative, shot_frames=(2, 3, 2), latent_size=(7, 4, 4), steps=2,
                 cfg=3.0, shift=5.0, solver="euler", seed=7, moga=model.moga, image=cond)
    assert torch.equal(latent, fmt.process_out(ref))
    other, _ = _capture_image(env, monkeypatch, model=model, shots=sh, start_image=torch.cat([_image(6), _image(8)]),
                              vae=vae, start_image_shots="1,3", **TI2V)
    assert not torch.allclose(latent, other, atol=1e-4)  # the image steers the video
    t2v = run(env.nodes.MoGASampler, model=model, shots=sh, **TI2V)[0]["samples"]
    assert not torch.allclose(latent, t2v, atol=1e-4)


def test_sampler_refuses_a_vae_of_other_latent_channels(env):
    """The Wan2.1 VAE (16 channels) on TI2V-5B and the Wan2.2 VAE (48) on a 16-channel I2V model: an error on
    'vae' naming both channel counts and the VAE file to load, before any encode or step."""
    ti2v = load(env, "tiny_ti2v_5b.safetensors")
    sh = shots(env, model=ti2v, clip=FakeClip(TEXT_DIM))
    wan21 = FakeVAE()
    with pytest.raises(ValueError, match="'vae'.*16-channel latents but .* samples 48-channel.*Fix: .*wan2.2_vae"):
        run(env.nodes.MoGASampler, model=ti2v, shots=sh, start_image=_image(1), vae=wan21, **TI2V)
    with pytest.raises(ValueError, match="'vae'.*needs a VAE.*wan2.2_vae"):
        run(env.nodes.MoGASampler, model=ti2v, shots=sh, start_image=_image(1), **TI2V)
    i2v = load(env, "tiny_i2v_22.safetensors")
    sh = shots(env, model=i2v, clip=FakeClip(TEXT_DIM))
    wan22 = FakeVAE22()
    with pytest.raises(ValueError, match="'vae'.*48-channel latents but .* samples 16-channel.*Fix: .*wan_2.1_vae"):
        run(env.nodes.MoGASampler, model=i2v, shots=sh, start_image=_image(1), vae=wan22, **SAMPLER)
    assert wan21.calls == [] and wan22.calls == [] and env.utils.updates == []
