"""The command line: parsing, lazy imports, errors a person can act on, and whole runs on tiny models.

The end-to-end runs here use a tiny random DiT that brings its own text encoder and VAE (the path the demo
model takes: `moga.extras` metadata + a registered loader), so they need no optional package;
tests/test_cli_wan_io.py runs the same command with a tiny umT5 encoder and Wan VAE from local folders.
"""
import json
import os
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

from moga import checkpoint as ckpt
from moga.cli import build_parser, main, parse_size
from moga.shots import ShotPlan
from moga.testing import write_tiny_checkpoint
from moga.video import read_video

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test-cli-own-encoders"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HashTextEncoder:
    """Deterministic per-prompt embeddings [1, L, text_dim] (seeded by the prompt's crc32)."""

    def __init__(self, text_dim):
        self.text_dim, self.calls = text_dim, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append(torch.randn(1, 3 + len(p) % 5, self.text_dim, generator=g))
        return out


class PatchVAE:
    """A Wan-shaped decoder: latent [B, 16, F, h, w] -> video [B, 3, 4(F-1)+1, 8h, 8w] in [-1, 1]
    (a fixed linear map of each latent pixel to an 8x8 RGB patch; the first latent frame is one frame,
    every later one four, as the Wan VAE's causal time axis)."""

    def __init__(self, z_dim=16):
        g = torch.Generator().manual_seed(5)
        self.proj = torch.randn(z_dim, 3 * 64, generator=g) / z_dim ** 0.5

    def decode(self, latent):
        b, c, f, h, w = latent.shape
        px = torch.einsum("bcfhw,cp->bfhwp", latent.float(), self.proj).reshape(b, f, h, w, 3, 8, 8)
        px = px.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 3, f, 8 * h, 8 * w)
        frames = torch.cat([px[:, :, :1], px[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return torch.tanh(frames)


def _own_encoders(source, metadata, device, dtype):
    return {"text_encoder": HashTextEncoder(32), "vae": PatchVAE()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt.register_extras(EXTRAS, _own_encoders)
    d = tmp_path_factory.mktemp("cli")
    paths = {
        "plain": write_tiny_checkpoint(d / "plain.safetensors", layout="comfyui"),
        "moga": write_tiny_checkpoint(d / "moga.safetensors", num_groups=3, metadata={"moga.extras": EXTRAS}),
        "own": write_tiny_checkpoint(d / "own.safetensors", metadata={"moga.extras": EXTRAS}),
    }
    shots = d / "shots.txt"
    shots.write_text("story: a red circle\n# four shots\n[5] moves left\n[1] stops\nmoves up [0.5s]\n[5] fades\n")
    paths["shots"] = shots
    paths["dir"] = d
    return paths


def _generate(tiny, out, *extra, model="moga"):
    return main(["generate", "--model", str(tiny[model]), "--shots", str(tiny["shots"]), "--size", "32x32",
                 "--steps", "2", "--seed", "1", "--out", str(out), "--device", "cpu", "--quiet", *extra])


def test_generate_fp8_matmul_off_on_the_cpu_says_why(tiny, tmp_path, capsys):
    assert _generate(tiny, tmp_path / "a.mp4", "--fp8-matmul") == 0
    err = capsys.readouterr().err
    assert "fp8 matmuls off" in err and "8.9" in err
    assert (tmp_path / "a.mp4").stat().st_size > 0


# ---- parsing and laziness ----------------------------------------------------------------------
def test_help_imports_no_torch():
    code = ("import sys; from moga.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'imageio', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "moga", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0
    for cmd in ("generate", "info", "patch", "demo"):
        assert cmd in res.stdout


def test_train_and_inspect_only_when_their_modules_exist():
    import importlib.util
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, module in (("train", "moga.train"), ("inspect", "moga.diagnostics")):
        assert (name in sub.choices) == (importlib.util.find_spec(module) is not None)


def test_generate_flags_parse():
    args = build_parser().parse_args(
        ["generate", "--model", "m", "--shots", "s.txt", "--size", "832x480", "--fps", "16", "--seed", "1",
         "--out", "o.mp4", "--steps", "30", "--cfg", "6", "--shift", "8", "--solver", "euler", "--groups", "4",
         "--window", "2x2", "--attention-backend", "sdpa", "--text-encoder", "te", "--vae", "v",
         "--dense-steps", "0.2", "--dense-layers", "0-1", "--fusion", "lse", "--device", "cpu",
         "--dtype", "float32"])
    assert (args.steps, args.cfg, args.shift, args.solver, args.groups) == (30, 6.0, 8.0, "euler", 4)
    assert (args.dense_steps, args.dense_layers, args.fusion, args.attention_backend) == (0.2, "0-1", "lse", "sdpa")


def test_parse_size():
    assert parse_size("832x480") == (832, 480) and parse_size("1280*720") == (1280, 720)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("832")
    with pytest.raises(ValueError, match=r"height 470 \(nearest valid: 464 or 480\)"):
        parse_size("832x470")


# ---- info and patch ----------------------------------------------------------------------------
def test_info(tiny, capsys):
    assert main(["info", str(tiny["plain"])]) == 0
    out = capsys.readouterr().out
    assert "dim 64, 2 layers, 4 heads" in out and "comfyui" in out and "no routers" in out
    assert main(["info", "--json", str(tiny["moga"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moga"]["num_groups"] == 3 and info["layout"] == "wan" and info["extras"] == EXTRAS


def test_patch_adds_routers(tiny, capsys):
    dst = tiny["dir"] / "patched.safetensors"
    rc = main(["patch", str(tiny["plain"]), str(dst), "--groups", "2", "--calibration-size", "2,4,4",
               "--calibration-steps", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "2 groups" in capsys.readouterr().out
    assert ckpt.inspect_checkpoint(dst).moga["num_groups"] == 2
    assert main(["patch", str(tiny["plain"]), str(dst)]) == 2
    assert "--groups" in capsys.readouterr().err


# ---- errors a person can act on ----------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("missing_model", "does not exist"),
    ("missing_shots", "shot list .* does not exist"),
    ("empty_shots", "no shots"),
    ("no_shots_flag", "no shots: pass --shots"),
    ("bad_size", r"multiple of 16.*width 40 \(nearest valid: 32 or 48\)"),
    ("groups_without_routers", r"no MoGA routers.*moga patch .* --groups 2"),
    ("too_many_groups", "more than the checkpoint's 3 router groups"),
    ("no_text_encoder", "--text-encoder DIR and --vae PATH"),
    ("missing_vae_file", "VAE .* does not exist"),
    ("bad_frames", "37 or 41"),
    ("bad_dense_steps", "fraction"),
    ("bad_dense_layers", "the model has 2 layers"),
])
def test_generate_errors(tiny, tmp_path, capsys, case, match):
    base = ["generate", "--model", str(tiny["moga"]), "--shots", str(tiny["shots"]), "--size", "32x32",
            "--out", str(tmp_path / "x.mp4"), "--quiet", "--steps", "1"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok [5]\nnot ok [40]\n")
    args = {
        "missing_model": lambda: _replace(base, "--model", str(tmp_path / "none.safetensors")),
        "missing_shots": lambda: _replace(base, "--shots", str(tmp_path / "none.txt")),
        "empty_shots": lambda: _replace(base, "--shots", str(empty)),
        "no_shots_flag": lambda: [a for i, a in enumerate(base) if a != "--shots" and base[i - 1] != "--shots"],
        "bad_size": lambda: _replace(base, "--size", "40x32"),
        "groups_without_routers": lambda: _replace(base, "--model", str(tiny["plain"])) + ["--groups", "2"],
        "too_many_groups": lambda: base + ["--groups", "4"],
        "no_text_encoder": lambda: _replace(base, "--model", str(tiny["plain"])),
        "missing_vae_file": lambda: base + ["--vae", str(tmp_path / "vae.safetensors")],
        "bad_frames": lambda: _replace(base, "--shots", str(bad)),
        "bad_dense_steps": lambda: base + ["--dense-steps", "2"],
        "bad_dense_layers": lambda: base + ["--dense-layers", "0-5"],
    }[case]()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moga: error: ")
    import re
    assert re.search(match, err), err


def _replace(argv, flag, value):
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


# ---- whole runs --------------------------------------------------------------------------------
def test_four_shot_run_writes_the_planned_video(tiny, tmp_path, capsys):
    out = tmp_path / "story.mp4"
    latent = tmp_path / "story.safetensors"
    assert _generate(tiny, out, "--save-latent", str(latent)) == 0
    summary = capsys.readouterr().out
    plan = ShotPlan.load(tiny["shots"])
    assert plan.num_shots == 4 and plan.shot_frames == (5, 1, 9, 5)
    frames, fps = read_video(out)
    assert frames.shape == (plan.total_frames, 32, 32, 3) and fps == pytest.approx(16)
    assert frames.std() > 1.0  # a picture, not a blank
    # 4 shots of (2, 1, 3, 2) latent frames of 2x2 tokens
    assert "wrote" in summary and "4 shots, 20 frames 32x32" in summary
    assert "tokens 32 " in summary and "M_eff " in summary and "s/step" in summary
    from safetensors.torch import load_file
    saved = load_file(str(latent))
    assert saved["latent"].shape == (1, 16, 8, 4, 4)
    assert saved["shot_frames"].tolist() == [2, 1, 3, 2]


def test_same_seed_same_video_and_other_seed_differs(tiny, tmp_path):
    lat = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, seed in enumerate((1, 1, 2)):
        assert _generate(tiny, tmp_path / f"{i}.mp4", "--save-latent", str(lat[i]), "--seed", str(seed),
                         "--steps", "1") == 0
    from safetensors.torch import load_file
    a, b, c = (load_file(str(p))["latent"] for p in lat)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_per_shot_prompts_reach_the_text_encoder(tiny, tmp_path):
    from moga.checkpoint import load_model
    seen = []
    orig = HashTextEncoder.encode

    def spy(self, prompts):
        seen.extend(prompts)
        return orig(self, prompts)
    HashTextEncoder.encode = spy
    try:
        assert _generate(tiny, tmp_path / "a.mp4", "--negative", "blurry", "--steps", "1") == 0
    finally:
        HashTextEncoder.encode = orig
    assert seen == ["a red circle moves left", "a red circle stops", "a red circle moves up",
                    "a red circle fades", "blurry"]
    assert load_model(tiny["moga"]).text_encoder is not None


def test_dense_run_reports_dense_and_flags_change_the_result(tiny, tmp_path, capsys):
    from safetensors.torch import load_file
    assert _generate(tiny, tmp_path / "d.mp4", "--dense", "--steps", "1", "--save-latent", str(tmp_path / "d.st")) == 0
    assert "M_eff dense" in capsys.readouterr().out
    assert _generate(tiny, tmp_path / "m.mp4", "--steps", "1", "--save-latent", str(tmp_path / "m.st")) == 0
    assert "M_eff dense" not in capsys.readouterr().out
    d, m = load_file(str(tmp_path / "d.st"))["latent"], load_file(str(tmp_path / "m.st"))["latent"]
    assert (d - m).abs().max() > 1e-4


def test_prompt_flags_instead_of_a_file(tiny, tmp_path, capsys):
    rc = main(["generate", "--model", str(tiny["own"]), "--prompt", "[5] one", "--prompt", "two",
               "--seconds", "0.25", "--size", "32x16", "--steps", "1", "--out", str(tmp_path / "p.mp4"),
               "--quiet", "--cfg", "1"])
    assert rc == 0, capsys.readouterr().err
    frames, _ = read_video(tmp_path / "p.mp4")
    assert frames.shape == (10, 16, 32, 3)  # 5 + 5 frames (0.25 s at 16 fps -> 5)


def test_progress_bar_on_stderr(tiny, tmp_path, capsys):
    main(["generate", "--model", str(tiny["own"]), "--prompt", "[1] a", "--size", "16x16", "--steps", "2",
          "--out", str(tmp_path / "q.mp4")])
    err = capsys.readouterr().err
    assert "denoising" in err and "2/2" in err
    assert "decoding" in err and "1/1" in err  # the decode of every shot shows too
    assert "block" not in err  # short steps: no block-level progress


def test_long_steps_show_the_block_under_way(tiny, tmp_path, capsys, monkeypatch):
    import moga.preflight
    monkeypatch.setattr(moga.preflight, "CALL_SECONDS_FOR_BLOCK_PROGRESS", 0.0)  # every step counts as long
    main(["generate", "--model", str(tiny["moga"]), "--prompt", "[1] a", "--prompt", "[1] b", "--size", "16x16",
          "--steps", "1", "--out", str(tmp_path / "q.mp4")])
    err = capsys.readouterr().err
    assert "block 2/4" in err and "block 4/4" in err  # two blocks, two guidance calls on a CPU
    assert "decoding" in err and "2/2" in err


# ---- hand-offs ---------------------------------------------------------------------------------
def test_torchrun_joins_the_process_group(tiny, tmp_path, monkeypatch, capsys):
    # under torchrun (WORLD_SIZE > 1) generate checks the request, then joins torchrun's group
    joined = []
    import moga.parallel.launch as real_launch
    fake = types.ModuleType("moga.parallel.launch")
    fake.__dict__.update({k: v for k, v in vars(real_launch).items() if not k.startswith("__")})
    fake.env_ranks = lambda: (0, 2, 0)

    def init_from_env(device=None):
        joined.append(device)
        raise RuntimeError("joined the group")

    fake.init_from_env = init_from_env
    monkeypatch.setitem(sys.modules, "moga.parallel.launch", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="joined the group"):
        _generate(tiny, tmp_path / "t.mp4")
    assert len(joined) == 1
    assert not (tmp_path / "t.mp4").exists()
    monkeypatch.setitem(sys.modules, "moga.parallel.launch", None)  # import fails
    import signal
    try:
        assert _generate(tiny, tmp_path / "t.mp4") == 2
    finally:  # a rank exiting with a code keeps SIGTERM blocked (moga.parallel.launch): not this test process
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    assert "torchrun" in capsys.readouterr().err


def test_demo_dispatch(monkeypatch, capsys):
    import importlib.util
    got = []
    if importlib.util.find_spec("moga.demo") is not None:
        import moga.demo
        monkeypatch.setattr(moga.demo, "run_demo", lambda args: got.append(args) or 0, raising=False)
        assert main(["demo", "--out", "x.mp4", "--seed", "3"]) == 0
        assert got[0].out == "x.mp4" and got[0].seed == 3
    else:
        rc = main(["demo"])
        assert rc in (0, 2)


def test_python_dash_m_moga_runs(tiny, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "moga", "info", str(tiny["plain"])], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Wan2.1" in res.stdout


def test_missing_checkpoint_for_info_and_patch(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["patch", str(tmp_path / "none.safetensors"), str(tmp_path / "o.safetensors"), "--groups", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_forwarded_commands_get_their_own_options(capsys):
    import importlib.util
    if importlib.util.find_spec("moga.train") is None:
        pytest.skip("moga.train is not in this copy")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])  # the module's own --help, not the top parser's
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "moga.train" in out and "COMMAND ..." not in out
