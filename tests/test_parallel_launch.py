"""`torchrun -m moga generate` on 2 CPU ranks (gloo): the latent equals a one-process run, only rank 0
writes, and a bad GPU count is one clear error (no hang)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test-parallel-own-encoders"

# The ranks are fresh processes: this entry registers a tiny text encoder and VAE (the path a model
# that brings its own takes), then runs the ordinary command line.
ENTRY = textwrap.dedent(f'''
    import sys, zlib, torch
    from moga import checkpoint as ckpt

    class HashTextEncoder:
        def encode(self, prompts):
            out = []
            for p in prompts:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                out.append(torch.randn(1, 3 + len(p) % 5, 32, generator=g))
            return out

    class PatchVAE:
        def decode(self, latent):
            g = torch.Generator().manual_seed(5)
            proj = torch.randn(16, 3 * 64, generator=g) / 4
            b, c, f, h, w = latent.shape
            px = torch.einsum("bcfhw,cp->bfhwp", latent.float(), proj).reshape(b, f, h, w, 3, 8, 8)
            px = px.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 3, f, 8 * h, 8 * w)
            return torch.tanh(torch.cat([px[:, :, :1], px[:, :, 1:].repeat_interleave(4, dim=2)], dim=2))

    ckpt.register_extras({EXTRAS!r}, lambda source, meta, device, dtype:
                         {{"text_encoder": HashTextEncoder(), "vae": PatchVAE()}})
    from moga.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _torchrun(tmp_path, nproc, argv, timeout=120):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MOGA_DIST_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(entry)] + argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from moga.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("launch") / "tiny.safetensors", num_groups=3, seed=2,
                                 metadata={"moga.extras": EXTRAS})


def _args(model, out, latent):
    return ["generate", "--model", str(model), "--prompt", "[5] a red circle moves left", "--prompt",
            "[5] it stops", "--size", "32x48", "--steps", "3", "--cfg", "3", "--seed", "4", "--device", "cpu",
            "--dtype", "float32", "--quiet", "--out", str(out), "--save-latent", str(latent)]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(model_path, tmp_path):
    from safetensors.torch import load_file

    from moga import checkpoint as ckpt
    from moga.cli import main

    res = _torchrun(tmp_path, 2, _args(model_path, tmp_path / "par.mp4", tmp_path / "par.safetensors"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "par.mp4").stat().st_size > 0
    assert res.stdout.count("wrote ") == 1, "only rank 0 writes and reports"
    assert "over 2 ranks" in res.stdout

    ENTRY_NS: dict = {}
    exec(compile(ENTRY.replace("sys.exit(main(sys.argv[1:]))", ""), "entry", "exec"), ENTRY_NS)
    assert EXTRAS in ckpt.EXTRA_LOADERS
    assert main(_args(model_path, tmp_path / "one.mp4", tmp_path / "one.safetensors")) == 0
    par = load_file(tmp_path / "par.safetensors")
    one = load_file(tmp_path / "one.safetensors")
    assert torch.equal(par["shot_frames"], one["shot_frames"])
    rel = float((par["latent"].double() - one["latent"].double()).norm() / one["latent"].double().norm())
    assert rel < 1e-5, rel


def test_torchrun_gpu_count_must_divide_heads(model_path, tmp_path, monkeypatch):
    # the tiny model has 4 heads: 3 ranks cannot split them. Every rank says so before joining the
    # group (no collective, so no rank waits for another): checked here on "rank 1 of 3" in-process.
    from moga.cli import build_parser
    from moga.cli import cmd_generate

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = build_parser().parse_args(_args(model_path, tmp_path / "x.mp4", tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"not divisible by 3: use one of \[1, 2, 4\] GPUs"):
        cmd_generate(args)
    import torch.distributed as dist
    assert not dist.is_initialized()
    assert not (tmp_path / "x.mp4").exists()
