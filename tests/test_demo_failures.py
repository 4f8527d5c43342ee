"""benchmarks/demo_failures.py: its object-token map and its per-"it"-shot rows, on rendered stories
(the ground truth, where the answers are known) and on a corrupted one."""
import importlib.util
from pathlib import Path

import torch

from moga.demo.evaluate import score_story
from moga.demo.world import heldout_stories, render_story

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo_failures", ROOT / "benchmarks" / "demo_failures.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_object_tokens_sit_on_the_object():
    story = heldout_stories(1, seed=3)[0]
    video = render_story(story)[None]                               # [1, 3, T, H, W]
    tok = bench.object_tokens(video, story.shot_frames)             # [1, F, 8, 8]
    assert tok.shape == (1, sum((f - 1) // 4 + 1 for f in story.shot_frames), 8, 8)
    # every latent frame shows the object on a few tokens, never on most of the frame
    per_frame = tok[0].flatten(1).sum(1)
    assert (per_frame >= 1).all() and (per_frame <= 24).all()
    # the token under the object's centre in the first frame is marked, the far corner is not
    frame0 = video[0, :, 0]
    obj = ((frame0 - frame0[:, :1, :1]).abs().sum(0) > 0.05).nonzero().float().mean(0)
    assert tok[0, 0, int(obj[0]) // 16, int(obj[1]) // 16]
    corner = (0, 0) if obj[0] > 64 and obj[1] > 64 else (7, 7)
    assert not tok[0, 0, corner[0], corner[1]]


def test_it_shot_rows_find_a_redrawn_object():
    stories = heldout_stories(4, seed=2)
    videos = [render_story(s) for s in stories]
    scores = [score_story(v, s) for v, s in zip(videos, stories)]
    rows = bench.it_shots(stories, scores)
    assert rows and all(r["ok"] and not r["broke"] for r in rows)
    assert len(rows) == sum(not sh.new for s in stories for sh in s.shots[1:])
    # recolour one "it" shot's object: that shot, and only it, breaks on colour
    n, k = rows[0]["story"], rows[0]["shot"]
    video = videos[n].clone()
    start = sum(stories[n].shot_frames[:k])
    clip = video[:, start:start + stories[n].shot_frames[k]]
    bg = clip[:, :, :1, :1]
    mask = (clip - bg).abs().sum(0, keepdim=True) > 0.05
    clip[:] = torch.where(mask, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1, 1) * (clip[1:2] * 0 + 1), clip)
    scores[n] = score_story(video, stories[n])
    again = bench.it_shots(stories, scores)
    broken = [(r["story"], r["shot"]) for r in again if not r["ok"]]
    assert (n, k) in broken
    assert "colour" in next(r for r in again if (r["story"], r["shot"]) == (n, k))["broke"]
