"""`moga generate` with image-to-video models (--image, --shot-image, --clip-vision) and Wan2.2 A14B pairs
(--model-low, a folder), on tiny random files (umT5, Wan VAE, CLIP vision, DiTs)."""
import numpy as np
import pytest
import torch

from moga import wan_io

pytestmark = pytest.mark.skipif(not wan_io.wan_extra_available(),
                                reason="optional 'wan' extra (transformers, diffusers) not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import imageio.v3 as iio

    from moga.wan_image_io import save_tiny_clip_vision
    d = tmp_path_factory.mktemp("wanimg")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        iio.imwrite(d / name, rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    return {"te": wan_io.save_tiny_text_encoder(d / "te", text_dim=32), "vae": wan_io.save_tiny_vae(d / "vae"),
            "clip": save_tiny_clip_vision(d / "clip", width=24), "a": d / "a.png", "b": d / "b.png", "dir": d}


def _run(files, model, tmp_path, *extra):
    from moga.cli import main
    shots = tmp_path / "shots.txt"
    shots.write_text("[5] a red circle\n[5] a knight\n")
    return main(["generate", "--model", str(model), "--shots", str(shots), "--size", "32x16", "--steps", "2",
                 "--cfg", "1", "--text-encoder", str(files["te"]), "--vae", str(files["vae"]),
                 "--out", str(tmp_path / "o.mp4"), "--save-latent", str(tmp_path / "o.safetensors"),
                 "--quiet", "--overwrite", *extra])  # the same outputs again: replaced on purpose


def test_wan21_i2v_with_per_shot_images(files, tmp_path, capsys, monkeypatch):
    from moga import sampling
    from moga.testing import write_tiny_checkpoint
    model = write_tiny_checkpoint(tmp_path / "i2v.safetensors", in_dim=36, image_dim=24)
    seen = {}
    real = sampling.sample

    def spy(*a, **kw):
        seen["image"] = kw["image"]
        return real(*a, **kw)
    monkeypatch.setattr(sampling, "sample", spy)
    rc = _run(files, model, tmp_path, "--image", str(files["a"]), "--shot-image", f"2:{files['b']}",
              "--clip-vision", str(files["clip"]))
    assert rc == 0, capsys.readouterr().err
    cond = seen["image"]
    # two shots of 5 frames = 2 latent frames each: images on latent frames 0 and 2
    assert cond.y.shape == (1, 20, 4, 2, 4)
    assert cond.y[0, :4, [0, 2]].eq(1).all() and cond.y[0, :4, [1, 3]].eq(0).all()
    assert len(cond.clip) == 2 and not torch.equal(cond.clip[0], cond.clip[1])
    assert cond.clip[0].shape == (1, 5, 24)


def test_image_flags_are_checked(files, tmp_path, capsys):
    import re

    from moga.testing import write_tiny_checkpoint
    t2v = write_tiny_checkpoint(tmp_path / "t2v.safetensors")
    i2v = write_tiny_checkpoint(tmp_path / "i2v.safetensors", in_dim=36, image_dim=24)
    i2v22 = write_tiny_checkpoint(tmp_path / "i2v22.safetensors", in_dim=36)
    cases = [(t2v, ["--image", str(files["a"])], "text-to-video model"),
             (i2v22, [], "pass --image FILE"),
             (i2v, ["--image", str(files["a"])], "--clip-vision"),
             (i2v22, ["--shot-image", "3:" + str(files["a"])], "shots 1..2"),
             (i2v22, ["--shot-image", "x.png"], "N:FILE"),
             (i2v22, ["--image", str(tmp_path / "none.png")], "does not exist"),
             (i2v22, ["--image", str(files["a"]), "--cfg-low", "2"], "needs a Wan2.2 A14B pair"),
             (i2v22, ["--image", str(files["a"]), "--lora-low", str(files["a"])], "needs a Wan2.2 A14B pair")]
    for model, extra, match in cases:
        capsys.readouterr()
        assert _run(files, model, tmp_path, *extra) != 0
        err = capsys.readouterr().err
        assert re.search(re.escape(match), err), (match, err)


def test_wan22_i2v_pair_from_a_folder_and_from_two_files(files, tmp_path, capsys):
    from safetensors.torch import load_file

    from moga.testing import write_tiny_checkpoint
    folder = tmp_path / "a14b"
    folder.mkdir()
    hi = write_tiny_checkpoint(folder / "wan2.2_i2v_high_noise_14B.safetensors", in_dim=36, seed=1, num_groups=2)
    lo = write_tiny_checkpoint(folder / "wan2.2_i2v_low_noise_14B.safetensors", in_dim=36, seed=2, num_groups=3)
    assert _run(files, folder, tmp_path, "--image", str(files["a"]), "--schedule", "distill") == 0
    a = load_file(str(tmp_path / "o.safetensors"))["latent"]
    assert _run(files, hi, tmp_path, "--model-low", str(lo), "--image", str(files["a"]),
                "--schedule", "distill", "--offload-expert") == 0
    b = load_file(str(tmp_path / "o.safetensors"))["latent"]
    assert torch.equal(a, b)  # the same pair; on a CPU offloading moves nothing
    assert _run(files, folder, tmp_path, "--image", str(files["a"]), "--schedule", "distill",
                "--dense-warmup-steps", "1") == 0
    assert not torch.equal(a, load_file(str(tmp_path / "o.safetensors"))["latent"])  # step 1 ran dense
    capsys.readouterr()
    assert _run(files, folder, tmp_path, "--image", str(files["a"]), "--dense-warmup-steps", "3") != 0
    assert "0..2" in capsys.readouterr().err
    assert _run(files, hi, tmp_path, "--model-low", str(lo), "--image", str(files["a"]),
                "--schedule", "distill", "--boundary", "0.5") == 0
    c = load_file(str(tmp_path / "o.safetensors"))["latent"]
    assert not torch.equal(a, c)


@pytest.mark.slow
def test_torchrun_two_ranks_run_an_i2v_pair_with_per_expert_loras_as_one_process(files, tmp_path):
    """`torchrun -m moga generate` on 2 gloo ranks: Wan2.2 I2V A14B (--model-low, --offload-expert), a LoRA per
    expert (--lora, --lora-low), the low expert's guidance (--cfg-low) and start images of both shots (--image,
    --shot-image): every rank encodes the same images with the same VAE, so the latent is the one-process one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from moga.testing import write_tiny_checkpoint
    hi = write_tiny_checkpoint(tmp_path / "hi.safetensors", in_dim=36, seed=1, num_groups=2)
    lo = write_tiny_checkpoint(tmp_path / "lo.safetensors", in_dim=36, seed=2, num_groups=3)
    g = torch.Generator().manual_seed(8)
    loras = {}
    for name, block in (("high", 0), ("low", 1)):
        loras[name] = tmp_path / f"{name}_lora.safetensors"
        save_file({f"diffusion_model.blocks.{block}.norm3.diff_b": 0.1 * torch.randn(64, generator=g)},
                  str(loras[name]))
    same_cfg = ["--model-low", str(lo), "--offload-expert", "--lora", str(loras["high"]), "--lora-low",
                str(loras["low"]), "--steps", "4", "--cfg", "3", "--image", str(files["a"]), "--shot-image",
                f"2:{files['b']}", "--device", "cpu", "--dtype", "float32"]
    flags = same_cfg + ["--cfg-low", "2"]
    assert _run(files, hi, tmp_path, *flags) == 0
    one = load_file(str(tmp_path / "o.safetensors"))["latent"]
    shots = tmp_path / "shots.txt"
    root = Path(__file__).resolve().parents[1]
    argv = ["generate", "--model", str(hi), "--shots", str(shots), "--size", "32x16", "--text-encoder",
            str(files["te"]), "--vae", str(files["vae"]), "--out", str(tmp_path / "par.mp4"), "--save-latent",
            str(tmp_path / "par.safetensors"), "--quiet", *flags]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MOGA_DIST_TIMEOUT="60")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "moga", *argv], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("wrote ") == 1 and "over 2 ranks" in res.stdout
    par = load_file(str(tmp_path / "par.safetensors"))["latent"]
    rel = float((par.double() - one.double()).norm() / one.double().norm())
    assert rel < 1e-5, rel
    assert _run(files, hi, tmp_path, *same_cfg) == 0   # without --cfg-low: another video
    assert not torch.allclose(load_file(str(tmp_path / "o.safetensors"))["latent"], one, atol=1e-4)
