"""Frames <-> video files with imageio (ffmpeg from imageio-ffmpeg). Frames are numpy [T, H, W, 3] uint8."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8_frames(frames) -> np.ndarray:
    """[T, H, W, 3] uint8, or float in [0, 1] (numpy or torch) -> contiguous uint8 [T, H, W, 3]."""
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (RGB), got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def video_to_frames(video) -> np.ndarray:
    """A decoded video [3, T, H, W] or [1, 3, T, H, W] in [-1, 1] (the VAE's output) -> uint8 [T, H, W, 3]."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W] or [1, 3, T, H, W], got shape {tuple(video.shape)}")
    return to_uint8_frames((video.transpose(1, 2, 3, 0) + 1.0) / 2.0)


def write_video(path, frames, fps: float = 16, quality: float = 8.0) -> Path:
    """Write frames (see `to_uint8_frames`) as H.264 (yuv420p: plays everywhere; even sizes) in the
    container the extension names (.mp4, .mkv, .mov, .m4v), or VP9 for .webm. Atomic
    (`moga.outputs.atomic_path`): an interrupted write leaves whatever was at `path` as it was."""
    import imageio.v2 as iio

    from .outputs import VIDEO_CODECS, VIDEO_EXTENSIONS, atomic_path

    frames = to_uint8_frames(frames)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}")
    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"video {str(path)!r}: the extension {path.suffix or '(none)'!r} is not one of "
                         f"{', '.join(VIDEO_EXTENSIONS)}: add .mp4")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = iio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=float(fps), codec=codec,
                                quality=quality, pixelformat="yuv420p", macro_block_size=1,
                                ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return path


def read_video(path) -> tuple[np.ndarray, float]:
    """Read a video file back: (uint8 [T, H, W, 3], fps)."""
    import imageio.v2 as iio

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video {str(path)!r} does not exist")
    reader = iio.get_reader(str(path), format="FFMPEG")
    try:
        fps = float(reader.get_meta_data().get("fps", 0.0))
        frames = np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()
    return frames, fps
