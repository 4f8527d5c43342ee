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
    with pytest.raises(ValueError, match=r"not divisible by 3: use one of \[1, 2, 4\] processes"):
        cmd_generate(args)
    import torch.distributed as dist
    assert not dist.is_initialized()
    assert not (tmp_path / "x.mp4").exists()


# ---- one clean exit for every rank: 2 gloo ranks started as torchrun starts them ---------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path, argv, world=2):
    """Both ranks with torchrun's environment; stderr of each in a file (read while they run)."""
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MOGA_DIST_TIMEOUT="60",
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        err = open(tmp_path / f"rank{rank}.err", "w+")
        procs.append((subprocess.Popen([sys.executable, str(entry)] + argv, env=env, cwd=tmp_path,
                                       stdout=subprocess.DEVNULL, stderr=err), err))
    return procs


def _finish(procs, timeout=90):
    codes, errs = [], []
    for p, err in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        err.seek(0)
        errs.append(err.read())
        err.close()
    return codes, errs


def _bad_args(model, tmp_path, *extra):
    return ["generate", "--model", str(model), "--prompt", "[5] a red circle", "--size", "32x48", "--steps", "2",
            "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(tmp_path / "x.mp4"), *extra]


@pytest.mark.parametrize("case,match", [
    ("groups", "--groups 9 is more than the checkpoint's 3"),      # refused before the group is joined
    ("frames", "1,205 latent frames"),                             # refused by the preflight, in the group
])
def test_a_user_error_is_printed_once_and_every_rank_exits_2(model_path, tmp_path, case, match):
    extra = ["--groups", "9"] if case == "groups" else ["--prompt", "[1601] one", "--prompt", "[1601] two",
                                                          "--prompt", "[1601] three"]
    codes, errs = _finish(_start_ranks(tmp_path, _bad_args(model_path, tmp_path, *extra)))
    assert codes == [2, 2], errs
    assert errs[0].count("moga: error:") == 1 and match in errs[0], errs[0]
    assert errs[1].strip() == "", "only rank 0 prints the user's error: " + errs[1]
    assert "Traceback" not in errs[0]
    assert not (tmp_path / "x.mp4").exists()


def test_ctrl_c_exits_130_on_every_rank_and_rank_0_says_so_once(model_path, tmp_path):
    import signal
    import time

    argv = _bad_args(model_path, tmp_path, "--steps", "100000", "--size", "64x64")
    argv.remove("--quiet")  # rank 0's progress bar tells us that sampling runs
    procs = _start_ranks(tmp_path, argv)
    deadline = time.monotonic() + 90
    while "denoising" not in (tmp_path / "rank0.err").read_text() and time.monotonic() < deadline:
        assert all(p.poll() is None for p, _ in procs), [e.name for _, e in procs]
        time.sleep(0.2)
    assert "denoising" in (tmp_path / "rank0.err").read_text(), "sampling never started"
    for p, _ in procs:  # a terminal's Ctrl-C reaches every process of the job
        p.send_signal(signal.SIGINT)
    codes, errs = _finish(procs, timeout=60)
    assert codes == [130, 130], errs
    assert errs[0].count("moga: cancelled") == 1 and "moga: cancelled" not in errs[1], errs
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_torchrun_reports_exit_code_2_for_both_ranks(model_path, tmp_path):
    res = _torchrun(tmp_path, 2, _bad_args(model_path, tmp_path, "--groups", "9"))
    assert res.stderr.count("moga: error:") == 1, res.stderr
    import re
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", res.stderr)  # torchrun's table: one row per failed rank
    assert len(codes) >= 2 and set(codes) == {"2"}, res.stderr  # none stopped by a signal (-15)
