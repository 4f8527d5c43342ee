import numpy as np
import pytest
import torch

from moga.video import read_video, to_uint8_frames, video_to_frames, write_video


def _frames(t=9, h=32, w=48, seed=0):
    # smooth content (codecs blur noise): a moving gradient per channel
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 1, size=3)
    return np.stack([np.stack([0.5 + 0.4 * np.sin(6 * (xx + yy) + k + 0.3 * i + 6 * phase[k])
                               for k in range(3)], -1) for i in range(t)])


def test_roundtrip_float_frames(tmp_path):
    frames = _frames()
    path = write_video(tmp_path / "sub" / "a.mp4", frames, fps=16)
    back, fps = read_video(path)
    assert back.shape == (9, 32, 48, 3) and back.dtype == np.uint8
    assert fps == pytest.approx(16)
    err = np.abs(back.astype(float) - to_uint8_frames(frames).astype(float)).mean()
    assert err < 6.0, err  # lossy, but the picture is the one we wrote


def test_roundtrip_uint8_and_torch(tmp_path):
    frames = to_uint8_frames(_frames(t=5, seed=1))
    write_video(tmp_path / "b.mp4", torch.from_numpy(frames.astype(np.float32) / 255.0), fps=8)
    back, fps = read_video(tmp_path / "b.mp4")
    assert back.shape == frames.shape and fps == pytest.approx(8)
    assert np.abs(back.astype(float) - frames.astype(float)).mean() < 6.0


def test_conversions():
    f = np.array([[[[-0.5, 0.0, 1.5]]]], dtype=np.float32)  # clipped to [0, 1]
    assert to_uint8_frames(f).tolist() == [[[[0, 0, 255]]]]
    video = torch.rand(1, 3, 4, 6, 8) * 2 - 1
    out = video_to_frames(video)
    assert out.shape == (4, 6, 8, 3)
    want = np.clip((video[0].permute(1, 2, 3, 0).numpy() + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(out, want)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 4, 4)), "RGB"),
    (np.zeros((0, 4, 4, 3)), "no frames"),
    (np.zeros((2, 4, 4, 3), dtype=np.int32), "uint8 or float"),
])
def test_bad_frames(bad, match):
    with pytest.raises(ValueError, match=match):
        to_uint8_frames(bad)


def test_odd_size_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "c.mp4", np.zeros((2, 5, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "none.mp4")
