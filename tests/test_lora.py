"""LoRAs merged at load (moga.checkpoint.lora): every published Wan layout against W + s * alpha/r * B @ A
computed here in float64, the forward of a LoRA'd model against hand-edited weights, strength 0, two LoRAs,
fp8 bases, and one clear error per bad file."""
import math

import pytest
import torch
from safetensors.torch import save_file

from moga.checkpoint import CheckpointError, load_model, parse_lora_spec, patch_checkpoint
from moga.testing import random_inputs, write_tiny_checkpoint

DIM, FFN, TEXT, LAYERS = 64, 128, 32, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "base.safetensors", seed=4, num_layers=LAYERS)


def _pair(g, out, rank, inp):
    """Random non-zero (up [out, r], down [r, in]) of a realistic size."""
    return torch.randn(out, rank, generator=g) / math.sqrt(rank), torch.randn(rank, inp, generator=g) / math.sqrt(inp)


# Each layout: (file key of the module, canonical tensor it changes, shape (out, in)); names written out by
# hand, as trainers publish them, so the test does not reuse the loader's own name mapping.
KOHYA = [("lora_unet_blocks_0_self_attn_q", "blocks.0.self_attn.q.weight", (DIM, DIM)),
         ("lora_unet_blocks_1_ffn_0", "blocks.1.ffn.0.weight", (FFN, DIM)),
         ("lora_unet_blocks_1_cross_attn_o", "blocks.1.cross_attn.o.weight", (DIM, DIM))]
PEFT = [("diffusion_model.blocks.0.self_attn.k", "blocks.0.self_attn.k.weight", (DIM, DIM)),
        ("diffusion_model.blocks.1.cross_attn.v", "blocks.1.cross_attn.v.weight", (DIM, DIM)),
        ("diffusion_model.text_embedding.0", "text_embedding.0.weight", (DIM, TEXT))]
DIFFUSERS = [("transformer.blocks.1.attn1.to_out.0", "blocks.1.self_attn.o.weight", (DIM, DIM)),
             ("transformer.blocks.0.ffn.net.0.proj", "blocks.0.ffn.0.weight", (FFN, DIM)),
             ("transformer.blocks.0.attn2.to_q", "blocks.0.cross_attn.q.weight", (DIM, DIM))]
SUFFIX = {"kohya": ("lora_up.weight", "lora_down.weight"), "peft": ("lora_B.weight", "lora_A.weight"),
          "diffusers": ("lora_B.weight", "lora_A.weight")}


def write_lora(path, layout, rank=4, alpha=None, seed=0, extra=None):
    """A LoRA file of `layout` and the float64 update it should make: {canonical: delta at strength 1}."""
    g = torch.Generator().manual_seed(seed)
    table = {"kohya": KOHYA, "peft": PEFT, "diffusers": DIFFUSERS}[layout]
    up_name, down_name = SUFFIX[layout]
    sd, want = {}, {}
    for module, canon, (out, inp) in table:
        up, down = _pair(g, out, rank, inp)
        sd[f"{module}.{up_name}"], sd[f"{module}.{down_name}"] = up, down
        scale = 1.0
        if alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(float(alpha))
            scale = alpha / rank
        want[canon] = scale * (up.double() @ down.double())
    sd.update(extra or {})
    save_file(sd, str(path))
    return path, want


def write_diff_lora(path, seed=1):
    """Full deltas as step-distill LoRAs carry them: a norm's weight and bias, a modulation, a head bias."""
    g = torch.Generator().manual_seed(seed)
    sd = {"diffusion_model.blocks.0.norm3.diff": 0.1 * torch.randn(DIM, generator=g),
          "diffusion_model.blocks.0.norm3.diff_b": 0.1 * torch.randn(DIM, generator=g),
          "diffusion_model.blocks.1.modulation.diff": 0.1 * torch.randn(1, 6, DIM, generator=g),
          "diffusion_model.head.head.diff_b": 0.1 * torch.randn(64, generator=g),
          "diffusion_model.patch_embedding.diff": 0.1 * torch.randn(DIM, 16, 1, 2, 2, generator=g)}
    save_file(sd, str(path))
    want = {"blocks.0.norm3.weight": sd["diffusion_model.blocks.0.norm3.diff"],
            "blocks.0.norm3.bias": sd["diffusion_model.blocks.0.norm3.diff_b"],
            "blocks.1.modulation": sd["diffusion_model.blocks.1.modulation.diff"],
            "head.head.bias": sd["diffusion_model.head.head.diff_b"],
            "patch_embedding.weight": sd["diffusion_model.patch_embedding.diff"]}
    return path, {k: v.double() for k, v in want.items()}


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _expect(base_params, deltas, strengths):
    out = {k: v.double().clone() for k, v in base_params.items()}
    for want, s in zip(deltas, strengths):
        for k, d in want.items():
            out[k] += s * d.reshape(out[k].shape)
    return out


def _assert_merged(model, expected):
    got = _params(model)
    for k, w in expected.items():
        err = float((got[k].double() - w).norm() / w.norm())
        assert err < 1e-6, (k, err)


@pytest.mark.parametrize("layout,alpha", [("kohya", 8.0), ("peft", None), ("diffusers", 2.0)])
def test_each_layout_merges_w_plus_s_alpha_over_r_ba(base, tmp_path, layout, alpha):
    lora, want = write_lora(tmp_path / f"{layout}.safetensors", layout, rank=4, alpha=alpha, seed=7)
    plain = _params(load_model(base))
    merged = load_model(base, loras=[(lora, 0.7)])
    expected = _expect(plain, [want], [0.7])
    _assert_merged(merged, expected)
    changed = {k for k in plain if not torch.equal(plain[k], _params(merged)[k])}
    assert changed == set(want), "exactly the LoRA's tensors change"
    assert merged.loras == [(str(lora), 0.7)]


def test_diff_and_diff_b_full_deltas(base, tmp_path):
    lora, want = write_diff_lora(tmp_path / "diff.safetensors")
    plain = _params(load_model(base))
    merged = load_model(base, loras=[(lora, -1.5)])
    _assert_merged(merged, _expect(plain, [want], [-1.5]))


def test_strength_zero_is_the_base_and_two_loras_add(base, tmp_path):
    a, want_a = write_lora(tmp_path / "a.safetensors", "kohya", alpha=4.0, seed=1)
    b, want_b = write_lora(tmp_path / "b.safetensors", "kohya", rank=8, alpha=16.0, seed=2)  # same tensors
    plain = _params(load_model(base))
    zero = _params(load_model(base, loras=[(a, 0.0)]))
    assert all(torch.equal(zero[k], plain[k]) for k in plain)
    both = load_model(base, loras=[(a, 0.5), (str(b), 1.25)])
    _assert_merged(both, _expect(plain, [want_a, want_b], [0.5, 1.25]))


def test_forward_of_a_lorad_model_equals_hand_edited_weights(base, tmp_path):
    lora, want = write_lora(tmp_path / "k.safetensors", "kohya", alpha=8.0, seed=3)
    diff, want_d = write_diff_lora(tmp_path / "d.safetensors", seed=5)
    merged = load_model(base, loras=[(lora, 0.9), (diff, 0.6)])
    by_hand = load_model(base)
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            d = 0.9 * want.get(name, torch.zeros(())) + 0.6 * want_d.get(name, torch.zeros(()))
            p.copy_((p.double() + d.reshape(p.shape) if d.dim() else p.double()).float())
    x, t, ctx = random_inputs(merged.config, frames=2, height=8, width=8, seed=11)
    with torch.no_grad():
        y, ref, y0 = merged(x, t, ctx), by_hand(x, t, ctx), load_model(base)(x, t, ctx)
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
    assert float((y0 - ref).norm() / ref.norm()) > 1e-2, "the LoRA must change the output"


def test_any_base_layout_takes_the_same_lora(tmp_path):
    lora, _ = write_lora(tmp_path / "p.safetensors", "peft", seed=9)
    outs = []
    for layout in ("wan", "comfyui", "diffusers"):
        path = write_tiny_checkpoint(tmp_path / f"{layout}.safetensors", layout=layout, seed=4, num_layers=LAYERS)
        outs.append(_params(load_model(path, loras=[(lora, 1.0)])))
    for other in outs[1:]:
        assert all(torch.equal(outs[0][k], other[k]) for k in outs[0])


def test_scaled_fp8_base_is_dequantised_then_merged(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "fp8.safetensors", fp8="scaled", seed=4, num_layers=LAYERS)
    lora, want = write_lora(tmp_path / "k.safetensors", "kohya", alpha=4.0, seed=3)
    plain = load_model(base)
    q = plain.blocks[0].self_attn.q
    w0 = q.weight.double() * q.scale_weight.double()
    ref = w0 + want["blocks.0.self_attn.q.weight"]

    exact = load_model(base, loras=[(lora, 1.0)])  # compute mode: bf16, no scale left
    m = exact.blocks[0].self_attn.q
    assert m.weight.dtype == torch.bfloat16 and "scale_weight" not in m._buffers
    assert torch.equal(m.weight, ref.float().to(torch.bfloat16))
    untouched = exact.blocks[0].self_attn.v
    assert untouched.weight.dtype == torch.float8_e4m3fn and "scale_weight" in untouched._buffers

    kept = load_model(base, loras=[(lora, 1.0)], lora_fp8="fp8")
    m = kept.blocks[0].self_attn.q
    assert m.weight.dtype == torch.float8_e4m3fn
    deq = m.weight.double() * m.scale_weight.double()
    assert float((deq - ref).abs().max() / ref.abs().max()) < 1 / 16  # e4m3: 3 mantissa bits
    assert float(m.scale_weight) != float(q.scale_weight)
    x, t, ctx = random_inputs(exact.config, frames=2, height=8, width=8, seed=2)
    with torch.no_grad():
        assert torch.isfinite(kept(x, t, ctx)).all() and torch.isfinite(exact(x, t, ctx)).all()


def test_patch_calibrates_on_the_lorad_weights(base, tmp_path):
    from moga.checkpoint import calibrate_routers, read_header
    lora, _ = write_lora(tmp_path / "k.safetensors", "kohya", alpha=32.0, rank=4, seed=3)
    kw = dict(size=(2, 8, 8), steps=2, max_tokens=256, seed=0)
    with_lora = calibrate_routers(None, 3, [0, 1], model=load_model(base, loras=[(lora, 1.0)]), **kw)
    without = calibrate_routers(base, 3, [0, 1], **kw)
    assert not torch.allclose(with_lora[0], without[0])
    dst = tmp_path / "patched.safetensors"
    patch_checkpoint(base, dst, 3, loras=[(lora, 1.0)], calibration_size=(2, 8, 8), calibration_steps=2,
                     calibration_tokens=256, seed=0)
    patched = load_model(dst)
    for i in (0, 1):
        assert torch.equal(patched.blocks[i].self_attn.router.weight.float(), with_lora[i])
    assert torch.equal(patched.blocks[0].self_attn.q.weight, load_model(base).blocks[0].self_attn.q.weight), \
        "the patched file keeps the base weights"
    _, meta, _ = read_header(dst)
    assert meta["moga.calibration_loras"] == '[["k.safetensors", 1.0]]'
    with pytest.raises(ValueError, match="only change calibration"):
        patch_checkpoint(base, tmp_path / "x.safetensors", None, routers={0: torch.randn(3, DIM)},
                         loras=[(lora, 1.0)])


# ---- bad files and values: one clear error each --------------------------------------------------------

def _error(base, lora, strength=1.0):
    with pytest.raises(CheckpointError) as e:
        load_model(base, loras=[(lora, strength)])
    return str(e.value)


def test_keys_that_match_nothing_are_named(base, tmp_path):
    lora, _ = write_lora(tmp_path / "x.safetensors", "kohya", seed=1, extra={
        "lora_unet_blocks_0_self_attn_zz.lora_up.weight": torch.randn(DIM, 4),
        "lora_unet_blocks_0_self_attn_zz.lora_down.weight": torch.randn(4, DIM)})
    msg = _error(base, lora)
    assert "2 of its 8 tensors match no weight" in msg and "lora_unet_blocks_0_self_attn_zz.lora_" in msg


def test_a_lora_for_another_model_says_which(base, tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(5120, 4)}, str(wide))
    msg = _error(base, wide)
    assert "(5120, 5120)" in msg and "Wan 14B" in msg and f"width {DIM}" in msg
    deep = tmp_path / "deep.safetensors"
    save_file({"lora_unet_blocks_39_ffn_2.lora_up.weight": torch.randn(DIM, 4),
               "lora_unet_blocks_39_ffn_2.lora_down.weight": torch.randn(4, FFN)}, str(deep))
    assert "blocks up to 39" in _error(base, deep)
    i2v = tmp_path / "i2v.safetensors"
    save_file({"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.randn(4, DIM),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.randn(DIM, 4)}, str(i2v))
    assert "image-to-video" in _error(base, i2v)
    flux = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(DIM, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, DIM)}, str(flux))
    assert "another architecture" in _error(base, flux)


def test_rank_mismatch_and_half_pairs(base, tmp_path):
    bad = tmp_path / "rank.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(DIM, 4),
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(8, DIM)}, str(bad))
    assert "up has rank 4 but down rank 8" in _error(base, bad)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(DIM, 4),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}, str(half))
    assert "lacks its down" in _error(base, half)


def test_pickles_other_files_and_other_adapters_are_refused(base, tmp_path):
    pt = tmp_path / "lora.pt"
    torch.save({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(DIM, 4)}, pt)
    msg = _error(base, pt)
    assert "not a safetensors file" in msg and "pickle" in msg
    assert "is not a LoRA" in _error(base, base)  # a full model given as a LoRA
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.randn(DIM, 4),
               "lora_unet_blocks_0_self_attn_q.hada_w1_b": torch.randn(4, DIM)}, str(loha))
    assert "LoHa" in _error(base, loha)
    assert "does not exist" in _error(base, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("strength", ["0.8", None, True, float("nan")])
def test_strength_must_be_a_number(base, tmp_path, strength):
    lora, _ = write_lora(tmp_path / "k.safetensors", "kohya")
    assert "is not a number" in _error(base, lora, strength)


def test_cli_spec_parsing(tmp_path):
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir/a.safetensors:0.75") == ("dir/a.safetensors", 0.75)
    assert parse_lora_spec("a.safetensors:-1") == ("a.safetensors", -1.0)
    odd = tmp_path / "v1:2.safetensors"  # a colon that belongs to an existing file's name
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (str(odd), 1.0)
    with pytest.raises(CheckpointError, match="strength 'strong' is not a number"):
        parse_lora_spec("a.safetensors:strong")


def test_a_bad_second_file_changes_nothing(base, tmp_path):
    """Every file is checked before any weight changes (merge_loras on an already loaded model)."""
    from moga.checkpoint import merge_loras
    good, _ = write_lora(tmp_path / "k.safetensors", "kohya")
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_nope.lora_up.weight": torch.randn(DIM, 4),
               "lora_unet_blocks_0_self_attn_nope.lora_down.weight": torch.randn(4, DIM)}, str(bad))
    model = load_model(base)
    before = _params(model)
    with pytest.raises(CheckpointError, match="match no weight"):
        merge_loras(model, [(good, 1.0), (bad, 1.0)])
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())


# ---- the command line: --lora FILE[:STRENGTH] in generate, patch and inspect ------------------------------

EXTRAS = "test-lora-own-encoders"


class _Text:
    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return [torch.randn(1, 4, TEXT, generator=g) for _ in prompts]


class _VAE:
    def decode(self, latent):
        b, c, f, h, w = latent.shape
        frames = latent[:, :3].repeat_interleave(8, 3).repeat_interleave(8, 4)
        return torch.tanh(torch.cat([frames[:, :, :1], frames[:, :, 1:].repeat_interleave(4, 2)], 2))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A MoGA tiny model with its own encoders, a LoRA, and the same model with the LoRA merged by hand."""
    from moga.checkpoint import register_extras, save_checkpoint
    register_extras(EXTRAS, lambda source, meta, device, dtype: {"text_encoder": _Text(), "vae": _VAE()})
    d = tmp_path_factory.mktemp("lora-cli")
    base = write_tiny_checkpoint(d / "base.safetensors", num_groups=3, seed=4, num_layers=LAYERS,
                                 metadata={"moga.extras": EXTRAS})
    lora, _ = write_lora(d / "style.safetensors", "kohya", alpha=8.0, seed=3)
    merged = save_checkpoint(load_model(base, loras=[(lora, 0.8)]), d / "merged.safetensors",
                             {"moga.extras": EXTRAS})
    (d / "shots.txt").write_text("[5] a red circle\n[1] it moves\n")
    return dict(dir=d, base=base, lora=lora, merged=merged)


def _latent(files, model, *extra):
    from safetensors.torch import load_file

    from moga.cli import main
    out = files["dir"] / f"{model}-{len(extra)}.mp4"
    rc = main(["generate", "--model", str(files[model]), "--shots", str(files["dir"] / "shots.txt"), "--size",
               "32x32", "--steps", "2", "--seed", "1", "--out", str(out), "--device", "cpu", "--quiet",
               "--save-latent", str(out.with_suffix(".safetensors")), *extra])
    assert rc == 0
    return load_file(str(out.with_suffix(".safetensors")))["latent"]


def test_generate_with_lora_equals_the_merged_file(cli_files):
    with_lora = _latent(cli_files, "base", "--lora", f"{cli_files['lora']}:0.8")
    assert torch.equal(with_lora, _latent(cli_files, "merged"))
    assert not torch.allclose(with_lora, _latent(cli_files, "base"), atol=1e-4)


def test_generate_refuses_a_bad_strength_before_loading(cli_files, capsys):
    from moga.cli import EXIT_USAGE, main
    rc = main(["generate", "--model", str(cli_files["base"]), "--prompt", "x", "--size", "32x32", "--steps", "1",
               "--device", "cpu", "--quiet", "--out", str(cli_files["dir"] / "x.mp4"),
               "--lora", f"{cli_files['lora']}:strong"])
    assert rc == EXIT_USAGE and "strength 'strong' is not a number" in capsys.readouterr().err


def test_patch_and_inspect_take_loras(cli_files, tmp_path, capsys):
    import json

    from moga.checkpoint import read_header
    from moga.cli import main
    plain = write_tiny_checkpoint(tmp_path / "plain.safetensors", seed=4, num_layers=LAYERS)
    args = ["--groups", "3", "--calibration-size", "2,8,8", "--calibration-steps", "2"]
    assert main(["patch", str(plain), str(tmp_path / "a.safetensors"), *args,
                 "--lora", f"{cli_files['lora']}:0.8"]) == 0
    assert main(["patch", str(plain), str(tmp_path / "b.safetensors"), *args]) == 0
    a, b = load_model(tmp_path / "a.safetensors"), load_model(tmp_path / "b.safetensors")
    assert not torch.equal(a.blocks[0].self_attn.router.weight, b.blocks[0].self_attn.router.weight)
    assert json.loads(read_header(tmp_path / "a.safetensors")[1]["moga.calibration_loras"]) == [["style.safetensors", 0.8]]

    reports = []
    for model, extra in (("base", ["--lora", f"{cli_files['lora']}:0.8"]), ("merged", []), ("base", [])):
        out = tmp_path / f"r{len(reports)}.json"
        assert main(["inspect", str(cli_files[model]), "--prompt", "one", "--seconds", "0.3", "--width", "32",
                     "--height", "32", "--steps", "2", "--queries", "8", "--device", "cpu", "--json", str(out),
                     *extra]) == 0
        reports.append(json.loads(out.read_text())["layers"])
    capsys.readouterr()
    assert reports[0] == reports[1] and reports[0] != reports[2]


# ---- sequence parallel: every worker merges the same LoRAs -------------------------------------------------

def test_two_gloo_workers_with_a_lora_match_one_process(tmp_path):
    from moga.parallel import WorkerPool
    from moga.sampling import sample
    base = write_tiny_checkpoint(tmp_path / "moga.safetensors", num_groups=3, seed=5, num_layers=LAYERS)
    lora, _ = write_lora(tmp_path / "k.safetensors", "kohya", alpha=8.0, seed=3)
    diff, _ = write_diff_lora(tmp_path / "d.safetensors")
    loras = [(str(lora), 0.8), (str(diff), 0.5)]
    model = load_model(base, loras=loras)
    g = torch.Generator().manual_seed(3)
    job = dict(positive=[torch.randn(1, 6, TEXT, generator=g) for _ in range(2)],
               negative=torch.randn(1, 4, TEXT, generator=g), shot_frames=(2, 3), latent_size=(5, 8, 10),
               steps=3, cfg=3.0, shift=5.0, solver="unipc", seed=9)
    ref, plain = sample(model, **job), sample(load_model(base), **job)
    pool = WorkerPool(["cpu", "cpu"], base, {"threads": 1, "loras": loras}, start_timeout=60, stall_timeout=30)
    try:
        got = pool.run(job, timeout=60)
    finally:
        pool.close()
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert rel(got, ref) < 1e-5, rel(got, ref)
    assert rel(plain, ref) > 1e-3, "the LoRA must change the latent"
    assert not pool.matches(["cpu", "cpu"], base, {"threads": 1}), "other LoRAs: another pool"
    with pytest.raises(CheckpointError, match="not a number"):
        WorkerPool(["cpu", "cpu"], base, {"loras": [(str(lora), "x")]})


def test_per_row_scaled_fp8_base(tmp_path):
    """scale_weight of shape [out, 1] (one scale per output row) is dequantised row by row before the merge."""
    from safetensors.torch import load_file
    scaled = write_tiny_checkpoint(tmp_path / "fp8.safetensors", fp8="scaled", seed=4, num_layers=LAYERS)
    sd = load_file(str(scaled))
    key = "blocks.0.self_attn.q"
    real = sd[f"{key}.weight"].float() * sd[f"{key}.scale_weight"]
    rows = (real.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    sd[f"{key}.weight"], sd[f"{key}.scale_weight"] = (real / rows).to(torch.float8_e4m3fn), rows
    save_file(sd, str(tmp_path / "rows.safetensors"), metadata={"moga.num_heads": "4"})
    lora, want = write_lora(tmp_path / "k.safetensors", "kohya", alpha=4.0, seed=3)
    ref = sd[f"{key}.weight"].double() * rows.double() + 0.5 * want[f"{key}.weight"]
    merged = load_model(tmp_path / "rows.safetensors", loras=[(lora, 0.5)]).blocks[0].self_attn.q
    assert merged.weight.dtype == torch.bfloat16 and "scale_weight" not in merged._buffers
    assert torch.equal(merged.weight, ref.float().to(torch.bfloat16))
