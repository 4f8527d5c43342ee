"""The long-story world and its evaluator (recall by distance), on rendered ground truth and corrupted videos."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moga.demo import world
from moga.demo.long_evaluate import score_long_story, summarize_long
from moga.demo.long_world import (BUCKETS, LONG_SHOT_FRAMES, LONG_VOCAB, LongStory, bucket_of,
                                  heldout_long_stories, render_long_story, sample_long_story, tokens_per_story)

FRAMES = 17  # the short world's shot length keeps the tests small; the evaluator reads it as today


def _last_seen_distance(story: LongStory, k: int) -> int:
    """Independent reference: walk back to the last shot that showed the same object."""
    for j in range(k - 1, -1, -1):
        if story.shots[j].thing == story.shots[k].thing:
            return k - j
    raise AssertionError(f"shot {k} calls back an object never shown")


def test_stories_are_deterministic_long_and_varied():
    a, b = sample_long_story(5), sample_long_story(5)
    assert a == b and a.captions == b.captions
    assert sample_long_story(6) != a
    lengths = {len(sample_long_story(i).shots) for i in range(60)}
    assert min(lengths) >= 12 and max(lengths) <= 24 and len(lengths) > 5
    # 8x the tokens of a 4-shot story of today's world, at the smallest story
    short = world.sample_story(0, 4)
    smallest = sample_long_story(0, num_shots=12)
    assert smallest.shot_frames[0] == LONG_SHOT_FRAMES
    assert tokens_per_story(smallest) >= 8 * tokens_per_story(short) == 8 * 1280


def test_callbacks_name_their_object_and_cover_every_distance():
    seen = {b: 0 for b in BUCKETS}
    for i in range(40):
        story = sample_long_story(i, split="heldout" if i % 2 else "train")
        colours = {}
        for shot in story.shots:  # one object per colour: "the red one" is unambiguous
            assert colours.setdefault(shot.thing.colour, shot.thing) == shot.thing
        assert len(colours) >= 3
        backgrounds = [s.background for s in story.shots]
        assert sum(x != y for x, y in zip(backgrounds, backgrounds[1:])) >= len(backgrounds) // 3
        for k, (kind, caption, dist) in enumerate(zip(story.kinds, story.captions, story.distances())):
            if kind == "callback":
                assert caption.startswith(f"the {story.shots[k].thing.colour} one moves ")
                assert dist == _last_seen_distance(story, k)
                seen[bucket_of(dist)] += 1
            else:
                assert dist is None
            assert all(w in LONG_VOCAB for w in world.tokenize(caption))
        # distractors: a callback of 2+ shots back has other objects between
        for k, dist in enumerate(story.distances()):
            if dist and dist >= 2:
                between = {story.shots[j].thing for j in range(k - dist + 1, k)}
                assert story.shots[k].thing not in between and between
    assert all(v >= 20 for v in seen.values()), seen


def test_buckets():
    assert [bucket_of(d) for d in (1, 2, 4, 5, 19)] == ["1", "2-4", "2-4", "5+", "5+"]
    with pytest.raises(ValueError):
        bucket_of(0)


def test_held_out_split():
    for story in heldout_long_stories(6, seed=3):
        s0 = story.shots[0]
        assert world.is_held_out(s0.thing, s0.direction, s0.background)
    for i in range(6):
        story = sample_long_story(i)
        assert not any(world.is_held_out(s.thing, s.direction, s.background) for s in story.shots)


def test_bad_stories_are_refused():
    good = sample_long_story(1, num_shots=12, shot_frames=FRAMES)
    k = good.kinds.index("callback")
    targets = list(good.targets)
    targets[k] = k  # a callback must reach back
    with pytest.raises(ValueError, match="callback"):
        LongStory(good.shots, good.kinds, tuple(targets))


def _render_with(story: LongStory, things: dict[int, world.Thing]) -> torch.Tensor:
    """Render the story with shot k's object replaced by things[k] (a corrupted video)."""
    ws = story.world_story()
    shots = tuple(dataclasses.replace(s, thing=things.get(k, s.thing)) for k, s in enumerate(ws.shots))
    return world.render_story(world.Story(shots, size=ws.size))


def _other(thing: world.Thing) -> world.Thing:
    """Same colour (the callback names it), another shape and size: what a model that forgot would draw."""
    shape = world.SHAPES[(world.SHAPES.index(thing.shape) + 1) % 3]
    size = "small" if thing.size == "large" else "large"
    return world.Thing(thing.colour, shape, size)


@pytest.fixture(scope="module")
def stories():
    return [sample_long_story(100 + i, num_shots=14, split="heldout", shot_frames=FRAMES) for i in range(4)]


def test_ground_truth_scores_100(stories):
    results = [score_long_story(render_long_story(s), s) for s in stories]
    summary = summarize_long(results)
    for m in ("colour", "shape", "size", "direction", "background", "consistency", "recall",
              *(f"recall_{b}" for b in BUCKETS if summary[f"callbacks_{b}"])):
        assert summary[m] is not None and summary[m] >= 95.0, (m, summary)
    assert summary["callbacks"] == sum(k == "callback" for s in stories for k in s.kinds)
    assert sum(summary[f"callbacks_{b}"] for b in BUCKETS) == summary["callbacks"]


def test_swapped_identities_in_callbacks_are_caught(stories):
    truth = summarize_long([score_long_story(render_long_story(s), s) for s in stories])
    # corrupt the far callbacks only: their bucket falls to 0, the others stay
    far = [{k: _other(s.shots[k].thing) for k, d in enumerate(s.distances()) if d and d >= 5} for s in stories]
    assert sum(map(len, far)) > 0
    bad = summarize_long([score_long_story(_render_with(s, f), s) for s, f in zip(stories, far)])
    assert bad["recall_5+"] == 0.0
    for b in ("1", "2-4"):
        assert bad[f"recall_{b}"] == truth[f"recall_{b}"]
    expected = truth["recall"] - 100.0 * truth["callbacks_5+"] / truth["callbacks"]
    assert bad["recall"] == pytest.approx(expected, abs=0.02)
    # every callback swapped with another object of the story (colour included): recall 0
    swap = []
    for s in stories:
        things = list({sh.thing for sh in s.shots})
        swap.append({k: next(t for t in things if t != s.shots[k].thing)
                     for k, kind in enumerate(s.kinds) if kind == "callback"})
    worst = summarize_long([score_long_story(_render_with(s, f), s) for s, f in zip(stories, swap)])
    assert worst["recall"] == 0.0
    # the corruption touched callback shots only: "it" consistency is still scored on its own shots
    assert worst["shots"] == truth["shots"]


def test_callback_caption_is_read_by_the_short_vocabulary_as_unknown_words():
    # the shipped encoder reads the two new words as <unk> (the untrained-for-long baseline), a long model knows them
    from moga.demo.text import DemoTextEncoder
    short, long = DemoTextEncoder(dim=8, layers=1, heads=2), DemoTextEncoder(dim=8, layers=1, heads=2,
                                                                            vocab=LONG_VOCAB)
    with pytest.warns(UserWarning, match="does not know"):
        ids = short.token_ids("the red one moves left on a grey background")
    assert ids[1] == ids[3] == 2
    assert 2 not in long.token_ids("the red one moves left on a grey background")


def test_moga_demo_long_is_labelled_untrained_for_long(tmp_path, capsys):
    from moga.cli import main

    story = __import__("moga.demo.long_world", fromlist=["x"]).demo_long_story(0, 6)
    assert "callback" in story.kinds  # the printed score has a recall figure
    assert main(["demo", "--long", "6", "--steps", "1", "--out", str(tmp_path / "d.mp4")]) == 0
    err = capsys.readouterr().err
    assert "untrained-for-long" in err and "recall" in err and "shot 6:" in err
    assert (tmp_path / "d.mp4").stat().st_size > 0
    assert main(["demo", "--long", "--prompt", "it moves up on a black background",
                 "--out", str(tmp_path / "e.mp4")]) != 0
    assert "--long draws its own story" in capsys.readouterr().err
