"""The training side's LoRA (moga.train.lora) reads and writes through moga.checkpoint.lora: every layout the
loader takes merges to W + s * alpha/r * B @ A (computed here in float64), a file loads as trainable layers
whose forward equals the merged model's, and what cannot be trained is refused before anything changes."""
import pytest
import torch
from safetensors.torch import load_file

from moga.checkpoint import CheckpointError, load_model, read_lora, write_lora
from moga.testing import random_inputs
from moga.train.lora import LoRALinear, add_lora, load_lora, lora_factors, lora_modules, lora_state_dict, merge_lora
from test_lora import _assert_merged, _expect, _params, write_diff_lora
from test_lora import write_lora as write_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from moga.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("trainlora") / "base.safetensors", seed=4, num_layers=2)


def _out(model, seed=11):
    x, t, ctx = random_inputs(model.config, frames=2, height=8, width=8, seed=seed)
    with torch.no_grad():
        return model(x, t, ctx)


def _trained_lora(model, rank=4, alpha=8.0, seed=3):
    """add_lora, then random non-zero `up` factors (as training leaves them: up starts at zero)."""
    add_lora(model, rank, alpha, "self_attn,ffn", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("layout,alpha", [("kohya", 8.0), ("peft", None), ("diffusers", 2.0)])
def test_every_layout_merges_as_the_checkpoint_loader_does(base, tmp_path, layout, alpha):
    lora, want = write_layout(tmp_path / f"{layout}.safetensors", layout, rank=4, alpha=alpha, seed=7)
    plain = _params(load_model(base))
    model = load_model(base)
    names = load_lora(model, lora, merge=True, strength=0.7)
    _assert_merged(model, _expect(plain, [want], [0.7]))
    assert names == sorted(k[: -len(".weight")] for k in want)
    at_load = _params(load_model(base, loras=[(lora, 0.7)]))
    assert all(torch.allclose(_params(model)[k], at_load[k], rtol=0, atol=1e-6) for k in plain)


def test_full_deltas_merge_and_cannot_become_trainable_layers(base, tmp_path):
    diff, want = write_diff_lora(tmp_path / "diff.safetensors")
    plain = _params(load_model(base))
    model = load_model(base)
    load_lora(model, diff, merge=True, strength=-1.5)
    _assert_merged(model, _expect(plain, [want], [-1.5]))
    fresh = load_model(base)
    with pytest.raises(ValueError, match="full delta .* merge=True"):
        load_lora(fresh, diff, merge=False)
    assert not lora_modules(fresh) and all(torch.equal(plain[k], v) for k, v in _params(fresh).items())


def test_a_written_lora_loads_back_as_trainable_layers(base, tmp_path):
    trained = _trained_lora(load_model(base))
    want = _out(trained)
    sd = lora_state_dict(trained)
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {8.0}
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    path = write_lora(tmp_path / "lora.safetensors", {n: (m.lora_down, m.lora_up, m.lora_alpha)
                                                      for n, m in lora_modules(trained).items()})
    on_disk = load_file(str(path))
    assert set(on_disk) == set(sd) and all(torch.equal(on_disk[k], sd[k]) for k in sd)
    for source in (path, sd):  # the file, or its tensors in memory
        model = load_model(base)
        load_lora(model, source, merge=False)
        layers = lora_modules(model)
        assert set(layers) == set(lora_modules(trained)) and all(isinstance(m, LoRALinear) for m in layers.values())
        assert all(m.lora_up.requires_grad and m.lora_scale == 2.0 for m in layers.values())
        torch.testing.assert_close(_out(model), want, atol=2e-5, rtol=1e-5)
        merge_lora(model)
        torch.testing.assert_close(_out(model), want, atol=2e-5, rtol=1e-5)
    half = load_model(base)
    load_lora(half, sd, merge=False, strength=0.5)  # the strength scales up: the update, not the output
    for name, m in lora_modules(half).items():
        torch.testing.assert_close(m.lora_up, 0.5 * lora_modules(trained)[name].lora_up.detach(), rtol=0, atol=0)


def test_a_kohya_file_trains_from_its_own_alpha(base, tmp_path):
    lora, _ = write_layout(tmp_path / "k.safetensors", "kohya", rank=4, alpha=2.0, seed=5)
    merged = load_model(base)
    load_lora(merged, lora, merge=True)
    layers = load_model(base)
    load_lora(layers, lora, merge=False)
    assert {m.lora_alpha for m in lora_modules(layers).values()} == {2.0}
    torch.testing.assert_close(_out(layers), _out(merged), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has LoRA"):
        load_lora(layers, lora, merge=False)


def test_read_lora_takes_tensors_as_a_file(base, tmp_path):
    model = load_model(base)
    lora, _ = write_layout(tmp_path / "p.safetensors", "peft", rank=4, alpha=3.0, seed=2)
    from_file, from_dict = read_lora(lora, model), read_lora(load_file(str(lora)), model)
    key = lambda t: t.target  # noqa: E731
    for a, b in zip(sorted(from_file, key=key), sorted(from_dict, key=key)):
        assert a.target == b.target and a.alpha == b.alpha and torch.equal(a.delta("cpu"), b.delta("cpu"))
    wide = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 5120),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(5120, 4)}
    before = _params(model)
    with pytest.raises(CheckpointError, match="Wan 14B"):
        load_lora(model, wide)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())


def test_lora_factors_pairs_the_trained_tensors():
    down, up = torch.randn(4, 8), torch.randn(6, 4)
    weights = {"blocks.0.ffn.0.lora_down": down, "blocks.0.ffn.0.lora_up": up,
               "blocks.0.self_attn.router.weight": torch.randn(3, 8)}
    got = lora_factors(weights)
    assert list(got) == ["blocks.0.ffn.0"] and got["blocks.0.ffn.0"][0] is down and got["blocks.0.ffn.0"][1] is up
