"""Atomic, checked outputs (moga.outputs): an interrupted write leaves the old file as it was and no
temporary file; bad output paths are refused before any work, with the fix."""
import os

import numpy as np
import pytest

from moga import outputs
from moga.outputs import OutputError, atomic_path, check_output, sniff
from moga.video import read_video, write_video


def _frames(t=6, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, size=3)
    return np.stack([np.stack([0.5 + 0.4 * np.sin(6 * (xx + yy) + 0.3 * i + phase[k]) for k in range(3)], -1)
                     for i in range(t)])


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _interrupting_writer(monkeypatch, after: int, exc=KeyboardInterrupt):
    """imageio's real ffmpeg writer, whose frame writer raises `exc` after `after` frames."""
    import imageio.v2 as iio
    real = iio.get_writer

    def get_writer(*a, **k):
        w = real(*a, **k)
        orig, n = w.append_data, [0]

        def append(frame):
            if n[0] == after:
                raise exc()
            n[0] += 1
            orig(frame)
        w.append_data = append
        return w
    monkeypatch.setattr(iio, "get_writer", get_writer)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_video_write_keeps_old_video(tmp_path, monkeypatch, exc):
    target = tmp_path / "story.mp4"
    write_video(target, _frames(seed=1), fps=8)
    before = target.read_bytes()
    _interrupting_writer(monkeypatch, after=3, exc=exc)
    with pytest.raises(exc):
        write_video(target, _frames(t=8, seed=2), fps=8)
    assert target.read_bytes() == before  # byte-identical, still playable
    assert read_video(target)[0].shape == (6, 32, 48, 3)
    assert _leftovers(tmp_path, {"story.mp4"}) == []  # no temp file


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    _interrupting_writer(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / "new.mp4", _frames(), fps=8)
    assert _leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".webm"])
def test_each_video_extension_is_written_in_its_container(tmp_path, ext):
    path = write_video(tmp_path / f"v{ext}", _frames(t=5, seed=3), fps=8)
    assert sniff(path) == "video"
    back, fps = read_video(path)
    assert back.shape == (5, 32, 48, 3) and fps == pytest.approx(8)
    assert _leftovers(tmp_path, {f"v{ext}"}) == []


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".") and str(os.getpid()) in tmp.name
            tmp.write_text("half")
            raise ValueError("boom")
    assert target.read_text() == "old" and _leftovers(tmp_path, {"a.json"}) == []
    outputs.write_json(target, {"x": [1, 2]})
    assert target.read_text().startswith("{") and '"x"' in target.read_text()
    assert _leftovers(tmp_path, {"a.json"}) == []


def test_atomic_json_not_serialisable_keeps_old(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        outputs.write_json(target, {"bad": object()})
    assert target.read_text() == '{"old": 1}' and _leftovers(tmp_path, {"r.json"}) == []


def test_safetensors_writers_are_atomic(tmp_path, monkeypatch):
    """An interrupt during write_safetensors / state.save_tensors / save_safetensors leaves the old file."""
    import torch

    from moga.checkpoint import write_safetensors
    from moga.train import state

    g = torch.Generator().manual_seed(0)
    for name, write in (("w.safetensors", lambda p, t: write_safetensors(p, t)),
                        ("s.safetensors", lambda p, t: state.save_tensors(p, t)),
                        ("l.safetensors", lambda p, t: outputs.save_safetensors(t, p))):
        target = tmp_path / name
        write(target, {"a": torch.randn(4, 4, generator=g)})
        before = target.read_bytes()
        real_fsync = os.fsync

        def fsync(fd):  # the data is written; interrupt just before the rename
            raise KeyboardInterrupt
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(KeyboardInterrupt):
            write(target, {"a": torch.randn(64, 64, generator=g)})
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert target.read_bytes() == before, name
    assert _leftovers(tmp_path, {"w.safetensors", "s.safetensors", "l.safetensors"}) == []


# ---- checks before any work ----------------------------------------------------------------------
def _video(tmp_path, name="old.mp4"):
    return write_video(tmp_path / name, _frames(t=5), fps=8)


@pytest.mark.parametrize("name,match", [
    ("story", "no extension.*add .mp4"),
    ("story.txt", "'.txt'.*add .mp4"),
    ("story.gif", "'.gif'.*add .mp4"),
])
def test_check_output_extension(tmp_path, name, match):
    with pytest.raises(OutputError, match=match):
        check_output(tmp_path / name, "video")


def test_check_output_folder_parent_and_writable(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, "video")
    with pytest.raises(OutputError, match="does not exist: create it"):
        check_output(tmp_path / "no" / "such" / "x.mp4", "video")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root ignores folder permissions; /proc refuses new files for everyone
        place = ro if not os.access(ro, os.W_OK) else "/proc"
        with pytest.raises(OutputError, match="cannot be written"):
            check_output(os.path.join(place, "x.mp4"), "video")
    finally:
        ro.chmod(0o700)
    assert check_output(tmp_path / "fresh.mp4", "video") == tmp_path / "fresh.mp4"
    assert _leftovers(tmp_path, {"ro"}) == []  # the probe file is gone


def test_check_output_existing_files(tmp_path):
    video = _video(tmp_path)
    with pytest.raises(OutputError, match="already exists: pass -y/--overwrite"):
        check_output(video, "video")
    assert check_output(video, "video", overwrite=True) == video
    text = tmp_path / "notes.mp4"
    text.write_text("my notes, not a video")
    with pytest.raises(OutputError, match="other data.*never replaces"):
        check_output(text, "video", overwrite=True)
    # a safetensors file where a video should go, and a video where a checkpoint should go
    st = tmp_path / "w.safetensors"
    import torch

    from moga.checkpoint import write_safetensors
    write_safetensors(st, {"a": torch.randn(2)})
    with pytest.raises(OutputError, match="already exists: pass"):
        check_output(st, "safetensors")
    assert check_output(st, "safetensors", overwrite=True) == st
    fake = tmp_path / "v.safetensors"
    fake.write_bytes(video.read_bytes())
    with pytest.raises(OutputError, match="holds a video.*never replaces"):
        check_output(fake, "safetensors", overwrite=True)
    pk = tmp_path / "p.safetensors"
    torch.save({"a": torch.randn(2)}, pk)
    with pytest.raises(OutputError, match="zip"):
        check_output(pk, "safetensors", overwrite=True)


def test_sniff(tmp_path):
    import pickle
    import struct
    p = tmp_path / "x"
    header = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' + b" " * 842  # length 0x380
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    assert len(header) & 0xFF == 0x80 and sniff(p) == "safetensors"  # not read as a pickle
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert sniff(p) == "pickle"
    p.write_bytes(b"")
    assert sniff(p) == "empty"
    p.write_text("hello world, plain text")
    assert sniff(p) == "other"


def test_check_output_safetensors_names(tmp_path):
    assert check_output(tmp_path / "latent.st", "safetensors") == tmp_path / "latent.st"  # any neutral name
    for bad in ("model.pt", "model.ckpt", "x.mp4"):
        with pytest.raises(OutputError, match="add .safetensors$"):
            check_output(tmp_path / bad, "safetensors")
