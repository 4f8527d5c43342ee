"""Score a long story's video: every short-world figure, plus long-range recall by distance.

Per shot the short world's evaluator (`moga.demo.evaluate.score_story`) reads colour, shape, size, direction,
background and smoothness, and cross-shot consistency for "it" shots as today. A callback shot ("the red one
...") **recalls** its object when the detected colour, shape and size all equal the named object's (the one
shown at the callback's target shot); recall is reported over all callbacks and apart for callbacks 1, 2-4 and
5 or more shots back. Ground truth scores ~100; a video whose callback shots show another object scores 0 on
those shots (tests/test_demo_long.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .evaluate import METRICS, score_story, summarize
from .long_world import BUCKETS, LongStory, bucket_of

RECALL_COLUMNS = ("recall", *(f"recall_{b}" for b in BUCKETS))


@dataclass
class CallbackScore:
    shot: int
    distance: int
    bucket: str
    recalled: bool
    colour: bool
    shape: bool
    size: bool


def score_long_story(video: torch.Tensor, story: LongStory) -> tuple[list, list[CallbackScore]]:
    """(per-shot ShotScores of the short evaluator, one CallbackScore per callback shot)."""
    shots = score_story(video, story.world_story())
    callbacks = []
    for k, (kind, target) in enumerate(zip(story.kinds, story.targets)):
        if kind != "callback":
            continue
        want, found = story.shots[target].thing, shots[k].found
        hits = {a: found[a] == getattr(want, a) for a in ("colour", "shape", "size")}
        callbacks.append(CallbackScore(k, k - target, bucket_of(k - target), all(hits.values()), **hits))
    return shots, callbacks


def summarize_long(results: list[tuple[list, list[CallbackScore]]]) -> dict:
    """The short evaluator's percentages over every shot, plus recall (all callbacks, and per distance bucket,
    with the number of callbacks in each: `callbacks_1`, ...)."""
    out = summarize([shots for shots, _ in results])
    calls = [c for _, cs in results for c in cs]
    pct = lambda xs: round(100.0 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    out["recall"] = pct([c.recalled for c in calls])
    for b in BUCKETS:
        inside = [c.recalled for c in calls if c.bucket == b]
        out[f"recall_{b}"] = pct(inside)
        out[f"callbacks_{b}"] = len(inside)
    for a in ("shape", "size"):
        out[f"recall_{a}"] = pct([getattr(c, a) for c in calls])
    out["callbacks"] = len(calls)
    return out


SCORE_COLUMNS = tuple(m for m in METRICS if m != "detected") + RECALL_COLUMNS


def mean_score(summary: dict) -> float:
    """The mean of every evaluator figure and the overall recall (what `% of dense` compares)."""
    vals = [summary[m] for m in (*(m for m in METRICS if m != "detected"), "recall") if summary.get(m) is not None]
    return round(sum(vals) / len(vals), 2) if vals else float("nan")


def evaluate_long(model, stories: list[LongStory], *, steps: int, cfg: float, shift: float, solver: str = "unipc",
                  moga=None, seed: int = 0, dense_steps: float = 0.0, batch: int = 1, device=None,
                  callback=None, on_video=None) -> dict:
    """Generate each story (noise seed = seed + its index), decode, score; attention FLOPs counted by
    `moga.diagnostics.attention_flops` (stories of one shape are batched `batch` at a time); `callback(i, n, x)`
    after every sampling step, as `generate` calls it; `on_video(index, video)` with each decoded story
    ([3, T, H, W] in -1..1, on the CPU), for pictures."""
    from ..diagnostics import attention_flops
    from .generate import decode, generate

    results = []
    start = time.perf_counter()
    with attention_flops(model) as count:
        for lo in range(0, len(stories), batch):
            part = stories[lo:lo + batch]
            shapes = {(tuple(s.shot_frames), s.size) for s in part}
            groups = [part] if len(shapes) == 1 else [[s] for s in part]
            for i, group in enumerate(groups):
                first = lo + (0 if len(groups) == 1 else i)
                lat = generate(model, group, steps=steps, cfg=cfg, shift=shift, solver=solver, moga=moga,
                               seeds=[seed + first + j for j in range(len(group))], device=device,
                               dense_steps=dense_steps, callback=callback)
                video = decode(model, lat, group[0]).cpu()
                results += [score_long_story(video[j], s) for j, s in enumerate(group)]
                if on_video is not None:
                    for j in range(len(group)):
                        on_video(first + j, video[j])
    summary = summarize_long(results)
    ratio = count.flops / count.dense_flops if count.dense_flops else 1.0
    return {**summary, "score": mean_score(summary), "attention_flops_ratio": round(ratio, 4),
            "attention_gflops": round(count.flops / len(stories) / 1e9, 3),
            "seconds": round(time.perf_counter() - start, 1)}
