"""benchmarks/long_stories.py end to end on the shipped model at a toy size (1 story of 3 short shots, 2 steps):
every mode gives a row or a stated skip, the JSON carries every column, the doc table is generated from it."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_stories  # noqa: E402

from moga.demo.sparse_baselines import sol_available  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ls") / "r.json"
    long_stories.main(["--stories", "1", "--shots", "3", "--shot-frames", "5", "--steps", "2", "--threads", "1",
                       "--out", str(out), "--pictures", str(out.parent / "pictures")])
    return out, json.loads(out.read_text())


def test_every_mode_has_a_row_or_a_reason(result):
    _, r = result
    rows = {x["mode"]: x for x in r["rows"]}
    have_sol = sol_available()[0] is not None
    for mode in long_stories.MODES:
        if mode.startswith("sol") and not have_sol:
            assert "comfy-kitchen" in r["skipped"][mode]
        else:
            assert mode in rows, mode
    for row in rows.values():
        for col in (*long_stories.COLUMNS, "attention_flops_ratio", "attention_gflops", "seconds", "score"):
            assert col in row, (row["mode"], col)
    assert rows["dense"]["attention_flops_ratio"] == 1.0
    for mode in ("moga", "window", "topk", "lse"):
        assert 0 < rows[mode]["attention_flops_ratio"] < 1.0, mode
    assert rows["window"]["attention_flops_ratio"] < rows["moga"]["attention_flops_ratio"]
    assert r["settings"]["stand_in_twin"] and not r["settings"]["trained_on_long_stories"]


def test_doc_table_is_generated_from_the_json(result, tmp_path):
    out, r = result
    doc = tmp_path / "d.md"
    doc.write_text(f"intro\n{long_stories.doc_begin(str(out))}\nold\n{long_stories.DOC_END}\nafter\n")
    long_stories.main(["--table", str(out), "--doc", str(doc)])
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert "| MoGA as trained |" in text and "NOT trained on long stories" in text
    resumed = long_stories.main(["--stories", "1", "--shots", "3", "--shot-frames", "5", "--steps", "2",
                                 "--out", str(out), "--resume", "--modes", "dense"])
    assert [x["seconds"] for x in resumed["rows"]] == [x["seconds"] for x in r["rows"]]  # nothing re-measured


def test_fit_tau_meets_the_target_ratio():
    import torch
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(640, 2, 16, generator=g), torch.randn(640, 2, 16, generator=g)) for _ in range(2)]
    floor = long_stories.sparse_ratio(calls, 12.0)
    for target in (0.9, 0.6, floor + 0.05):
        tau, got = long_stories.fit_tau(calls, target)
        assert abs(got - target) < 0.03 and got <= target + 1e-9, (target, got)
    tau, got = long_stories.fit_tau(calls, floor / 2)   # unreachable: the floor, said by its ratio
    assert tau == 12.0 and got == floor


def test_pictures_show_every_mode_of_the_first_story(result):
    """--pictures: a strip per measured mode (the middle frame of each shot) and one sheet with a row per mode."""
    from PIL import Image

    out, r = result
    folder = out.parent / "pictures"
    modes = [x["mode"] for x in r["rows"]]
    for mode in modes:
        strip = Image.open(folder / f"strip-{mode}.png")
        assert strip.size == (3 * 128, 128), (mode, strip.size)  # 3 shots of 128 x 128 side by side
    sheet = Image.open(folder / "long-story-modes.jpg")
    assert sheet.size[1] == 28 + 128 * len(modes) and sheet.size[0] > 3 * 128


def test_story_strip_takes_each_shots_middle_frame():
    import torch

    from moga.demo.long_world import heldout_long_stories

    story = heldout_long_stories(1, 12, seed=1, shot_frames=5)[0]
    video = torch.rand(3, sum(story.shot_frames), 8, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1
    strip = torch.from_numpy(long_stories.story_strip(video, story)).float()
    start = 0
    for k, n in enumerate(story.shot_frames):
        want = ((video[:, start + n // 2] + 1) * 127.5).round().permute(1, 2, 0)
        assert torch.equal(strip[:, 6 * k:6 * (k + 1)], want), k
        start += n
    assert long_stories.file_label(Path("/r/moga-long/model.safetensors")) == "moga-long/model.safetensors"
    assert long_stories.file_label(Path("/r/x.safetensors")) == "x.safetensors"
