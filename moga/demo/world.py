"""The synthetic multi-shot world the demo model learns: one object, plain backgrounds, shots with captions.

A story is a list of shots. Each shot shows one object (a colour, a shape, a size) moving in a stated
direction over a plain background, and carries a caption from a small grammar:

    a large red circle moves left on a grey background      (a new object)
    it moves up on a black background                       (the same object as the shot before)

"it" keeps the object of the previous shot, so a model can only draw it right by looking back across
the cut: that is what the cross-shot consistency score measures. Everything is deterministic from a
seed. Rendering is vectorised torch (CPU or GPU), so a trainer can draw fresh stories every step.

Each shot is its own clip of `shot_frames` (4n+1) pixel frames, as in `moga.shots`.
"""
from __future__ import annotations

import hashlib
import random
from functools import lru_cache
import re
from dataclasses import dataclass, field
from itertools import product

import torch

# Object colours are far apart in RGB (nearest pair ~85) and from every background (>= 95), so a
# nearest-colour rule separates them even after a lossy codec.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "orange": (245, 140, 30),
    "yellow": (245, 225, 50),
    "green": (45, 170, 70),
    "blue": (45, 90, 225),
    "purple": (150, 65, 205),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent of the object as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.15, "large": 0.24}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Every word a caption may use, in a fixed order (the text encoder's vocabulary follows it).
VOCAB: tuple[str, ...] = (
    "<pad>", "<bos>", "<unk>", "a", "it", "moves", "on", "background",
    *SIZES, *COLOURS, *SHAPES, *DIRECTIONS, *BACKGROUNDS,
)

DEFAULT_SIZE = 128          # pixels per side
DEFAULT_SHOT_FRAMES = 17    # 4n+1 pixel frames per shot -> 5 latent frames
TRAVEL = (0.30, 0.40)       # distance an object travels in one shot, fraction of the side
MARGIN = 0.04               # gap kept between the object and the frame edge


@dataclass(frozen=True)
class Thing:
    """An object's identity: what must stay the same across shots."""
    colour: str
    shape: str
    size: str

    def __post_init__(self):
        for value, allowed, name in ((self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
                                     (self.size, SIZES, "size")):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: use one of {sorted(allowed)}")


@dataclass(frozen=True)
class ShotSpec:
    thing: Thing
    direction: str
    background: str
    new: bool                      # True: the caption introduces the object ("a ..."), else "it"
    start: tuple[float, float]     # object centre at the first frame, fractions of the side (x, y)
    travel: float                  # distance over the shot, fraction of the side
    frames: int = DEFAULT_SHOT_FRAMES

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}: use one of {list(DIRECTIONS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}: use one of {list(BACKGROUNDS)}")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"a shot has 4n+1 frames (1, 5, 9, 17, ...), got {self.frames}")

    @property
    def caption(self) -> str:
        where = f"moves {self.direction} on a {self.background} background"
        if self.new:
            t = self.thing
            return f"a {t.size} {t.colour} {t.shape} {where}"
        return f"it {where}"

    def centres(self) -> torch.Tensor:
        """[frames, 2] object centre (x, y) per frame, fractions of the side."""
        dx, dy = DIRECTIONS[self.direction]
        s = torch.linspace(0.0, 1.0, self.frames, dtype=torch.float64) if self.frames > 1 \
            else torch.zeros(1, dtype=torch.float64)
        x = self.start[0] + dx * self.travel * s
        y = self.start[1] + dy * self.travel * s
        return torch.stack([x, y], dim=1)


@dataclass(frozen=True)
class Story:
    shots: tuple[ShotSpec, ...]
    size: int = DEFAULT_SIZE
    seed: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.shots:
            raise ValueError("a story needs at least one shot")
        if not self.shots[0].new:
            raise ValueError("the first shot must introduce its object ('a ...'), not say 'it'")
        if self.size % 16:
            raise ValueError(f"frame size {self.size} must be a multiple of 16 (8x codec, 2x2 patches)")
        object.__setattr__(self, "shots", tuple(self.shots))

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.shots]

    @property
    def shot_frames(self) -> list[int]:
        return [s.frames for s in self.shots]

    @property
    def num_frames(self) -> int:
        return sum(self.shot_frames)

    def identities(self) -> list[int]:
        """Per shot, the index of the shot that introduced its object (equal index = same object)."""
        ids, current = [], 0
        for i, shot in enumerate(self.shots):
            if shot.new:
                current = i
            ids.append(current)
        return ids


# ----------------------------------------------------------------------------------------------
# Held-out prompts: a fixed ~10% of all (size, colour, shape, direction, background) captions never
# appear in training stories; evaluation stories open with them.

def _tuple_key(thing: Thing, direction: str, background: str) -> str:
    return f"{thing.size} {thing.colour} {thing.shape} {direction} {background}"


def is_held_out(thing: Thing, direction: str, background: str) -> bool:
    digest = hashlib.sha256(_tuple_key(thing, direction, background).encode()).digest()
    return digest[0] % 10 == 0


ALL_TUPLES = [(Thing(c, s, z), d, b) for z, c, s, d, b in
              product(SIZES, COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]


@lru_cache(maxsize=1)
def _held_out() -> tuple[tuple[Thing, str, str], ...]:
    return tuple(t for t in ALL_TUPLES if is_held_out(*t))


@lru_cache(maxsize=None)
def _held_out_key(thing: Thing, direction: str, background: str) -> bool:
    return is_held_out(thing, direction, background)


def held_out_tuples() -> list[tuple[Thing, str, str]]:
    return list(_held_out())


# ----------------------------------------------------------------------------------------------
# Sampling stories

def _start(rng: random.Random, thing: Thing, direction: str, travel: float) -> tuple[float, float]:
    half = SIZES[thing.size] * 1.05 + MARGIN
    dx, dy = DIRECTIONS[direction]
    lo, hi = half, 1.0 - half

    def axis(d: int) -> float:
        if d > 0:
            return rng.uniform(lo, hi - travel)
        if d < 0:
            return rng.uniform(lo + travel, hi)
        return rng.uniform(lo, hi)

    return (axis(dx), axis(dy))


def _shot(rng: random.Random, thing: Thing, direction: str, background: str, new: bool,
          frames: int) -> ShotSpec:
    travel = rng.uniform(*TRAVEL)
    return ShotSpec(thing, direction, background, new, _start(rng, thing, direction, travel), travel,
                    frames)


def sample_story(seed: int, num_shots: int = 4, split: str = "train", p_new: float = 0.25,
                 size: int = DEFAULT_SIZE, shot_frames: int = DEFAULT_SHOT_FRAMES) -> Story:
    """A random story, deterministic in `seed`.

    split="train": no shot's (object, direction, background) is a held-out tuple.
    split="heldout": the first shot's tuple is held out (a prompt never seen in training).
    p_new: chance that a later shot introduces a new object instead of continuing ("it").
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    rng = random.Random(f"moga-demo-story:{seed}:{split}")
    shots: list[ShotSpec] = []
    held = _held_out()
    colours, sizes, directions, backgrounds = list(COLOURS), list(SIZES), list(DIRECTIONS), list(BACKGROUNDS)
    for i in range(num_shots):
        while True:
            if i == 0 and split == "heldout":
                thing, direction, background = rng.choice(held)
                new = True
            else:
                new = i == 0 or rng.random() < p_new
                if new:
                    thing = Thing(rng.choice(colours), rng.choice(SHAPES), rng.choice(sizes))
                    if i > 0 and thing == shots[-1].thing:
                        continue
                else:
                    thing = shots[-1].thing
                direction = rng.choice(directions)
                background = rng.choice(backgrounds)
                if split == "train" and _held_out_key(thing, direction, background):
                    continue
            break
        shots.append(_shot(rng, thing, direction, background, new, shot_frames))
    return Story(tuple(shots), size=size, seed=seed)


def heldout_stories(count: int, num_shots: int = 4, seed: int = 0, **kw) -> list[Story]:
    """`count` evaluation stories that open with prompts never seen in training."""
    return [sample_story(seed * 100003 + i, num_shots, split="heldout", **kw) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Captions -> stories (so `moga demo` can take prompts and still be scored)

_WORD = re.compile(r"[a-z<>]+")


def tokenize(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def parse_caption(caption: str) -> dict:
    """Read a caption of the grammar back: {'new', 'size', 'colour', 'shape', 'direction', 'background'}.

    Missing parts are None. Raises ValueError on words outside the vocabulary.
    """
    words = tokenize(caption)
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise ValueError(f"caption {caption!r} uses words outside the demo vocabulary: {unknown}; "
                         f"the demo model knows: {' '.join(VOCAB[3:])}")
    pick = lambda pool: next((w for w in words if w in pool), None)  # noqa: E731
    return {
        "new": "it" not in words,
        "size": pick(SIZES), "colour": pick(COLOURS), "shape": pick(SHAPES),
        "direction": pick(DIRECTIONS), "background": pick(BACKGROUNDS),
    }


def story_from_captions(captions: list[str], seed: int = 0, size: int = DEFAULT_SIZE,
                        shot_frames: int = DEFAULT_SHOT_FRAMES) -> Story:
    """The world's story for captions of the grammar (start positions drawn from `seed`)."""
    rng = random.Random(f"moga-demo-captions:{seed}")
    shots: list[ShotSpec] = []
    for i, caption in enumerate(captions):
        p = parse_caption(caption)
        missing = [k for k in ("direction", "background") if p[k] is None]
        if p["new"]:
            missing += [k for k in ("size", "colour", "shape") if p[k] is None]
        if missing:
            raise ValueError(f"shot {i + 1} caption {caption!r} does not say its {', '.join(missing)}; "
                             f"write e.g. 'a large red circle moves left on a grey background' "
                             f"or 'it moves up on a black background'")
        if p["new"]:
            thing = Thing(p["colour"], p["shape"], p["size"])
        elif shots:
            thing = shots[-1].thing
        else:
            raise ValueError(f"the first caption {caption!r} says 'it': introduce the object first")
        shots.append(_shot(rng, thing, p["direction"], p["background"], p["new"], shot_frames))
    return Story(tuple(shots), size=size, seed=seed)


# ----------------------------------------------------------------------------------------------
# Rendering

def _rgb(name_table: dict, name: str) -> torch.Tensor:
    return torch.tensor(name_table[name], dtype=torch.float32) / 127.5 - 1.0


_RGB_BG = {k: [c / 127.5 - 1.0 for c in v] for k, v in BACKGROUNDS.items()}
_RGB_FG = {k: [c / 127.5 - 1.0 for c in v] for k, v in COLOURS.items()}


def _coverage(shape: str, px: torch.Tensor, py: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
              r: float) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from an (approximate) signed distance, in pixels."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        d = torch.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        d = torch.maximum(dx.abs(), dy.abs()) - r
    else:  # upright isosceles triangle filling the lower-half of its 2r x 2r box diagonally
        d = torch.maximum(dy - r, (2.0 * dx.abs() - (dy + r)) / 5 ** 0.5)
    return (0.5 - d).clamp(0.0, 1.0)


def render_shot(shot: ShotSpec, size: int = DEFAULT_SIZE, device="cpu") -> torch.Tensor:
    """[3, frames, size, size] float32 in [-1, 1]."""
    axis = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    py, px = axis.view(1, size, 1), axis.view(1, 1, size)
    c = (shot.centres().float() * size).to(device)
    cx, cy = c[:, 0].view(-1, 1, 1), c[:, 1].view(-1, 1, 1)
    cov = _coverage(shot.thing.shape, px, py, cx, cy, SIZES[shot.thing.size] * size)  # [T, S, S]
    bg = _rgb(BACKGROUNDS, shot.background).to(device).view(3, 1, 1, 1)
    fg = _rgb(COLOURS, shot.thing.colour).to(device).view(3, 1, 1, 1)
    return bg + (fg - bg) * cov.unsqueeze(0)


def render_story(story: Story, device="cpu") -> torch.Tensor:
    """[3, T, size, size] float32 in [-1, 1]: the shots' clips one after another."""
    return torch.cat([render_shot(s, story.size, device) for s in story.shots], dim=1)


def render_batch(stories: list[Story], device="cpu") -> torch.Tensor:
    """[B, 3, T, S, S] for stories of equal shot lengths and size, all shots drawn at once (one set
    of tensor ops for the whole batch: the trainer renders every step on its device)."""
    kinds = {(tuple(s.shot_frames), s.size) for s in stories}
    if len(kinds) != 1:
        raise ValueError(f"render_batch needs stories of one length and size, got {sorted(kinds)}")
    (shot_frames, size), = kinds
    if len(set(shot_frames)) != 1:  # shots of unequal length: draw story by story
        return torch.stack([render_story(s, device) for s in stories])
    shots = [sh for s in stories for sh in s.shots]
    t = shot_frames[0]
    # one [n, 12] table of every shot's numbers, moved to the device in one copy
    rows = [[sh.start[0], sh.start[1], DIRECTIONS[sh.direction][0] * sh.travel,
             DIRECTIONS[sh.direction][1] * sh.travel, SIZES[sh.thing.size] * size,
             float(SHAPES.index(sh.thing.shape)), *_RGB_BG[sh.background], *_RGB_FG[sh.thing.colour]]
            for sh in shots]
    table = torch.tensor(rows, dtype=torch.float64).to(device)
    steps = torch.linspace(0.0, 1.0, t, dtype=torch.float64, device=device) if t > 1 \
        else torch.zeros(1, dtype=torch.float64, device=device)
    cx = ((table[:, 0:1] + table[:, 2:3] * steps) * size).float().view(-1, t, 1, 1)
    cy = ((table[:, 1:2] + table[:, 3:4] * steps) * size).float().view(-1, t, 1, 1)
    r = table[:, 4].float().view(-1, 1, 1, 1)
    kind = table[:, 5].round().long().view(-1, 1, 1, 1)
    axis = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    dx, dy = axis.view(1, 1, 1, size) - cx, axis.view(1, 1, size, 1) - cy            # [n, T, S, S]
    d = torch.where(kind == 0, torch.sqrt(dx * dx + dy * dy) - r,
                    torch.where(kind == 1, torch.maximum(dx.abs(), dy.abs()) - r,
                                torch.maximum(dy - r, (2.0 * dx.abs() - (dy + r)) / 5 ** 0.5)))
    cov = (0.5 - d).clamp(0.0, 1.0).unsqueeze(1)                                       # [n, 1, T, S, S]
    bg = table[:, 6:9].float().view(-1, 3, 1, 1, 1)
    fg = table[:, 9:12].float().view(-1, 3, 1, 1, 1)
    video = bg + (fg - bg) * cov                                                        # [n, 3, T, S, S]
    n = len(stories[0].shots)
    return video.view(len(stories), n, 3, t, size, size).transpose(1, 2).reshape(len(stories), 3, n * t, size, size)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 with the same layout."""
    return ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


DEMO_CAPTIONS = [
    "a large red circle moves right on a grey background",
    "it moves up on a black background",
    "it moves left on a white background",
    "a small blue square moves down on a grey background",
]
