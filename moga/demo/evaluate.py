"""Score a generated video of the synthetic world against its story, with a simple program.

Per frame: the background is the median colour of the frame's border; the object is every pixel far
from it (cleaned by a 3x3 opening); its colour is the nearest palette colour to the mean of its
inner pixels; its shape from two cues of its bounding box that survive blur (a
triangle's centroid sits low in its box; a square fills the box's corners, a circle does not); its
size from the box's shorter side; its position is the mask's centroid.
Per shot: colour / shape / size / background by vote over frames, the direction of motion from a
line fitted to the centroid track, smoothness as the share of frame-to-frame steps that stay close
to that line's constant velocity. Across shots: a shot that says "it" must show the same detected
identity (colour, shape, size) as the shot before it.

Nothing here looks at the generator: the same code scores rendered ground truth (~100%) and model
output.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, COLOURS, DIRECTIONS, SIZES, Story

OBJECT_DISTANCE = 60.0     # RGB distance (0-255) from the background that makes a pixel "object"
MIN_AREA_FRACTION = 0.002  # fewer object pixels than this share of the frame: nothing detected
MIN_TRAVEL = 0.10          # a shot must move at least this share of the side to have a direction
ASYM_TRIANGLE = 0.05       # centroid below the box centre by this share of its height: a triangle
CORNERS_SQUARE = 0.5       # corner patches fuller than this: a square

METRICS = ("colour", "shape", "size", "direction", "background", "consistency", "smoothness", "detected")


@dataclass
class FrameReading:
    detected: bool
    background: tuple[float, float, float]
    colour: str | None = None
    fill: float = 0.0                # mask area / bounding-box area
    half_width: float = 0.0          # half the box's shorter side, fraction of the side
    asym: float = 0.0                # (centroid - box centre) / box height: an upright triangle ~ +1/6
    corners: float = 0.0             # filled share of the box's four corner patches: square ~1, circle ~0.3
    centroid: tuple[float, float] | None = None  # pixels (x, y)


@dataclass
class ShotScore:
    colour: bool
    shape: bool
    size: bool
    direction: bool
    background: bool
    smoothness: float
    detected: float
    consistency: bool | None          # None: the shot introduces its object
    found: dict = field(default_factory=dict)  # what was detected (for reports)


def _nearest(rgb: torch.Tensor, table: dict) -> str:
    names = list(table)
    ref = torch.tensor([table[n] for n in names], dtype=torch.float32)
    return names[int(((ref - rgb) ** 2).sum(-1).argmin())]


def _as_uint8_scale(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in uint8 or [-1, 1] float -> float32 in 0..255."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        return video.float()
    return ((video.float().clamp(-1, 1) + 1.0) * 127.5)


def _dilate(m: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation of [T, H, W] bool (separable; outside the frame counts as False)."""
    x = m.clone()
    x[:, :, 1:] |= m[:, :, :-1]
    x[:, :, :-1] |= m[:, :, 1:]
    y = x.clone()
    y[:, 1:] |= x[:, :-1]
    y[:, :-1] |= x[:, 1:]
    return y


def read_frames(video: torch.Tensor) -> list[FrameReading]:
    """Detect the object in every frame of [3, T, H, W] (uint8 or float in [-1, 1])."""
    v = _as_uint8_scale(video).permute(1, 0, 2, 3)  # [T, 3, H, W]
    t, _, h, w = v.shape
    border = torch.cat([v[:, :, :2].flatten(2), v[:, :, -2:].flatten(2),
                        v[:, :, :, :2].flatten(2), v[:, :, :, -2:].flatten(2)], dim=2)
    bg = border.median(dim=2).values  # [T, 3]
    dist = (v - bg[:, :, None, None]).pow(2).sum(1).sqrt()  # [T, H, W]
    mask = dist > OBJECT_DISTANCE                                   # [T, H, W] bool
    opened = _dilate(~_dilate(~mask))                               # opening: drop specks
    core = ~_dilate(~opened)                                        # eroded: colour without edges
    for _ in range(3):  # grow back thin parts joined to the body (a triangle's apex), not specks
        opened = _dilate(opened) & mask
    m = opened
    core = torch.where(core.flatten(1).sum(1).view(t, 1, 1) >= 4, core, m)
    area = m.flatten(1).sum(1)
    cw = core.flatten(1).sum(1).clamp_min(1)
    rgb = (v * core.unsqueeze(1)).flatten(2).sum(2) / cw[:, None]       # mean colour of the core
    cols, rows = m.any(1), m.any(2)                                      # [T, W], [T, H]
    idx_w, idx_h = torch.arange(w), torch.arange(h)
    bw = torch.where(cols, idx_w, -1).amax(1) - torch.where(cols, idx_w, w).amin(1) + 1
    bh = torch.where(rows, idx_h, -1).amax(1) - torch.where(rows, idx_h, h).amin(1) + 1
    fm = m.float()
    cx = (fm * (idx_w.float() + 0.5)).flatten(1).sum(1) / area.clamp_min(1)
    cy = (fm * (idx_h.float() + 0.5).view(h, 1)).flatten(1).sum(1) / area.clamp_min(1)
    readings = []
    for i in range(t):
        bgi = tuple(float(x) for x in bg[i])
        if int(area[i]) < MIN_AREA_FRACTION * h * w:
            readings.append(FrameReading(False, bgi))
            continue
        x0 = int(torch.where(cols[i], idx_w, w).amin())
        y0 = int(torch.where(rows[i], idx_h, h).amin())
        bwi, bhi = int(bw[i]), int(bh[i])
        pw, ph = max(bwi // 4, 1), max(bhi // 4, 1)
        box = m[i, y0:y0 + bhi, x0:x0 + bwi].float()
        corners = (box[:ph, :pw].mean() + box[:ph, -pw:].mean() + box[-ph:, :pw].mean()
                   + box[-ph:, -pw:].mean()) / 4
        readings.append(FrameReading(
            True, bgi, _nearest(rgb[i], COLOURS), float(area[i]) / float(bwi * bhi),
            0.5 * min(bwi, bhi) / w, centroid=(float(cx[i]), float(cy[i])),
            asym=(float(cy[i]) - (y0 + 0.5 * bhi)) / bhi, corners=float(corners)))
    return readings


def shape_of(asym: float, corners: float) -> str:
    """Upright triangles are bottom-heavy; squares fill their box's corners, circles do not.
    Both cues survive blur and motion smear, which a plain fill ratio does not."""
    if asym > ASYM_TRIANGLE:
        return "triangle"
    return "square" if corners > CORNERS_SQUARE else "circle"


def size_of_half_width(half: float) -> str:
    small, large = SIZES["small"], SIZES["large"]
    return "small" if half < 0.5 * (small + large) else "large"


def _direction(track: torch.Tensor, side: int) -> tuple[str | None, torch.Tensor]:
    """Least-squares constant velocity [2] (px/frame) of a [n, 3] (frame, x, y) track -> its direction."""
    f = track[:, 0]
    fc = f - f.mean()
    denom = (fc * fc).sum()
    if track.shape[0] < 2 or float(denom) == 0.0:
        return None, torch.zeros(2)
    vel = (fc[:, None] * (track[:, 1:] - track[:, 1:].mean(0))).sum(0) / denom
    span = float(f.max() - f.min())
    travel = vel * span
    axis = int(travel.abs().argmax())
    if float(travel.abs()[axis]) < MIN_TRAVEL * side:
        return None, vel
    sign = 1 if float(travel[axis]) > 0 else -1
    step = (sign, 0) if axis == 0 else (0, sign)
    return next(k for k, d in DIRECTIONS.items() if d == step), vel


def _smoothness(track: torch.Tensor, vel: torch.Tensor, frames: int) -> float:
    """Share of the shot's frame-to-frame steps that exist and stay near the constant velocity."""
    if frames < 2:
        return 1.0
    good = 0
    tol = max(2.0, 0.75 * float(vel.norm()))
    by_frame = {int(r[0]): r[1:] for r in track}
    for i in range(frames - 1):
        a, b = by_frame.get(i), by_frame.get(i + 1)
        if a is not None and b is not None and float(((b - a) - vel).norm()) <= tol:
            good += 1
    return good / (frames - 1)


def score_story(video: torch.Tensor, story: Story) -> list[ShotScore]:
    """Score a video [3, T, H, W] (uint8 or [-1, 1]) against the story it should show."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    if video.shape[1] != story.num_frames:
        raise ValueError(f"the video has {video.shape[1]} frames but the story's shots "
                         f"{story.shot_frames} make {story.num_frames}")
    side = video.shape[-1]
    readings = read_frames(video)
    scores: list[ShotScore] = []
    start = 0
    for k, shot in enumerate(story.shots):
        frames = readings[start:start + shot.frames]
        start += shot.frames
        seen = [(i, r) for i, r in enumerate(frames) if r.detected]
        bg = _nearest(torch.tensor([sum(r.background[c] for r in frames) / len(frames) for c in range(3)]),
                      BACKGROUNDS)
        if seen:
            colour = Counter(r.colour for _, r in seen).most_common(1)[0][0]
            med = lambda a: float(torch.tensor([getattr(r, a) for _, r in seen]).median())  # noqa: E731
            fill, half = med("fill"), med("half_width")
            shape, size = shape_of(med("asym"), med("corners")), size_of_half_width(half)
            track = torch.tensor([(i, *r.centroid) for i, r in seen], dtype=torch.float32)
            direction, vel = _direction(track, side)
            smooth = _smoothness(track, vel, shot.frames)
        else:
            colour = shape = size = direction = None
            fill = half = 0.0
            smooth = 0.0
        found = {"colour": colour, "shape": shape, "size": size, "direction": direction,
                 "background": bg, "fill": round(fill, 3), "half_width": round(half, 4),
                 "asym": round(med("asym"), 3) if seen else 0.0,
                 "corners": round(med("corners"), 3) if seen else 0.0}
        consistency = None
        if not shot.new and k > 0:
            prev = scores[-1].found
            consistency = bool(seen) and all(prev[a] == found[a] and found[a] is not None
                                             for a in ("colour", "shape", "size"))
        t = shot.thing
        scores.append(ShotScore(
            colour=colour == t.colour, shape=shape == t.shape, size=size == t.size,
            direction=direction == shot.direction, background=bg == shot.background,
            smoothness=smooth, detected=len(seen) / shot.frames, consistency=consistency,
            found=found))
    return scores


def summarize(all_scores: list[list[ShotScore]]) -> dict:
    """Percentages over every shot of every story (consistency over the shots that say 'it')."""
    shots = [s for story in all_scores for s in story]
    if not shots:
        raise ValueError("nothing to summarize: no scored shots")
    pct = lambda xs: round(100.0 * sum(float(x) for x in xs) / len(xs), 2) if xs else None  # noqa: E731
    out = {m: pct([getattr(s, m) for s in shots]) for m in METRICS if m != "consistency"}
    out["consistency"] = pct([s.consistency for s in shots if s.consistency is not None])
    out["stories"] = len(all_scores)
    out["shots"] = len(shots)
    return {k: out[k] for k in (*METRICS, "stories", "shots")}


def shot_report(scores: list[ShotScore]) -> list[dict]:
    return [asdict(s) for s in scores]
