"""One story, every attention mode of the demo model, as a picture: what the captions ask for, then what each
mode draws, with what the evaluator read off each shot and the mode's attention FLOPs.

    python3 benchmarks/demo_figure.py --out docs/images/demo-modes.jpg
    python3 benchmarks/demo_figure.py --dense-checkpoint dense.safetensors --story-seed 3 --story 5 --out x.jpg

Rows: the world's own rendering of the captions (ground truth); the shipped MoGA model with its defaults (its
first steps dense); MoGA at every step; the window branch alone; the routers off (dense attention on the
MoGA weights); a dense-trained model when `--dense-checkpoint` is given. Columns: the first, middle and last
frame of every shot. Under each shot: what the evaluator detected (red where it is wrong). The story is the
README's demo story unless `--story-seed` picks a held-out one (`--story` its index).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.demo.evaluate import score_story  # noqa: E402
from moga.demo.evaluation import mode_config  # noqa: E402
from moga.demo.generate import decode, generate  # noqa: E402
from moga.demo.model import demo_info, load_demo  # noqa: E402
from moga.demo.world import DEMO_CAPTIONS, heldout_stories, render_story, story_from_captions, to_uint8  # noqa: E402
from moga.diagnostics import attention_flops  # noqa: E402

CELL = 112          # pixels per frame in the picture
LABEL_W = 230       # the row labels' column
HEAD_H = 46         # the captions above the shots
FOOT_H = 30         # what the evaluator read, under each row's shots
GAP = 8             # between shots


def _font(size):
    from PIL import ImageFont
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default()


def _render(model, story, cfg, *, sampling, seed, dense_steps):
    """(video [3, T, H, W] uint8, shot scores, attention FLOP ratio) of one mode."""
    with attention_flops(model) as count:
        lat = generate(model, [story], **sampling, seeds=[seed], moga=cfg, dense_steps=dense_steps)
    video = to_uint8(decode(model, lat, story)[0].cpu())
    ratio = count.flops / count.dense_flops if count.dense_flops else 1.0
    return video, score_story(video, story), ratio


def _found_text(score) -> tuple[str, bool]:
    f = score.found
    if f.get("colour") is None:
        return "nothing detected", False
    ok = score.colour and score.shape and score.size and score.direction and score.consistency is not False
    return f"{f['size']} {f['colour']} {f['shape']} {f['direction'] or '(no clear motion)'}", ok


def draw(rows, story, path: Path, title: str):
    from PIL import Image, ImageDraw
    shots = story.shots
    frames_per = 3
    width = LABEL_W + len(shots) * (frames_per * CELL + GAP)
    row_h = CELL + FOOT_H
    height = HEAD_H + 34 + len(rows) * (row_h + 6)
    img = Image.new("RGB", (width, height), (250, 250, 250))
    pen = ImageDraw.Draw(img)
    big, small = _font(15), _font(12)
    pen.text((10, 8), title, fill=(20, 20, 20), font=big)
    starts = np.cumsum([0] + [s.frames for s in shots])
    for k, shot in enumerate(shots):
        x = LABEL_W + k * (frames_per * CELL + GAP)
        caption = "\n".join(textwrap.wrap(f"{k + 1}. {shot.caption}", 48))
        pen.text((x + 2, 32), caption, fill=(40, 40, 40), font=small)
    for r, (label, video, scores) in enumerate(rows):
        y = HEAD_H + 34 + r * (row_h + 6)
        pen.multiline_text((10, y + 8), label, fill=(20, 20, 20), font=small, spacing=3)
        for k in range(len(shots)):
            x = LABEL_W + k * (frames_per * CELL + GAP)
            a, b = int(starts[k]), int(starts[k + 1]) - 1
            for j, t in enumerate((a, (a + b) // 2, b)):
                frame = video[:, t].permute(1, 2, 0).numpy()
                tile = Image.fromarray(frame).resize((CELL, CELL), Image.NEAREST)
                img.paste(tile, (x + j * CELL, y))
            text, ok = _found_text(scores[k])
            pen.text((x + 2, y + CELL + 6), text, fill=(30, 120, 30) if ok else (200, 30, 30), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=85)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="demo model file (default: the shipped one)")
    ap.add_argument("--dense-checkpoint", default=None, help="a dense-trained demo model: one more row")
    ap.add_argument("--story-seed", type=int, default=None, help="a held-out story set instead of the demo story")
    ap.add_argument("--story", type=int, default=0, help="which story of that set")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--steps", type=int, default=None, help="default: the file's")
    ap.add_argument("--out", default="docs/images/demo-modes.jpg")
    args = ap.parse_args(argv)
    model = load_demo(args.checkpoint)
    s = demo_info(model)["sampling"]
    sampling = dict(steps=args.steps or int(s["steps"]), cfg=float(s["cfg"]), shift=float(s["shift"]),
                    solver=s["solver"])
    if args.story_seed is None:
        story = story_from_captions(DEMO_CAPTIONS, seed=args.seed)
    else:
        story = heldout_stories(args.story + 1, seed=args.story_seed)[args.story]
    warm = float(model.dense_warmup)
    n_dense = round(warm * sampling["steps"])
    modes = [(f"MoGA, shipped defaults\n(first {n_dense} of {sampling['steps']} steps dense)", "moga", warm),
             ("MoGA at every step", "moga", 0.0),
             ("window branch alone", "window", 0.0),
             ("routers off\n(dense attention, MoGA weights)", "dense", 0.0)]
    truth = to_uint8(render_story(story))
    rows = [("the captions\n(the world's own drawing)", truth, score_story(truth, story))]
    for label, mode, dense_steps in modes:
        video, scores, ratio = _render(model, story, mode_config(model, mode), sampling=sampling,
                                       seed=args.seed, dense_steps=dense_steps)
        rows.append((f"{label}\n{ratio:.2f} of dense's attention FLOPs", video, scores))
        print(f"{label.replace(chr(10), ' ')}: FLOPs {ratio:.3f}, "
              + "; ".join(_found_text(sc)[0] for sc in scores))
    if args.dense_checkpoint:
        dense = load_demo(args.dense_checkpoint)
        video, scores, _ = _render(dense, story, None, sampling=sampling, seed=args.seed, dense_steps=0.0)
        rows.append(("dense-trained model\n1.00 (its own attention)", video, scores))
        print("dense-trained: " + "; ".join(_found_text(sc)[0] for sc in scores))
    title = (f"One story, noise seed {args.seed}, {sampling['steps']} {sampling['solver']} steps, guidance "
             f"{sampling['cfg']:g}: first, middle and last frame of each shot")
    draw(rows, story, Path(args.out), title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
