"""moga.wan_io (umT5 text encoder, Wan VAE from local files) and `moga generate` with them.

Needs the optional `wan` extra (transformers + diffusers); without it these tests skip, except the one
that checks the error a person gets when the extra is missing.
"""
import sys

import pytest
import torch

from moga import wan_io
from moga.wan_io import MissingExtra, TextEncoder, WanVAE, decode_shots

needs_wan = pytest.mark.skipif(not wan_io.wan_extra_available(),
                               reason="optional 'wan' extra (transformers, diffusers) not installed")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingExtra, match=r"pip install 'moga-video\[wan\]'"):
        TextEncoder.load(tmp_path)
    with pytest.raises(MissingExtra, match="diffusers"):
        WanVAE.load(tmp_path)
    assert not wan_io.wan_extra_available()


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.load(tmp_path / "nope")
    f = tmp_path / "umt5.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        TextEncoder.load(f)
    with pytest.raises(ValueError, match="no config.json"):
        TextEncoder.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer"):
        TextEncoder.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanVAE.load(tmp_path / "nope")


def test_prompt_cleaning():
    assert wan_io.clean_prompt("  a &amp;amp; b \n\t c ") == "a & b c"


def test_decode_shots_cuts_clean():
    class Recorder:
        def __init__(self):
            self.calls = []

        def decode(self, z):
            self.calls.append(z.shape[2])
            f = z.shape[2]
            return z[:, :3].repeat_interleave(4, dim=2)[:, :, 3:].expand(-1, -1, 4 * (f - 1) + 1, -1, -1)
    rec = Recorder()
    z = torch.randn(1, 16, 6, 2, 2)
    out = decode_shots(rec, z, [2, 1, 3])
    assert rec.calls == [2, 1, 3] and out.shape[2] == 5 + 1 + 9
    with pytest.raises(ValueError, match="add up"):
        decode_shots(rec, z, [2, 2])


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    if not wan_io.wan_extra_available():
        pytest.skip("optional 'wan' extra (transformers, diffusers) not installed")
    d = tmp_path_factory.mktemp("wan")
    return {"te": wan_io.save_tiny_text_encoder(d / "te", text_dim=32),
            "vae": wan_io.save_tiny_vae(d / "vae"),
            "vae_file": wan_io.save_tiny_vae(d / "vae_file", single_file=True),
            "dir": d}


@needs_wan
def test_text_encoder_trims_and_pads_like_wan(wan_files):
    te = TextEncoder.load(wan_files["te"], text_len=24)
    a, b, a2 = te.encode(["a red circle moves left", "a knight", "a red circle moves left"])
    assert a.shape == b.shape == (1, 24, 32)
    assert torch.equal(a, a2)
    # the real tokens are the encoder's states on the unpadded ids; the rest are zeros
    ids = te.tokenizer(["a red circle moves left"], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        ref = te.model(input_ids=ids).last_hidden_state[0]
    assert torch.allclose(a[0, :n], ref, atol=1e-5)
    assert torch.count_nonzero(a[0, n:]) == 0 and torch.count_nonzero(a[0, :n]) > 0
    assert (a[0, :3] - b[0, :3]).abs().max() > 1e-4
    # a prompt longer than text_len is truncated, not an error
    long = te.encode(["word " * 100])[0]
    assert long.shape == (1, 24, 32) and torch.count_nonzero(long[0, -1]) > 0


@needs_wan
def test_text_encoder_finds_diffusers_layout(wan_files, tmp_path):
    import shutil
    root = tmp_path / "Wan-Diffusers"
    shutil.copytree(wan_files["te"], root / "text_encoder")
    shutil.copytree(wan_files["te"], root / "tokenizer")
    for f in (root / "text_encoder").glob("tokenizer*"):
        f.unlink()
    te = TextEncoder.load(root, text_len=16)
    assert te.encode(["x"])[0].shape == (1, 16, 32)


@needs_wan
def test_vae_normalisation_and_shapes(wan_files):
    vae = WanVAE.load(wan_files["vae"])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 3, 2, 3, generator=g)
    video = vae.decode(z)
    assert video.shape == (1, 3, 9, 16, 24) and video.abs().max() <= 1
    with torch.no_grad():
        raw = vae.vae.decode(z * vae.std + vae.mean, return_dict=False)[0].clamp(-1, 1)
        assert torch.allclose(video, raw, atol=1e-5)
        back = vae.encode(video)
        posterior = vae.vae.encode(video).latent_dist.mode()
    assert back.shape == z.shape
    assert torch.allclose(back, (posterior - vae.mean) / vae.std, atol=1e-5)
    assert not torch.allclose(vae.mean, torch.zeros_like(vae.mean))  # the test config is not the identity
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.randn(1, 8, 2, 2, 2))


@needs_wan
def test_vae_single_file_equals_folder(wan_files):
    a = WanVAE.load(wan_files["vae_file"])
    z = torch.randn(1, 16, 2, 2, 2)
    ref = WanVAE(type(a.vae)(**wan_io.tiny_vae_config()).eval())
    ref.vae.load_state_dict(a.vae.state_dict())
    assert torch.allclose(a.decode(z), ref.decode(z), atol=1e-6)
    bad = wan_files["dir"] / "vae.pth"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="pickled"):
        WanVAE.load(bad)


@needs_wan
def test_generate_with_umt5_and_wan_vae(wan_files, tmp_path, capsys):
    from moga.cli import main
    from moga.testing import write_tiny_checkpoint
    from moga.video import read_video
    model = write_tiny_checkpoint(tmp_path / "dit.safetensors", num_groups=2)
    shots = tmp_path / "shots.txt"
    shots.write_text("[5] a red circle\n[1] a blue square\n[5] a knight\n[1] a castle\n")
    rc = main(["generate", "--model", str(model), "--shots", str(shots), "--size", "32x16", "--steps", "1",
               "--text-encoder", str(wan_files["te"]), "--vae", str(wan_files["vae"]), "--out",
               str(tmp_path / "o.mp4"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    frames, fps = read_video(tmp_path / "o.mp4")
    assert frames.shape == (12, 16, 32, 3) and fps == pytest.approx(16)
    assert "4 shots, 12 frames 32x16" in capsys.readouterr().out
