"""Training data for `moga train wan`: video clips with captions -> prepared safetensors shards.

A clip is a video file with a sidecar JSON beside it (same stem, `.json`), or an entry of a manifest:

    {"story": "a knight's journey, cinematic",           # optional, joined to every caption
     "fps": 24,                                          # optional: overrides the file's frame rate
     "shots": [{"start": 0.0, "end": 2.6, "caption": "the knight rides through a forest"},
               {"start_frame": 62, "end_frame": 124, "caption": "she opens the gate"}]}

Shots are [start, end) in seconds (`start`/`end`) or in frames of the file (`start_frame`/`end_frame`).
A sidecar without "shots" but with a "caption" is one shot over the whole clip. A manifest is a JSON list
(or JSON lines) of such objects, each with "video" (a path relative to the manifest) and either the
fields inline or "sidecar" (a path).

`prepare` decodes every clip once (imageio), resamples each shot to the training frame rate, scales
and centre-crops it to the training size, keeps the longest 4n+1-frame run from the shot's start (the
Wan VAE encodes each shot as its own clip), and encodes it: VAE latents per shot, text embeddings per
caption (story + caption, joined by `moga.shots.ShotPlan.prompts`). Training then never runs the VAE
or the text encoder. A clip that cannot be read, has a shot shorter than `min_shot_frames` or a shot
without a caption is reported by name and skipped; the run goes on.

Shard folder:
    index.json              settings, samples (name, shard, key, latent shot frames, tokens...), skipped
    shard-00000.safetensors "{key}.latent" [C, F, h, w] (shots joined in time), "{key}.text.{s}" [L_s, D]

Text embeddings are stored without the zero rows the encoder pads with (the model zero-pads them
back to its text length, so nothing changes but the size).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..outputs import write_json
from ..shots import PATCH, SPATIAL_RATIO, TEMPORAL_RATIO, Shot, ShotPlan, check_size

FORMAT = "moga-train-shards"
VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class BadClip(ValueError):
    """A clip that cannot be used; the message says why (it is skipped, not fatal)."""


# ---- what a clip is -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipShot:
    caption: str
    start: float | None = None        # seconds
    end: float | None = None
    start_frame: int | None = None    # frames of the file
    end_frame: int | None = None


@dataclass(frozen=True)
class Clip:
    name: str
    video: Path
    shots: tuple[ClipShot, ...]
    story: str = ""
    fps: float | None = None          # overrides the file's frame rate


def parse_sidecar(obj: dict, name: str, video: Path) -> Clip:
    """A sidecar/manifest object -> Clip (BadClip with the reason when it says nothing usable)."""
    if not isinstance(obj, dict):
        raise BadClip("its sidecar is not a JSON object")
    story = str(obj.get("story", "") or "").strip()
    fps = obj.get("fps")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
        raise BadClip(f"sidecar fps {fps!r} is not a positive number")
    raw = obj.get("shots")
    if raw is None:
        caption = obj.get("caption", obj.get("prompt"))
        raw = [{"caption": caption}] if caption is not None else []
    if not isinstance(raw, list) or not raw:
        raise BadClip("no caption: its sidecar has no 'shots' list (nor a 'caption')")
    shots = []
    for i, s in enumerate(raw, 1):
        if isinstance(s, str):
            s = {"caption": s}
        if not isinstance(s, dict):
            raise BadClip(f"shot {i} is not an object with a caption")
        caption = str(s.get("caption", s.get("prompt", "")) or "").strip()
        if not caption:
            raise BadClip(f"no caption for shot {i}")
        secs = ("start" in s) or ("end" in s)
        frames = ("start_frame" in s) or ("end_frame" in s)
        if secs and frames:
            raise BadClip(f"shot {i} gives both seconds and frames: use start/end or start_frame/end_frame")
        try:
            if frames:
                shot = ClipShot(caption, start_frame=int(s.get("start_frame", 0)),
                                end_frame=None if s.get("end_frame") is None else int(s["end_frame"]))
            else:
                shot = ClipShot(caption, start=float(s.get("start", 0.0)),
                                end=None if s.get("end") is None else float(s["end"]))
        except (TypeError, ValueError):
            raise BadClip(f"shot {i} has a start/end that is not a number") from None
        shots.append(shot)
    return Clip(name, video, tuple(shots), story, None if fps is None else float(fps))


def find_clips(source) -> tuple[list[Clip], list[tuple[str, str]]]:
    """(clips, skipped [(name, reason)]) from a folder of videos with sidecars, or a manifest file."""
    source = Path(source)
    if not source.exists():
        raise ValueError(f"training data {str(source)!r} does not exist: pass a folder of clips with "
                         f"sidecar .json files, or a manifest (.json / .jsonl)")
    clips, skipped = [], []
    if source.is_dir():
        videos = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not videos:
            raise ValueError(f"{source} holds no video clips ({', '.join(VIDEO_SUFFIXES)})")
        for v in videos:
            name = str(v.relative_to(source))
            side = v.with_suffix(".json")
            try:
                if not side.is_file():
                    raise BadClip(f"no caption: no sidecar {side.name} beside it")
                clips.append(parse_sidecar(_read_json(side), name, v))
            except BadClip as e:
                skipped.append((name, str(e)))
        return clips, skipped
    for i, entry in enumerate(_read_manifest(source)):
        name = str(entry.get("name") or entry.get("video") or f"entry {i + 1}") if isinstance(entry, dict) \
            else f"entry {i + 1}"
        try:
            if not isinstance(entry, dict) or not entry.get("video"):
                raise BadClip("manifest entry has no 'video' path")
            video = (source.parent / entry["video"]).resolve() if not Path(entry["video"]).is_absolute() \
                else Path(entry["video"])
            obj = entry
            if entry.get("sidecar"):
                side = Path(entry["sidecar"])
                side = side if side.is_absolute() else source.parent / side
                if not side.is_file():
                    raise BadClip(f"no caption: sidecar {side} does not exist")
                obj = _read_json(side)
            clips.append(parse_sidecar(obj, name, video))
        except BadClip as e:
            skipped.append((name, str(e)))
    return clips, skipped


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadClip(f"sidecar {path.name} is not valid JSON ({e})") from None


def _read_manifest(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("clips"), list):
            return obj["clips"]
        if isinstance(obj, list):
            return obj
    except json.JSONDecodeError:
        pass
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {path} line {lineno} is not JSON ({e}): a manifest is a JSON "
                                 f"list, {{\"clips\": [...]}}, or one JSON object per line") from None
    return out


# ---- decoding and cutting -------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSettings:
    width: int = 832
    height: int = 480
    fps: float = 16.0
    max_shot_frames: int = 81
    min_shot_frames: int = 5
    dtype: str = "bfloat16"
    shard_bytes: int = 1 << 30

    def __post_init__(self):
        check_size(self.width, self.height)
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        for name in ("max_shot_frames", "min_shot_frames"):
            v = getattr(self, name)
            if v < 1 or (v - 1) % TEMPORAL_RATIO:
                raise ValueError(f"{name} must be 4n+1 frames (the Wan VAE's clip lengths), got {v}")
        if self.min_shot_frames > self.max_shot_frames:
            raise ValueError("min_shot_frames is above max_shot_frames")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


def longest_valid(n: int, cap: int) -> int:
    """The longest 4n+1 frame count <= min(n, cap) (0 if n < 1)."""
    m = min(n, cap)
    return 0 if m < 1 else ((m - 1) // TEMPORAL_RATIO) * TEMPORAL_RATIO + 1


def shot_frame_indices(shot: ClipShot, src_fps: float, total: int, fps: float) -> list[int]:
    """Indices into the file's frames of one shot, resampled to `fps` (nearest earlier frame)."""
    if shot.start_frame is not None or shot.end_frame is not None:
        a = shot.start_frame or 0
        b = total if shot.end_frame is None else min(shot.end_frame, total)
        t0, t1 = a / src_fps, b / src_fps
    else:
        t0 = shot.start or 0.0
        t1 = total / src_fps if shot.end is None else min(shot.end, total / src_fps)
    if t1 <= t0:
        return []
    count = int(math.floor((t1 - t0) * fps + 1e-6))
    idx = [int(math.floor((t0 + k / fps) * src_fps + 1e-6)) for k in range(count)]
    return [i for i in idx if i < total]


def fit_frames(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, height, width] in [-1, 1]: scale to cover, centre-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)[None].contiguous()


def read_frames(path: Path) -> tuple[np.ndarray, float]:
    """All frames of a video (uint8 [T, H, W, 3]) and its frame rate; BadClip when unreadable."""
    from ..video import read_video

    try:
        frames, fps = read_video(path)
    except Exception as e:  # imageio/ffmpeg raise many kinds of errors for a broken file
        raise BadClip(f"unreadable video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise BadClip("the video has no frames")
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    if frames.shape[-1] != 3:
        raise BadClip(f"frames of shape {frames.shape[1:]} are not RGB")
    return frames, fps


def cut_clip(clip: Clip, settings: PrepareSettings, frames: np.ndarray | None = None,
             src_fps: float | None = None) -> tuple[list[torch.Tensor], ShotPlan]:
    """The clip's shots as videos [1, 3, 4n+1, height, width] in [-1, 1], and their ShotPlan."""
    if frames is None:
        frames, src_fps = read_frames(clip.video)
    src_fps = clip.fps or src_fps
    if not src_fps or src_fps <= 0:
        raise BadClip("the video has no frame rate: give \"fps\" in its sidecar")
    videos, shots = [], []
    for i, shot in enumerate(clip.shots, 1):
        idx = shot_frame_indices(shot, src_fps, frames.shape[0], settings.fps)
        n = longest_valid(len(idx), settings.max_shot_frames)
        if n < settings.min_shot_frames:
            raise BadClip(f"too short: shot {i} has {len(idx)} frames at {settings.fps:g} fps, fewer than "
                          f"min_shot_frames={settings.min_shot_frames}")
        videos.append(fit_frames(frames[idx[:n]], settings.width, settings.height))
        shots.append(Shot(shot.caption, n))
    return videos, ShotPlan(tuple(shots), story=clip.story, fps=settings.fps)


# ---- encoding into shards -------------------------------------------------------------------------


def trim_text(emb: torch.Tensor) -> torch.Tensor:
    """[1, L, D] or [L, D] -> [L', D] without the trailing all-zero padding rows (at least one row)."""
    e = emb[0] if emb.dim() == 3 else emb
    nonzero = (e != 0).any(dim=-1).nonzero()
    keep = int(nonzero[-1]) + 1 if nonzero.numel() else 1
    return e[:keep]


def encode_clip(videos: list[torch.Tensor], plan: ShotPlan, vae, text_encoder,
                settings: PrepareSettings) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
    """(latent [C, F, h, w], texts [[L_s, D]], latent frames per shot) of one cut clip."""
    lat, shot_frames = [], []
    h, w = settings.height // SPATIAL_RATIO, settings.width // SPATIAL_RATIO
    for v, shot in zip(videos, plan.shots):
        with torch.inference_mode():
            z = vae.encode(v)
        z = z.detach().float().cpu()
        f = shot.latent_frames()
        if z.dim() != 5 or z.shape[0] != 1 or tuple(z.shape[2:]) != (f, h, w):
            raise RuntimeError(f"the VAE turned a {tuple(v.shape)} video into a latent {tuple(z.shape)}; "
                               f"expected [1, C, {f}, {h}, {w}] (a Wan-compatible VAE: 4x in time, 8x in space)")
        lat.append(z[0])
        shot_frames.append(f)
    with torch.inference_mode():
        texts = text_encoder.encode(plan.prompts())
    texts = [trim_text(t.detach().float().cpu()) for t in texts]
    return torch.cat(lat, dim=1), texts, tuple(shot_frames)


class _ShardWriter:
    def __init__(self, out: Path, dtype: torch.dtype, shard_bytes: int):
        self.out, self.dtype, self.limit = out, dtype, shard_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.size, self.count, self.shards = 0, 0, 0

    @property
    def current(self) -> str:
        return f"shard-{self.shards:05d}.safetensors"

    def add(self, latent: torch.Tensor, texts: list[torch.Tensor]) -> tuple[str, str]:
        key = str(self.count)
        self.tensors[f"{key}.latent"] = latent.to(self.dtype).contiguous()
        for s, t in enumerate(texts):
            self.tensors[f"{key}.text.{s}"] = t.to(self.dtype).contiguous()
        self.size += sum(t.numel() * t.element_size() for t in [latent.to(self.dtype), *texts])
        self.count += 1
        where = (self.current, key)
        if self.size >= self.limit:
            self.flush()
        return where

    def flush(self) -> None:
        if not self.tensors:
            return
        from ..outputs import save_safetensors
        save_safetensors(self.tensors, self.out / self.current, metadata={"format": FORMAT})
        self.tensors, self.size, self.count = {}, 0, 0
        self.shards += 1


def prepare(source, out, vae, text_encoder, settings: PrepareSettings | None = None,
            progress: bool | Callable[[int, int], None] = True, log: Callable[[str], None] | None = print,
            encoder_names: dict | None = None) -> dict:
    """Encode every clip of `source` (folder or manifest) into shards in `out`; returns the index.

    vae: `encode(video [1, 3, T, H, W] in [-1, 1]) -> latent [1, C, F, H/8, W/8]`; text_encoder:
    `encode(list[str]) -> [Tensor [1, L, D]]` (moga.wan_io's, or a model's own). Bad clips are
    skipped and listed under "skipped" with the reason (and printed through `log`).
    progress: True for a tqdm bar (stderr), or a callable (done, total) called after every clip.
    """
    settings = settings or PrepareSettings()
    say = log or (lambda msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.safetensors")) or (out / "index.json").exists():
        raise ValueError(f"{out} already holds prepared shards: choose a new folder (or delete it)")
    clips, skipped = find_clips(source)
    writer = _ShardWriter(out, _DTYPES[settings.dtype], settings.shard_bytes)
    samples = []
    dims: dict = {}
    bar = clips
    tick = progress if callable(progress) else (lambda done, total: None)
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(clips, desc="prepare", unit="clip")
    for done, clip in enumerate(bar, 1):
        try:
            videos, plan = cut_clip(clip, settings)
        except BadClip as e:
            skipped.append((clip.name, str(e)))
            tick(done, len(clips))
            continue
        latent, texts, shot_frames = encode_clip(videos, plan, vae, text_encoder, settings)
        dims.setdefault("latent_channels", latent.shape[0])
        dims.setdefault("text_dim", texts[0].shape[-1])
        if latent.shape[0] != dims["latent_channels"] or texts[0].shape[-1] != dims["text_dim"]:
            raise RuntimeError("the encoders changed their output sizes between clips")
        shard, key = writer.add(latent, texts)
        c, f, h, w = latent.shape
        samples.append(dict(name=clip.name, shard=shard, key=key, shot_frames=list(shot_frames),
                            frames=list(plan.shot_frames), latent_shape=[c, f, h, w],
                            tokens=f * (h // PATCH[1]) * (w // PATCH[2]), captions=plan.prompts()))
        tick(done, len(clips))
    writer.flush()
    for name, why in skipped:
        say(f"skipped {name}: {why}")
    index = dict(format=FORMAT, version=VERSION, settings=dict(settings.__dict__, **dims,
                                                                **(encoder_names or {})),
                 samples=samples, skipped=[dict(name=n, reason=r) for n, r in skipped])
    write_json(out / "index.json", index)
    say(f"prepared {len(samples)} clips into {writer.shards} shard(s) in {out}; skipped {len(skipped)}")
    return index


# ---- reading shards -------------------------------------------------------------------------------


@dataclass
class Sample:
    name: str
    latent: torch.Tensor                  # [C, F, h, w] float32
    texts: list[torch.Tensor]             # per shot [1, L, D] float32
    shot_frames: tuple[int, ...]          # latent frames per shot
    tokens: int = 0


@dataclass
class ShardDataset:
    """The prepared shards of a folder: `len(ds)`, `ds[i] -> Sample` (read lazily, memory-mapped)."""

    folder: Path
    index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.folder = Path(self.folder)
        path = self.folder / "index.json"
        if not path.is_file():
            raise ValueError(f"{self.folder} has no index.json: it is not a folder made by `moga train prepare`")
        self.index = json.loads(path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path} is not a MoGA training shard index")
        if int(self.index.get("version", 0)) > VERSION:
            raise ValueError(f"{path} has shard format {self.index['version']}, newer than this moga reads "
                             f"({VERSION}): update the package")
        if not self.index["samples"]:
            raise ValueError(f"{self.folder} holds no usable clips (all were skipped: see index.json)")
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.index["samples"])

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    @property
    def samples(self) -> list[dict]:
        return self.index["samples"]

    def _get(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt", device="cpu")
        return h.get_tensor(key)

    def __getitem__(self, i: int) -> Sample:
        s = self.samples[i]
        latent = self._get(s["shard"], f"{s['key']}.latent").float()
        texts = [self._get(s["shard"], f"{s['key']}.text.{j}").float()[None]
                 for j in range(len(s["shot_frames"]))]
        return Sample(s["name"], latent, texts, tuple(s["shot_frames"]), int(s["tokens"]))

    def __getstate__(self):  # picklable for spawned ranks: handles are reopened there
        return {"folder": self.folder, "index": self.index}

    def __setstate__(self, state):
        self.folder, self.index, self._handles = state["folder"], state["index"], {}


def describe(index: dict) -> str:
    s = index["settings"]
    n = len(index["samples"])
    tok = [x["tokens"] for x in index["samples"]] or [0]
    return (f"{n} clips at {s['width']}x{s['height']} {s['fps']:g} fps, tokens {min(tok)}-{max(tok)}; "
            f"skipped {len(index['skipped'])}")


__all__ = ["prepare", "find_clips", "parse_sidecar", "cut_clip", "encode_clip", "PrepareSettings",
           "ShardDataset", "Sample", "BadClip", "Clip", "ClipShot", "trim_text", "longest_valid",
           "shot_frame_indices", "fit_frames", "describe"]
