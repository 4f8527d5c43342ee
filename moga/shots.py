"""The shot plan: what a story is made of (prompts and lengths), and where each shot lies in time.

A plan is a list of shots laid end to end along time in ONE latent sequence. Each shot is its own
4n+1-frame clip for the Wan VAE (4 pixel frames per latent frame after a first frame of its own), so it
is encoded and decoded alone and a cut stays a clean cut. Everything that follows from the lengths
(latent frames per shot, frame and latent boundaries, the token layout) is computed here and nowhere else.

Conditioning: the text of shot i is `story + " " + shot.prompt` (`ShotPlan.prompts()`, the one place that
joins them); the model cross-attends each shot's video tokens to its own text only.

Positions: time positions run on across shots (one story, one clock): latent frame f of the whole
sequence gets RoPE time position f, whatever shot it is in. The model computes RoPE (moga.model) from
the global latent frame index; `frame_positions()` states the rule for anyone who needs it.

Text form (what a person types), one shot per line:

    # comments and blank lines are ignored
    story: a knight in red armour, cinematic
    negative: blurry, low quality
    [41] the knight rides through a forest
    the knight reaches a castle [2.5s]
    she opens the gate

`[41]` is a length in frames (must be 4n+1), `[2.5s]` in seconds (rounded to the nearest 4n+1 frame
count at the plan's fps, e.g. 2.5 s at 16 fps -> 41 frames); a line without one gets the default
seconds per shot. The tag may stand at the start or at the end of the line.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TEMPORAL_RATIO = 4  # Wan VAE: 4 pixel frames per latent frame (after the first)
SPATIAL_RATIO = 8   # Wan VAE: 8x8 pixels per latent pixel
PATCH = (1, 2, 2)   # Wan DiT: latent frames x rows x cols per token
DEFAULT_FPS = 16    # Wan2.1's sample_fps
DEFAULT_SECONDS = 5.0  # 81 frames at 16 fps, Wan2.1's default clip
# A hard bound on a story's latent frames: Wan2.1 defines RoPE positions 0..1023 per axis (rope_params(1024));
# moga.preflight refuses a whole video past it. A shot gets the same bound (4,093 frames, 4.3 min at 16 fps),
# so every length an error suggests is also a length the preflight accepts; it turns a typo like [100001]
# into an error instead of a run (memory is checked before sampling).
MAX_LATENT_FRAMES = 1024
MAX_SHOT_FRAMES = (MAX_LATENT_FRAMES - 1) * TEMPORAL_RATIO + 1


def is_valid_frames(frames: int, temporal_ratio: int = TEMPORAL_RATIO) -> bool:
    return isinstance(frames, int) and frames >= 1 and (frames - 1) % temporal_ratio == 0


def nearest_valid_frames(frames: float, temporal_ratio: int = TEMPORAL_RATIO,
                         limit: int = MAX_SHOT_FRAMES) -> tuple[int, ...]:
    """The valid lengths (k*ratio + 1, at most `limit`) around `frames`: one if it is valid, below 1 or
    above the limit, else two."""
    if frames <= 1:
        return (1,)
    top = (limit - 1) // temporal_ratio * temporal_ratio + 1
    if frames >= top:
        return (top,)
    low = int(math.floor((frames - 1) / temporal_ratio)) * temporal_ratio + 1
    if low == frames:
        return (int(frames),)
    return (low, low + temporal_ratio)


def check_frames(frames, temporal_ratio: int = TEMPORAL_RATIO, what: str = "shot") -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, float)) or frames != int(frames):
        raise ValueError(f"{what} length {frames!r} is not a whole number of frames")
    frames = int(frames)
    if frames > MAX_SHOT_FRAMES:
        raise ValueError(
            f"{what} length {frames} frames is over the limit of {MAX_SHOT_FRAMES} frames per shot "
            f"({(MAX_SHOT_FRAMES - 1) / DEFAULT_FPS / 60:.1f} min at {DEFAULT_FPS} fps): use at most "
            f"{nearest_valid_frames(frames, temporal_ratio)[0]} frames, or split it into several shots")
    if not is_valid_frames(frames, temporal_ratio):
        near = " or ".join(str(v) for v in nearest_valid_frames(frames, temporal_ratio))
        raise ValueError(
            f"{what} length {frames} frames is not {temporal_ratio}n+1 (each shot is its own clip for "
            f"the Wan VAE): use {near} frames")
    return frames


def seconds_to_frames(seconds: float, fps: float, temporal_ratio: int = TEMPORAL_RATIO) -> int:
    """Seconds -> the nearest 4n+1 frame count (ties go to the longer clip; at least 1 frame)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)) or seconds <= 0:
        raise ValueError(f"a shot length in seconds must be > 0, got {seconds!r}")
    n = math.floor((seconds * fps - 1) / temporal_ratio + 0.5)
    return max(n, 0) * temporal_ratio + 1


def frame_positions(shot_latent_frames) -> list[int]:
    """RoPE time position of every latent frame: it runs on across shots (one story, one clock)."""
    return list(range(sum(int(f) for f in shot_latent_frames)))


@dataclass(frozen=True)
class Shot:
    prompt: str
    frames: int = 81

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"a shot needs a non-empty prompt, got {self.prompt!r}")
        object.__setattr__(self, "prompt", self.prompt.strip())
        object.__setattr__(self, "frames", check_frames(self.frames))

    def latent_frames(self, temporal_ratio: int = TEMPORAL_RATIO) -> int:
        return (self.frames - 1) // temporal_ratio + 1


@dataclass(frozen=True)
class ShotPlan:
    shots: tuple[Shot, ...]
    story: str = ""
    negative: str = ""
    fps: float = DEFAULT_FPS
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        shots = tuple(self.shots)
        if not shots:
            raise ValueError("the shot plan has no shots: give at least one shot (one prompt per line)")
        for s in shots:
            if not isinstance(s, Shot):
                raise ValueError(f"ShotPlan.shots must hold Shot values, got {s!r}")
        object.__setattr__(self, "shots", shots)
        object.__setattr__(self, "story", (self.story or "").strip())
        object.__setattr__(self, "negative", (self.negative or "").strip())
        if not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise ValueError(f"fps must be > 0, got {self.fps!r}")

    # ---- lengths and boundaries --------------------------------------------------------------
    @property
    def num_shots(self) -> int:
        return len(self.shots)

    @property
    def shot_frames(self) -> tuple[int, ...]:
        return tuple(s.frames for s in self.shots)

    def latent_shot_frames(self, temporal_ratio: int = TEMPORAL_RATIO) -> tuple[int, ...]:
        return tuple(s.latent_frames(temporal_ratio) for s in self.shots)

    @property
    def total_frames(self) -> int:
        return sum(self.shot_frames)

    def total_latent_frames(self, temporal_ratio: int = TEMPORAL_RATIO) -> int:
        return sum(self.latent_shot_frames(temporal_ratio))

    @property
    def seconds(self) -> float:
        return self.total_frames / self.fps

    @property
    def frame_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, end) pixel-frame range of each shot in the decoded video."""
        return _ranges(self.shot_frames)

    def latent_ranges(self, temporal_ratio: int = TEMPORAL_RATIO) -> tuple[tuple[int, int], ...]:
        """[start, end) latent-frame range of each shot in the latent sequence."""
        return _ranges(self.latent_shot_frames(temporal_ratio))

    def latent_size(self, width: int, height: int, temporal_ratio: int = TEMPORAL_RATIO,
                    spatial_ratio: int = SPATIAL_RATIO) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) for a video of width x height pixels."""
        check_size(width, height, spatial_ratio * PATCH[1])
        return (self.total_latent_frames(temporal_ratio), height // spatial_ratio, width // spatial_ratio)

    def token_layout(self, width: int, height: int, temporal_ratio: int = TEMPORAL_RATIO,
                     spatial_ratio: int = SPATIAL_RATIO, patch=PATCH):
        """The TokenLayout of this plan at width x height pixels (what the DiT's attention sees)."""
        from .attention.layout import TokenLayout
        f, h, w = self.latent_size(width, height, temporal_ratio, spatial_ratio)
        shots = self.latent_shot_frames(temporal_ratio)
        if patch[0] != 1:
            raise ValueError(f"temporal patch {patch[0]} is not supported (Wan2.1 uses 1)")
        return TokenLayout(f, h // patch[1], w // patch[2], shots)

    # ---- conditioning ------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        """The text each shot is conditioned on: story prompt + shot prompt (the one place they join)."""
        return [f"{self.story} {s.prompt}" if self.story else s.prompt for s in self.shots]

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_prompts(cls, prompts, frames=None, seconds: float = DEFAULT_SECONDS, story: str = "",
                     negative: str = "", fps: float = DEFAULT_FPS) -> "ShotPlan":
        """From Python: a list of prompts, with one length (int) or a list of lengths in frames
        (None: `seconds` each)."""
        prompts = list(prompts)
        if frames is None:
            frames = [seconds_to_frames(seconds, fps)] * len(prompts)
        elif isinstance(frames, int):
            frames = [frames] * len(prompts)
        frames = list(frames)
        if len(frames) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(frames)} lengths: give one length per shot")
        return cls(tuple(Shot(p, f) for p, f in zip(prompts, frames)), story, negative, fps)

    @classmethod
    def parse_text(cls, text: str, default_seconds: float = DEFAULT_SECONDS, fps: float = DEFAULT_FPS,
                   story: str = "", negative: str = "") -> "ShotPlan":
        """The plain text form (see the module docstring). `story:`/`negative:` lines override the
        arguments."""
        shots = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key = _DIRECTIVE.match(line)
            if key:
                name, value = key.group(1).lower(), key.group(2).strip()
                if name == "story":
                    story = value
                else:
                    negative = value
                continue
            try:
                prompt, frames, seconds = _split_length(line)
                if frames is None:
                    frames = seconds_to_frames(default_seconds if seconds is None else seconds, fps)
                shots.append(Shot(prompt, frames))
            except ValueError as e:
                raise ValueError(f"shot list line {lineno} ({line!r}): {e}") from None
        if not shots:
            raise ValueError("the shot list has no shots: write one prompt per line "
                             "(blank lines and lines starting with '#' are ignored)")
        return cls(tuple(shots), story, negative, fps)

    @classmethod
    def from_json(cls, obj, default_seconds: float | None = None, fps: float | None = None) -> "ShotPlan":
        """A dict {"shots": [...], "story", "negative", "fps", "seconds"} or a bare list of shots; each shot
        a string or {"prompt", "frames" | "seconds"}. `obj` may also be JSON text or a file path.
        `fps` / `default_seconds` given here win over the file's; None: the file's, else 16 fps / 5 s."""
        if isinstance(obj, (str, os.PathLike)):
            text = str(obj)
            if not text.lstrip().startswith(("{", "[")):
                text = Path(obj).read_text(encoding="utf-8")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"the shot plan is not valid JSON: {e}") from None
        if isinstance(obj, list):
            obj = {"shots": obj}
        if not isinstance(obj, dict) or "shots" not in obj:
            raise ValueError('a JSON shot plan is {"shots": [...], "story": ..., "negative": ..., "fps": ...} '
                             "or a list of shots")
        fps = fps if fps is not None else obj.get("fps", DEFAULT_FPS)
        if default_seconds is None:
            default_seconds = obj.get("seconds", DEFAULT_SECONDS)
        shots = []
        for i, item in enumerate(obj["shots"]):
            try:
                if isinstance(item, str):
                    item = {"prompt": item}
                if not isinstance(item, dict):
                    raise ValueError("a shot is a string or {\"prompt\": ..., \"frames\" or \"seconds\": ...}")
                unknown = set(item) - {"prompt", "frames", "seconds"}
                if unknown:
                    raise ValueError(f"unknown keys {sorted(unknown)} (use prompt, frames, seconds)")
                if "frames" in item and "seconds" in item:
                    raise ValueError("give frames or seconds, not both")
                frames = item.get("frames")
                if frames is None:
                    frames = seconds_to_frames(item.get("seconds", default_seconds), fps)
                shots.append(Shot(item.get("prompt", ""), frames))
            except ValueError as e:
                raise ValueError(f"shot {i + 1}: {e}") from None
        return cls(tuple(shots), obj.get("story", ""), obj.get("negative", ""), fps)

    @classmethod
    def load(cls, path, default_seconds: float | None = None, fps: float | None = None) -> "ShotPlan":
        """A file: JSON if it ends in .json (or parses as JSON), the text form otherwise. None: the
        file's values (JSON), else 5 s per shot at 16 fps."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"shot list {str(path)!r} does not exist: write one prompt per line in a "
                             ".txt file, or a JSON plan")
        text = _read_utf8(path)
        if path.suffix.lower() == ".json":
            return cls.from_json(text if text.strip() else {"shots": []}, default_seconds, fps)
        if text.lstrip().startswith(("{", "[")):  # JSON without the suffix; '[41] a shot' is the text form
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if obj is not None:
                return cls.from_json(obj, default_seconds, fps)
        return cls.parse_text(text, DEFAULT_SECONDS if default_seconds is None else default_seconds,
                              DEFAULT_FPS if fps is None else fps)

    def to_json(self) -> dict:
        return {"story": self.story, "negative": self.negative, "fps": self.fps,
                "shots": [{"prompt": s.prompt, "frames": s.frames} for s in self.shots]}

    def describe(self) -> str:
        lines = [f"{self.num_shots} shots, {self.total_frames} frames ({self.seconds:.1f} s at {self.fps:g} fps), "
                 f"{self.total_latent_frames()} latent frames"]
        for i, (s, (a, b)) in enumerate(zip(self.shots, self.frame_ranges)):
            lines.append(f"  shot {i + 1}: frames {a}-{b - 1} ({s.frames}) {s.prompt[:60]}")
        return "\n".join(lines)


def _read_utf8(path: Path) -> str:
    """A shot file's text; a byte that is not UTF-8 is named with the file, its offset and its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a BOM from Windows editors is fine
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"shot list {str(path)!r} is not UTF-8 text: byte {e.start} (0x{raw[e.start]:02x}, "
                         f"line {line}) cannot be decoded; save the file as UTF-8") from None


def check_size(width: int, height: int, multiple: int = SPATIAL_RATIO * PATCH[1]) -> None:
    """Pixel sizes must be multiples of 16 (VAE 8x, patch 2x); the error names the nearest valid ones."""
    bad = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
            try:
                low = int(v) // multiple * multiple
            except (TypeError, ValueError):
                low = 0
            near = [low, low + multiple] if low >= multiple else [multiple]
            bad.append(f"{name} {v} (nearest valid: {' or '.join(map(str, near))})")
    if bad:
        raise ValueError(f"video size must be a multiple of {multiple} pixels on each side: " + ", ".join(bad))


_DIRECTIVE = re.compile(r"^(story|negative)\s*:\s*(.*)$", re.IGNORECASE)
_TAG = r"\[\s*([0-9]*\.?[0-9]+)\s*(s|sec|f|frames)?\s*\]"
_LEAD = re.compile(r"^" + _TAG + r"\s*(.*)$", re.IGNORECASE)
_TRAIL = re.compile(r"^(.*?)\s*" + _TAG + r"$", re.IGNORECASE)


def _split_length(line: str):
    """'[41] prompt' / 'prompt [2.5s]' -> (prompt, frames or None, seconds or None)."""
    m = _LEAD.match(line)
    if m:
        number, unit, prompt = m.group(1), m.group(2), m.group(3)
    else:
        m = _TRAIL.match(line)
        if not m:
            if re.search(r"\[[^\]]*\]\s*$|^\s*\[[^\]]*\]", line):
                raise ValueError("a length tag is [frames] (e.g. [41]) or [seconds s] (e.g. [2.5s])")
            return line, None, None
        prompt, number, unit = m.group(1), m.group(2), m.group(3)
    if unit and unit.lower().startswith("s"):
        return prompt, None, float(number)
    if "." in number:
        raise ValueError(f"[{number}] is not a whole number of frames; for seconds write [{number}s]")
    return prompt, int(number), None


def _ranges(lengths) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return tuple(out)
