import json

import pytest

from moga.shots import (Shot, ShotPlan, check_frames, check_size, frame_positions, nearest_valid_frames,
                        seconds_to_frames)


def test_valid_lengths_and_error_names_neighbours():
    assert check_frames(1) == 1 and check_frames(81) == 81
    with pytest.raises(ValueError, match="77 or 81"):
        Shot("a cat", 80)
    with pytest.raises(ValueError, match="81 or 85"):
        Shot("a cat", 83)
    with pytest.raises(ValueError, match="use 1 frames"):
        Shot("a cat", 0)
    with pytest.raises(ValueError, match="whole number"):
        Shot("a cat", 40.5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        Shot("   ", 5)
    assert nearest_valid_frames(42) == (41, 45)


@pytest.mark.parametrize("seconds,fps,frames", [
    (5.0, 16, 81),      # 80 frames -> 81 (Wan's default clip)
    (2.5, 16, 41),      # 40 -> 41
    (1.0, 24, 25),      # 24 -> 25
    (0.01, 16, 1),      # shorter than one frame -> a single frame
    (2.375, 16, 37),    # 38 frames: 1 from 37, 3 from 41
])
def test_seconds_round_to_nearest_4n_plus_1(seconds, fps, frames):
    got = seconds_to_frames(seconds, fps)
    assert got == frames and (got - 1) % 4 == 0
    # it is the nearest valid length: no other 4n+1 is closer to seconds * fps
    target = seconds * fps
    assert all(abs(got - target) <= abs(4 * n + 1 - target) for n in range(200))


def test_seconds_ties_go_to_the_longer_clip():
    assert seconds_to_frames(39 / 16, 16) == 41  # 39 is 2 from 37 and 2 from 41


def test_bad_seconds():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            seconds_to_frames(bad, 16)


def test_parse_text_good():
    text = """
    # a story in three shots
    story: a knight in red armour
    negative: blurry
    [41] the knight rides through a forest

    the knight reaches a castle [2.5s]
    she opens the gate
    [9f] a close-up of the gate
    """
    plan = ShotPlan.parse_text(text, default_seconds=1.0, fps=16)
    assert plan.num_shots == 4
    assert plan.shot_frames == (41, 41, 17, 9)
    assert plan.story == "a knight in red armour" and plan.negative == "blurry"
    assert plan.shots[1].prompt == "the knight reaches a castle"
    assert plan.prompts()[0] == "a knight in red armour the knight rides through a forest"
    assert plan.latent_shot_frames() == (11, 11, 5, 3)
    assert plan.total_frames == 108 and plan.total_latent_frames() == 30
    assert plan.frame_ranges == ((0, 41), (41, 82), (82, 99), (99, 108))
    assert plan.latent_ranges() == ((0, 11), (11, 22), (22, 27), (27, 30))
    assert frame_positions(plan.latent_shot_frames()) == list(range(30))


def test_parse_text_without_story_keeps_prompts():
    plan = ShotPlan.parse_text("a\nb\n", default_seconds=0.5, fps=16)
    assert plan.prompts() == ["a", "b"] and plan.shot_frames == (9, 9)


@pytest.mark.parametrize("text,match", [
    ("", "no shots"),
    ("# only a comment\n\n", "no shots"),
    ("story: just a story", "no shots"),
    ("[40] a bad length", "line 1.*37 or 41"),
    ("ok\n[2.5] fractional frames", "line 2.*2.5s"),
    ("[41]", "non-empty prompt"),
    ("a cat [abc]", "length tag"),
])
def test_parse_text_bad(text, match):
    with pytest.raises(ValueError, match=match):
        ShotPlan.parse_text(text)


def test_json_forms(tmp_path):
    obj = {"story": "s", "negative": "n", "fps": 24,
           "shots": ["first", {"prompt": "second", "frames": 13}, {"prompt": "third", "seconds": 1}]}
    plan = ShotPlan.from_json(obj)
    assert plan.shot_frames == (121, 13, 25) and plan.fps == 24
    assert ShotPlan.from_json(json.dumps(obj)) == plan
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(obj))
    assert ShotPlan.from_json(path) == plan
    assert ShotPlan.load(path) == plan
    assert ShotPlan.from_json(plan.to_json()) == plan
    bare = ShotPlan.from_json(["x", "y"], default_seconds=0.5)
    assert bare.shot_frames == (9, 9) and bare.fps == 16


@pytest.mark.parametrize("obj,match", [
    ({"shots": []}, "no shots"),
    ({"shots": [{"prompt": "x", "frames": 12}]}, "shot 1.*9 or 13"),
    ({"shots": [{"prompt": "x", "frames": 9, "seconds": 1}]}, "not both"),
    ({"shots": [{"text": "x"}]}, "unknown keys"),
    ({"story": "no shots key"}, "JSON shot plan"),
    ("{not json", "not valid JSON"),
])
def test_json_bad(obj, match):
    with pytest.raises(ValueError, match=match):
        ShotPlan.from_json(obj)


def test_load_text_file_and_missing(tmp_path):
    path = tmp_path / "shots.txt"
    path.write_text("one [5]\ntwo [9]\n")
    assert ShotPlan.load(path).shot_frames == (5, 9)
    path.write_text("[5] one\n[9] two\n")  # starts like JSON, is the text form
    assert ShotPlan.load(path).shot_frames == (5, 9)
    path.write_text('["one", "two"]')  # JSON without the suffix
    assert ShotPlan.load(path, default_seconds=0.25).shot_frames == (5, 5)
    bad = tmp_path / "plan.json"
    bad.write_text("[5] not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShotPlan.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        ShotPlan.load(tmp_path / "nope.txt")


def test_from_prompts_and_layout():
    plan = ShotPlan.from_prompts(["a", "b", "c"], frames=[5, 9, 1])
    assert plan.latent_shot_frames() == (2, 3, 1)
    layout = plan.token_layout(width=64, height=32)
    assert (layout.frames, layout.height, layout.width) == (6, 2, 4)
    assert layout.shot_frames == (2, 3, 1)
    assert plan.latent_size(64, 32) == (6, 4, 8)
    with pytest.raises(ValueError, match="one length per shot"):
        ShotPlan.from_prompts(["a", "b"], frames=[5])


def test_sizes_must_be_multiples_of_16():
    check_size(832, 480)
    with pytest.raises(ValueError, match=r"width 830 \(nearest valid: 816 or 832\)"):
        check_size(830, 480)
    with pytest.raises(ValueError, match=r"height 8 \(nearest valid: 16\)"):
        check_size(32, 8)
