"""Long stories of the demo world: 12 to 24 shots, several objects, and callbacks to objects shown far earlier.

A long story keeps the short world's objects, backgrounds, motion and drawing (`moga.demo.world`: every shot is a
`world.ShotSpec`, drawn by `world.render_batch` / `render_story`), and adds one caption kind:

    a large red circle moves left on a grey background      (new: introduces an object)
    it moves up on a black background                       (it: the object of the shot before)
    the red one moves down on a white background            (callback: the object of that colour, shown earlier)

Every object of a story has its own colour, so "the red one" names exactly one earlier object; its shape and
size must come from the shot where it was last seen, which may be many shots back with other objects (the
distractors) and other backgrounds between. The callback's distance is the number of shots back to that last
appearance; stories are drawn so that callbacks fall at distances 1, 2-4 and 5 or more.

Shots are longer than the short world's (53 frames = 14 latent frames by default), so a 12-shot story has
12 x 14 x 64 = 10,752 tokens, 8.4x the 1,280 of a 4-shot story. Deterministic from a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from . import world
from .world import COLOURS, DEFAULT_SIZE, DIRECTIONS, BACKGROUNDS, SHAPES, SIZES, ShotSpec, Thing

# Words the long stories add to the short world's vocabulary (appended: the short words keep their ids).
LONG_WORDS = ("the", "one")
LONG_VOCAB: tuple[str, ...] = (*world.VOCAB, *LONG_WORDS)

LONG_SHOT_FRAMES = 53          # 4n+1 pixel frames per shot -> 14 latent frames
SHOT_RANGE = (12, 24)          # shots in a story
OBJECT_RANGE = (3, 5)          # distinct objects in a story (distinct colours)
BUCKETS = ("1", "2-4", "5+")   # callback distances the evaluator scores apart
KINDS = ("new", "it", "callback")


def bucket_of(distance: int) -> str:
    if distance < 1:
        raise ValueError(f"a callback reaches at least 1 shot back, got {distance}")
    return "1" if distance == 1 else "2-4" if distance <= 4 else "5+"


@dataclass(frozen=True)
class LongStory:
    """A story whose shots say what they are: `kinds[k]` in KINDS; `targets[k]` the shot a callback refers to
    (the named object's last appearance before it), else None. Has the attributes `moga.demo.generate` and
    `world.render_batch` use (shots, captions, shot_frames, size), so it samples and renders like a `Story`."""
    shots: tuple[ShotSpec, ...]
    kinds: tuple[str, ...]
    targets: tuple[int | None, ...]
    size: int = DEFAULT_SIZE
    seed: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if not (len(self.shots) == len(self.kinds) == len(self.targets)) or not self.shots:
            raise ValueError("a long story needs one kind and one target per shot, and at least one shot")
        if self.kinds[0] != "new":
            raise ValueError("the first shot must introduce its object")
        for k, (shot, kind, target) in enumerate(zip(self.shots, self.kinds, self.targets)):
            if kind not in KINDS:
                raise ValueError(f"shot {k}: kind {kind!r} is not one of {KINDS}")
            if kind == "callback":
                if target is None or not 0 <= target < k or self.shots[target].thing != shot.thing:
                    raise ValueError(f"shot {k}: a callback names an object shown earlier (target {target})")
            if kind == "it" and self.shots[k - 1].thing != shot.thing:
                raise ValueError(f"shot {k}: 'it' keeps the object of the shot before")

    @property
    def captions(self) -> list[str]:
        out = []
        for shot, kind in zip(self.shots, self.kinds):
            where = f"moves {shot.direction} on a {shot.background} background"
            if kind == "callback":
                out.append(f"the {shot.thing.colour} one {where}")
            else:
                out.append(shot.caption)
        return out

    @property
    def shot_frames(self) -> list[int]:
        return [s.frames for s in self.shots]

    @property
    def num_frames(self) -> int:
        return sum(self.shot_frames)

    def distances(self) -> list[int | None]:
        return [None if t is None else k - t for k, t in enumerate(self.targets)]

    def world_story(self) -> world.Story:
        """The short world's Story of the same shots, for its renderer and evaluator: a callback shot counts as
        introducing its object there (its consistency is not 'the shot before'; recall scores it instead)."""
        shots = tuple(ShotSpec(s.thing, s.direction, s.background, kind != "it", s.start, s.travel, s.frames)
                      for s, kind in zip(self.shots, self.kinds))
        return world.Story(shots, size=self.size, seed=self.seed)


def _things(rng: random.Random, count: int) -> list[Thing]:
    colours = rng.sample(list(COLOURS), count)
    return [Thing(c, rng.choice(SHAPES), rng.choice(list(SIZES))) for c in colours]


def sample_long_story(seed: int, num_shots: int | None = None, split: str = "train",
                      num_objects: int | None = None, size: int = DEFAULT_SIZE,
                      shot_frames: int = LONG_SHOT_FRAMES, p_it: float = 0.3) -> LongStory:
    """A random long story, deterministic in `seed`.

    Objects are introduced over the first half of the story; every other shot either continues the shot
    before ("it", chance `p_it`) or calls back an earlier object, aiming in turn at distances 1, 2-4 and 5+
    (the nearest distance that the story allows when the aimed one does not exist).
    split="train": no shot's (object, direction, background) is held out; "heldout": the first shot's is.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"moga-demo-long-story:{seed}:{split}")
    n = num_shots if num_shots is not None else rng.randint(*SHOT_RANGE)
    if n < 2:
        raise ValueError(f"a long story needs at least 2 shots, got {n}")
    count = num_objects if num_objects is not None else rng.randint(*OBJECT_RANGE)
    count = max(1, min(count, len(COLOURS), n // 2 + 1))
    if split == "heldout":  # the opening shot is a prompt never seen in training
        first, direction0, background0 = rng.choice(world.held_out_tuples())
        others = rng.sample([c for c in COLOURS if c != first.colour], count - 1)
        things = [first] + [Thing(c, rng.choice(SHAPES), rng.choice(list(SIZES))) for c in others]
    else:
        things = _things(rng, count)
    # where each object after the first is introduced: the first half of the story
    intro = set(rng.sample(range(1, n // 2 + 1), count - 1))
    kinds, targets, objects, last_seen = [], [], [], {}
    aim = rng.randrange(len(BUCKETS))
    for k in range(n):
        if k == 0 or k in intro:
            obj = len(last_seen)
            kind, target = "new", None
        elif rng.random() < p_it:
            obj, kind, target = objects[-1], "it", None
        else:
            dist = {o: k - s for o, s in last_seen.items()}
            want = BUCKETS[aim % len(BUCKETS)]
            aim += 1
            fits = [o for o, d in dist.items() if bucket_of(d) == want]
            if not fits:  # the aimed distance does not exist yet: the farthest one there is
                fits = [max(dist, key=dist.get)]
            obj = rng.choice(sorted(fits))
            kind, target = "callback", last_seen[obj]
        objects.append(obj)
        kinds.append(kind)
        targets.append(target)
        last_seen[obj] = k
    shots = []
    for k, (obj, kind) in enumerate(zip(objects, kinds)):
        while True:
            if k == 0 and split == "heldout":
                direction, background = direction0, background0
                break
            direction, background = rng.choice(list(DIRECTIONS)), rng.choice(list(BACKGROUNDS))
            if k > 0 and background == shots[-1].background and rng.random() < 0.7:
                continue  # backgrounds mostly change at a cut
            if split == "train" and world.is_held_out(things[obj], direction, background):
                continue
            break
        shots.append(world._shot(rng, things[obj], direction, background, kind == "new", shot_frames))
    return LongStory(tuple(shots), tuple(kinds), tuple(targets), size=size, seed=seed)


def heldout_long_stories(count: int, num_shots: int | None = None, seed: int = 0, **kw) -> list[LongStory]:
    """`count` evaluation stories opening with prompts never seen in training."""
    return [sample_long_story(seed * 100003 + i, num_shots, split="heldout", **kw) for i in range(count)]


def render_long_story(story: LongStory, device="cpu") -> torch.Tensor:
    """[3, T, size, size] in [-1, 1], drawn by the short world's renderer."""
    return world.render_story(story.world_story(), device)


def tokens_per_story(story, temporal: int = 4, spatial: int = 16) -> int:
    """DiT tokens of a story (latent frames x (side / 16)^2 for the demo's 8x codec and 2x2 patches)."""
    return sum((f - 1) // temporal + 1 for f in story.shot_frames) * (story.size // spatial) ** 2


def demo_long_story(seed: int = 0, num_shots: int = 12) -> LongStory:
    """The long story `python -m moga demo --long` draws (a held-out opening)."""
    return sample_long_story(seed, num_shots, split="heldout", num_objects=3)
