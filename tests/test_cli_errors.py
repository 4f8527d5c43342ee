"""Issue 21's command-line items: every bad input is one clear line and exit 2, found before any model is
loaded; outputs are never lost; defaults come from the checkpoint's own settings."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moga.sampling import sampler_settings

from moga import checkpoint as ckpt
from moga.cli import _run_settings, build_parser, checkpoint_defaults, main
from moga.demo.model import DEMO_PATH
from moga.shots import MAX_SHOT_FRAMES, ShotPlan, check_frames
from moga.video import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAPTION = "a small red circle moves left on blue background"


def _err(capsys):
    return capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")
    monkeypatch.setattr(ckpt, "load_model", refuse)
    import moga.demo
    monkeypatch.setattr(moga.demo, "load_demo", refuse)


def _video(path, seed=0):
    rng = np.random.default_rng(seed)
    return write_video(path, rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8), fps=8)


# ---- outputs checked before any model loads --------------------------------------------------------
@pytest.mark.parametrize("name,match", [("story.txt", "add .mp4"), ("story", "no extension"),
                                        ("nodir/x.mp4", "does not exist: create it"), (".", "is a folder")])
def test_generate_bad_out_is_found_before_loading(tmp_path, capsys, no_model_load, name, match):
    out = name if name == "." else str(tmp_path / name)
    rc = main(["generate", "--model", str(DEMO_PATH), "--prompt", CAPTION, "--out", out, "--device", "cpu"])
    assert rc == 2
    err = _err(capsys)
    assert err.startswith("moga: error: --out") and match in err


def test_generate_refuses_to_replace_without_overwrite(tmp_path, capsys, no_model_load):
    old = _video(tmp_path / "story.mp4")
    before = old.read_bytes()
    assert main(["generate", "--model", str(DEMO_PATH), "--prompt", CAPTION, "--out", str(old)]) == 2
    assert "already exists: pass -y/--overwrite" in _err(capsys)
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video: my notes")
    for flag in ([], ["-y"], ["--overwrite"]):
        assert main(["generate", "--model", str(DEMO_PATH), "--prompt", CAPTION, "--out", str(notes), *flag]) == 2
        assert "never replaces" in _err(capsys)
    assert old.read_bytes() == before and notes.read_text() == "not a video: my notes"


def test_patch_dst_checked_before_calibration(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(ckpt, "patch_checkpoint", lambda *a, **k: called.append(1))
    dst = tmp_path / "out.safetensors"
    dst.write_text("hello")
    for flag in ([], ["-y"]):
        assert main(["patch", str(DEMO_PATH), str(dst), "--groups", "2", *flag]) == 2
        assert "DST" in _err(capsys) and not called
    assert dst.read_text() == "hello"
    assert main(["patch", str(DEMO_PATH), str(tmp_path / "w.pt"), "--groups", "2"]) == 2
    assert "add .safetensors" in _err(capsys)
    assert main(["patch", str(DEMO_PATH), str(DEMO_PATH), "--groups", "2"]) == 2
    assert "is the source" in _err(capsys)


def test_demo_out_steps_and_device_checked_first(tmp_path, capsys, no_model_load):
    assert main(["demo", "--out", str(tmp_path / "d.gif")]) == 2
    assert "add .mp4" in _err(capsys)
    assert main(["demo", "--out", str(tmp_path / "d.mp4"), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in _err(capsys)
    assert main(["demo", "--out", str(tmp_path / "d.mp4"), "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a device" in _err(capsys)
    if not torch.cuda.is_available():
        assert main(["demo", "--out", str(tmp_path / "d.mp4"), "--device", "cuda"]) == 2
        assert "CUDA is not available here: use --device cpu" in _err(capsys)
    old = _video(tmp_path / "d.mp4")
    assert main(["demo", "--out", str(old)]) == 2 and "--overwrite" in _err(capsys)


def test_run_demo_honours_steps_zero_as_an_error():
    import argparse

    from moga.demo import run_demo
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        run_demo(argparse.Namespace(out="x.mp4", steps=0, device="cpu", quiet=True))


def test_generate_device_errors(capsys, tmp_path):
    args = ["generate", "--model", str(DEMO_PATH), "--prompt", CAPTION, "--out", str(tmp_path / "x.mp4")]
    assert main(args + ["--device", "tpu"]) == 2
    assert "--device 'tpu' is not a device torch knows: use cpu, cuda" in _err(capsys)
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda:0"]) == 2
        assert "CUDA is not available" in _err(capsys)


# ---- defaults from the checkpoint, M_eff against M, replacing with -y ----------------------------
def test_checkpoint_defaults_from_the_demo_metadata():
    info = ckpt.inspect_checkpoint(DEMO_PATH)
    d = checkpoint_defaults(info.metadata)
    assert d == {"steps": 40, "cfg": 4.0, "shift": 3.0, "solver": "unipc", "fps": 8.0, "size": "128x128",
                 "seconds": 17 / 8}
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--cfg", "6"])
    run, taken = _run_settings(args, d)
    assert run == {"size": "128x128", "steps": 40, "cfg": 6.0, "shift": 3.0, "solver": "unipc", "schedule": None}
    assert "cfg" not in " ".join(taken) and "steps 40" in taken and "size 128x128" in taken
    run, taken = _run_settings(args, {})  # a file that records nothing: Wan's (the sampler fills them)
    assert run == {"size": "832x480", "steps": None, "cfg": 6.0, "shift": None, "solver": None,
                   "schedule": None} and not taken
    filled = sampler_settings(object(), run["steps"], run["cfg"], run["shift"], run["solver"], run["schedule"])
    assert filled == {"steps": 50, "cfg": 6.0, "shift": 5.0, "solver": "unipc", "schedule": "wan"}
    # a file's moga.sampler.* keys (a distill checkpoint's) are its defaults too, and win over its demo record
    d = checkpoint_defaults({"moga.sampler.steps": "4", "moga.sampler.cfg": "1", "moga.sampler.schedule": "distill"})
    assert d == {"steps": 4, "cfg": 1.0, "schedule": "distill"}
    run, taken = _run_settings(build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"]), d)
    assert sampler_settings(object(), run["steps"], run["cfg"], run["shift"], run["solver"], run["schedule"]) == \
        {"steps": 4, "cfg": 1.0, "shift": 5.0, "solver": "euler", "schedule": "distill"}
    assert "schedule distill" in taken
    assert checkpoint_defaults({"moga.demo": "not json"}) == {}


def test_generate_on_the_demo_model_uses_its_own_settings(tmp_path, capsys):
    out = tmp_path / "s.mp4"
    _video(out)
    rc = main(["generate", "--model", str(DEMO_PATH), "--prompt", CAPTION, "--size", "64x64", "--steps", "1",
               "--groups", "4", "--out", str(out), "-y", "--device", "cpu"])
    assert rc == 0, _err(capsys)
    frames, fps = read_video(out)
    assert fps == pytest.approx(8) and frames.shape[:3] == (17, 64, 64)  # the model's fps and shot length
    cap = capsys.readouterr()
    assert "from the checkpoint's own settings" in cap.err and "cfg 4" in cap.err and "fps 8" in cap.err
    line = next(ln for ln in cap.out.splitlines() if "M_eff" in ln)
    m_eff = float(line.split("M_eff ")[1].split()[0])
    assert "(M 4, capacity 1" in line  # what M_eff is measured against, so 'M_eff > M' is explained
    assert 1.0 <= m_eff
    assert [p.name for p in tmp_path.iterdir()] == ["s.mp4"]


def test_m_eff_doc_agrees_with_the_print():
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert "can exceed M" in doc and "(M 4, capacity 1" in doc


# ---- frames bound ----------------------------------------------------------------------------------
def test_frame_bound_is_consistent():
    for n in (100000, 100001, MAX_SHOT_FRAMES + 1, MAX_SHOT_FRAMES + 4):
        with pytest.raises(ValueError, match=rf"over the limit of {MAX_SHOT_FRAMES} frames per shot.*use at "
                                             rf"most {MAX_SHOT_FRAMES} frames"):
            check_frames(n)
    assert check_frames(MAX_SHOT_FRAMES) == MAX_SHOT_FRAMES
    with pytest.raises(ValueError, match=r"use \d+ or \d+ frames") as e:
        check_frames(MAX_SHOT_FRAMES - 2)
    for suggested in map(int, str(e.value).split("use ")[1].split(" frames")[0].split(" or ")):
        assert check_frames(suggested) == suggested  # every suggestion is itself accepted
    with pytest.raises(ValueError, match="over the limit"):
        ShotPlan.parse_text("a shot [700s]")


def test_cli_frame_bound(tmp_path, capsys):
    shots = tmp_path / "s.txt"
    shots.write_text("[100000] a red circle\n")
    assert main(["generate", "--model", str(DEMO_PATH), "--shots", str(shots), "--out", str(tmp_path / "o.mp4")]) == 2
    err = _err(capsys)
    assert "over the limit" in err and "100001" not in err


# ---- small errors ----------------------------------------------------------------------------------
def test_non_utf8_shot_file_names_the_file_and_byte(tmp_path, capsys):
    shots = tmp_path / "story.txt"
    shots.write_bytes(b"# fine\ncaf\xe9 shot\n")
    assert main(["generate", "--model", str(DEMO_PATH), "--shots", str(shots), "--out", str(tmp_path / "o.mp4")]) == 2
    err = _err(capsys)
    assert "story.txt" in err and "byte 10" in err and "line 2" in err and "UTF-8" in err


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_pickle_named_safetensors_gets_the_pickle_hint(tmp_path, capsys, kind):
    path = tmp_path / "model.safetensors"
    if kind == "zip":
        torch.save({"w": torch.randn(3)}, path)
    else:
        import pickle
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    assert main(["info", str(path)]) == 2
    err = _err(capsys)
    assert "this is a pickle (.pt/.ckpt) file" in err and "convert it to safetensors" in err


def test_unknown_flag_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", "--gpus", "2"])
    assert e.value.code == 2
    err = _err(capsys)
    assert "usage: moga generate" in err and "unrecognized arguments: --gpus 2" in err and "torchrun" in err
    with pytest.raises(SystemExit):
        main(["info", "x", "--bogus"])
    assert "usage: moga info" in _err(capsys)


@pytest.mark.parametrize("command", [["inspect", "--help"], ["train", "--help"], ["generate", "--help"]])
def test_help_never_imports_torch(command):
    code = ("import runpy, sys\n"
            f"sys.argv = ['moga'] + {command!r}\n"
            "try:\n    runpy.run_module('moga', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and res.stderr.strip().endswith("NO-TORCH"), res.stderr
