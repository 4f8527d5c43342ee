"""The synthetic world and its evaluator: deterministic, split-clean, and the scorer tells right from wrong."""
from dataclasses import replace

import pytest
import torch

from moga.demo import evaluate as ev
from moga.demo import world as w


def _stories(n, seed=0, split="train", shots=4):
    return [w.sample_story(seed * 1000 + i, shots, split=split) for i in range(n)]


def test_story_is_deterministic_in_its_seed():
    a, b, c = w.sample_story(7), w.sample_story(7), w.sample_story(8)
    assert a == b and a.captions == b.captions
    assert a != c
    assert torch.equal(w.render_story(a), w.render_story(b))


def test_train_split_never_shows_held_out_prompts():
    held = set(map(lambda t: (t[0], t[1], t[2]), w.held_out_tuples()))
    assert 0.05 < len(held) / len(w.ALL_TUPLES) < 0.15
    for story in _stories(150):
        for shot in story.shots:
            assert (shot.thing, shot.direction, shot.background) not in held
    for story in w.heldout_stories(20, seed=3):
        s0 = story.shots[0]
        assert (s0.thing, s0.direction, s0.background) in held


def test_every_factor_appears_in_training():
    seen = {"colour": set(), "shape": set(), "size": set(), "dir": set(), "bg": set()}
    for story in _stories(120, seed=1):
        for shot in story.shots:
            seen["colour"].add(shot.thing.colour)
            seen["shape"].add(shot.thing.shape)
            seen["size"].add(shot.thing.size)
            seen["dir"].add(shot.direction)
            seen["bg"].add(shot.background)
    assert seen["colour"] == set(w.COLOURS) and seen["shape"] == set(w.SHAPES)
    assert seen["size"] == set(w.SIZES) and seen["dir"] == set(w.DIRECTIONS)
    assert seen["bg"] == set(w.BACKGROUNDS)


def test_it_continues_the_object_and_a_introduces_one():
    stories = _stories(80, seed=2)
    kinds = set()
    for story in stories:
        ids = story.identities()
        for k, shot in enumerate(story.shots):
            words = w.tokenize(shot.caption)
            assert all(word in w.VOCAB for word in words)
            if k and not shot.new:
                assert words[0] == "it" and shot.thing == story.shots[k - 1].thing and ids[k] == ids[k - 1]
                kinds.add("it")
            elif k:
                assert words[0] == "a" and shot.thing != story.shots[k - 1].thing and ids[k] == k
                kinds.add("new")
    assert kinds == {"it", "new"}


def test_captions_round_trip_and_bad_captions_explain():
    story = w.sample_story(11)
    again = w.story_from_captions(story.captions, seed=5)
    assert [(s.thing, s.direction, s.background, s.new) for s in again.shots] == \
        [(s.thing, s.direction, s.background, s.new) for s in story.shots]
    with pytest.raises(ValueError, match="outside the demo vocabulary"):
        w.parse_caption("a red dragon moves left on a grey background")
    with pytest.raises(ValueError, match="does not say its"):
        w.story_from_captions(["a red circle moves left on a grey background"])  # no size
    with pytest.raises(ValueError, match="introduce the object first"):
        w.story_from_captions(["it moves left on a grey background"])


def test_render_draws_the_object_where_and_as_the_story_says():
    story = w.story_from_captions(["a large green square moves right on a black background",
                                   "it moves up on a white background"], seed=3)
    video = w.render_story(story)
    assert video.shape == (3, 34, 128, 128) and video.min() >= -1 and video.max() <= 1
    pixels = w.to_uint8(video)
    for k, shot in enumerate(story.shots):
        clip = pixels[:, k * 17:(k + 1) * 17].int()
        bg = torch.tensor(w.BACKGROUNDS[shot.background]).view(3, 1, 1, 1)
        assert torch.equal(clip[:, :, 0, 0], bg[:, :, 0, 0].expand(3, 17))
        obj = (clip - bg).abs().sum(0) > 30  # [T, H, W]
        area = obj.flatten(1).sum(1).float()
        side = 2 * w.SIZES["large"] * 128
        assert torch.allclose(area, torch.full_like(area, side * side), rtol=0.08)  # a square
        ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
        cx = (obj * xs).flatten(1).sum(1) / area
        cy = (obj * ys).flatten(1).sum(1) / area
        if k == 0:
            assert cx[-1] - cx[0] > 0.25 * 128 and abs(cy[-1] - cy[0]) < 1
        else:
            assert cy[0] - cy[-1] > 0.25 * 128 and abs(cx[-1] - cx[0]) < 1
        centre = (cy[8].round().long(), cx[8].round().long())
        assert tuple(clip[:, 8, centre[0], centre[1]].tolist()) == w.COLOURS["green"]


def test_render_batch_rejects_mixed_lengths():
    with pytest.raises(ValueError, match="one length"):
        w.render_batch([w.sample_story(0, 2), w.sample_story(1, 3)])


# ---------------------------------------------------------------- evaluator

def _score(stories, videos):
    return ev.summarize([ev.score_story(v, s) for v, s in zip(videos, stories)])


def test_evaluator_scores_ground_truth_near_perfect():
    stories = _stories(4, seed=4) + w.heldout_stories(3, seed=4)
    result = _score(stories, [w.render_story(s) for s in stories])
    for metric in ev.METRICS:
        assert result[metric] >= 99.0, (metric, result)
    # uint8 input reads the same
    again = _score(stories[:3], [w.to_uint8(w.render_story(s)) for s in stories[:3]])
    assert again["colour"] == 100.0 and again["direction"] == 100.0


def _recoloured(thing):
    names = list(w.COLOURS)
    return replace(thing, colour=names[(names.index(thing.colour) + 3) % len(names)])


def _reshaped(thing):
    return replace(thing, shape=w.SHAPES[(w.SHAPES.index(thing.shape) + 1) % 3])


def test_evaluator_catches_wrong_colour_and_shape():
    stories = _stories(3, seed=5)
    wrong = [replace(s, shots=tuple(replace(sh, thing=_reshaped(_recoloured(sh.thing))) for sh in s.shots))
             for s in stories]
    result = _score(stories, [w.render_story(x) for x in wrong])
    assert result["colour"] == 0.0 and result["shape"] == 0.0
    assert result["direction"] == 100.0  # motion untouched


def test_evaluator_catches_wrong_direction_and_background():
    stories = _stories(3, seed=6)
    flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = []
    for s in stories:
        shots = []
        for sh in s.shots:
            dx, dy = w.DIRECTIONS[sh.direction]
            end = (sh.start[0] + dx * sh.travel, sh.start[1] + dy * sh.travel)
            bg = "white" if sh.background != "white" else "black"
            shots.append(replace(sh, direction=flip[sh.direction], start=end, background=bg))
        wrong.append(replace(s, shots=tuple(shots)))
    result = _score(stories, [w.render_story(x) for x in wrong])
    assert result["direction"] == 0.0 and result["background"] == 0.0
    assert result["colour"] == 100.0


def test_evaluator_catches_identity_drift_across_shots():
    stories = [s for s in _stories(30, seed=7) if any(not sh.new for sh in s.shots[1:])][:5]
    drifted = [replace(s, shots=(s.shots[0],) + tuple(
        replace(sh, thing=_recoloured(sh.thing)) if (k % 2) else sh for k, sh in enumerate(s.shots[1:], 1)))
        for s in stories]
    result = _score(stories, [w.render_story(x) for x in drifted])
    assert result["consistency"] < 10.0


def test_evaluator_catches_jitter_and_empty_frames():
    stories = _stories(3, seed=8)
    gen = torch.Generator().manual_seed(0)
    jittered, empty = [], []
    for s in stories:
        v = w.render_story(s)
        jittered.append(v[:, torch.randperm(v.shape[1], generator=gen)].contiguous())
        bg = torch.cat([w.render_shot(replace(sh, thing=sh.thing), s.size)[:, :, :1, :1]
                        .expand(3, sh.frames, s.size, s.size) for sh in s.shots], dim=1)
        empty.append(bg)
    jit = _score(stories, jittered)
    assert jit["smoothness"] < 40.0
    none = _score(stories, empty)
    assert none["detected"] == 0.0 and none["colour"] == 0.0 and none["direction"] == 0.0
    noisy = [(w.render_story(s) + torch.randn(3, s.num_frames, s.size, s.size, generator=gen)).clamp(-1, 1)
             for s in stories]
    assert _score(stories, noisy)["colour"] < 50.0


def test_evaluator_rejects_bad_shapes():
    story = w.sample_story(0, 2)
    with pytest.raises(ValueError, match="frames"):
        ev.score_story(torch.zeros(3, 10, 128, 128), story)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        ev.score_story(torch.zeros(34, 128, 128), story)
