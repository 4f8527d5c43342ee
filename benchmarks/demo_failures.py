"""Where the demo model loses cross-shot consistency: every "it" shot of the held-out stories, scored,
with what it should show and what the evaluator saw, then failure rates by factor.

    python3 benchmarks/demo_failures.py --checkpoint moga/demo/moga-demo.safetensors --stories 128 \
        --json out.json

With --routing, also how the routed branch links each "it" shot's object to the object of the shot
before: at a few sampling steps, per layer, for the shot's object tokens, the share of object tokens
among their (capped) group's tokens in the shot before, over that shot's object share (1: the group
sees the old object no more than a random group would; higher: routed to it), for consistent and
broken shots.

Factors: the shot's index, whether the shot before also said "it" (a chain), the object's shape,
size and colour, the background before and after the cut, and which attribute broke.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.demo.evaluation import mode_config  # noqa: E402
from moga.attention.router import cap_routing  # noqa: E402
from moga.demo.evaluate import score_story, summarize  # noqa: E402
from moga.demo.generate import decode, evaluate_model, generate, latent_shot_frames  # noqa: E402
from moga.demo.model import demo_info, load_demo  # noqa: E402
from moga.demo.world import heldout_stories  # noqa: E402


def it_shots(stories, scores) -> list[dict]:
    rows = []
    for n, (story, shot_scores) in enumerate(zip(stories, scores)):
        for k, (shot, sc) in enumerate(zip(story.shots, shot_scores)):
            if sc.consistency is None:
                continue
            prev, found = shot_scores[k - 1].found, sc.found
            broke = [a for a in ("colour", "shape", "size") if prev[a] != found[a] or found[a] is None]
            rows.append({"story": n, "shot": k, "chain": not story.shots[k - 1].new,
                         "shape": shot.thing.shape, "size": shot.thing.size, "colour": shot.thing.colour,
                         "bg_before": story.shots[k - 1].background, "bg_after": shot.background,
                         "ok": bool(sc.consistency), "broke": broke,
                         "prev_found": {a: prev[a] for a in ("colour", "shape", "size")},
                         "found": {a: found[a] for a in ("colour", "shape", "size")}})
    return rows


def link_table(rows: list[dict]) -> None:
    print("\nrouted links across the cut (object share of the 'it' object's groups in the shot before / chance)")
    steps = sorted({st for r in rows for st in r["linked"]}, key=int)
    for ok in (True, False):
        sel = [r for r in rows if r["ok"] == ok]
        for st in steps:
            vals = [r["linked"][st] for r in sel if r["linked"].get(st)]
            if not vals:
                continue
            mean = [round(sum(v[j] for v in vals if v[j] is not None) / max(1, sum(v[j] is not None for v in vals)), 3)
                    for j in range(len(vals[0]))]
            print(f"  {'consistent' if ok else 'broken':<10} step {st:>3}: per layer {mean}  ({len(vals)} shots)")


def table(rows: list[dict], label: str) -> None:
    print(f"\n{label}: {sum(not r['ok'] for r in rows)} of {len(rows)} 'it' shots inconsistent")
    for factor in ("shot", "chain", "shape", "size", "bg_before", "bg_after", "colour"):
        by = defaultdict(lambda: [0, 0])
        for r in rows:
            by[r[factor]][0] += not r["ok"]
            by[r[factor]][1] += 1
        cells = "  ".join(f"{k}: {f}/{n}" for k, (f, n) in sorted(by.items(), key=lambda x: str(x[0])))
        print(f"  {factor:<10} {cells}")
    broke = defaultdict(int)
    for r in rows:
        for a in r["broke"]:
            broke[a] += 1
    print(f"  broke      {dict(broke)}")
    swaps = defaultdict(int)
    for r in rows:
        if "shape" in r["broke"]:
            swaps[f"{r['prev_found']['shape']}->{r['found']['shape']}"] += 1
    print(f"  shape      {dict(swaps)}")


def object_tokens(video: torch.Tensor, shot_frames, temporal: int = 4, token_px: int = 16,
                  min_share: float = 0.25) -> torch.Tensor:
    """[B, F, h, w] bool: tokens (16x16 pixels) of each latent frame at least `min_share` covered by the
    object in the frame that latent frame starts with (frame 0 alone, then every 4th): no growth, so
    the object is the object and not its whole path."""
    obj = ((video - video[..., :1, :1]).abs().sum(1) > 0.05).float()         # [B, T, H, W]
    frames, start = [], 0
    for f in shot_frames:
        frames += [start] + [start + 1 + temporal * j for j in range((f - 1) // temporal)]
        start += f
    cover = torch.nn.functional.avg_pool2d(obj[:, frames], token_px)         # [B, F, h, w]
    return cover >= min_share


def routed_links(model, stories, *, steps, cfg, shift, solver, moga, device, seed, at=(4, 12, 24),
                 batch: int = 16, dense_steps: float = 0.0):
    """(scores, links): links[n][k] = {step: [linked share per layer]} for every 'it' shot k of story n."""
    layers = [m for m in model.modules() if getattr(m, "router", None) is not None and hasattr(m, "record_routing")]
    scores, links = [], []
    for lo in range(0, len(stories), batch):
        part = stories[lo:lo + batch]
        b = len(part)
        taken = {}

        def keep(i, n, x):
            if i in at and all(layer.last_routing is not None for layer in layers):  # not a dense step
                taken[i] = [cap_routing(layer.last_routing, moga.capacity, moga.capacity_split).group_ids[:b].cpu()
                            if moga.capacity else layer.last_routing.group_ids[:b].cpu() for layer in layers]

        for layer in layers:
            layer.record_routing = True
        try:
            lat = generate(model, part, steps=steps, cfg=cfg, shift=shift, solver=solver,
                           seeds=[seed + lo + i for i in range(b)], moga=moga, device=device, callback=keep,
                           dense_steps=dense_steps)
        finally:
            for layer in layers:
                layer.record_routing = False
        video = decode(model, lat, part[0]).cpu()
        shots = latent_shot_frames(part[0])
        tok = object_tokens(video, part[0].shot_frames)                   # [b, F, 8, 8]
        per_frame = tok.shape[2] * tok.shape[3]
        bounds = [0]
        for f in shots:
            bounds.append(bounds[-1] + f * per_frame)
        for i, story in enumerate(part):
            sc = score_story(video[i], story)
            scores.append(sc)
            flat = tok[i].reshape(-1).bool()
            row = {}
            for k in range(1, len(story.shots)):
                if story.shots[k].new:
                    continue
                here = torch.zeros_like(flat)
                here[bounds[k]:bounds[k + 1]] = True
                before = torch.zeros_like(flat)
                before[bounds[k - 1]:bounds[k]] = True
                cur, prev = flat & here, flat & before
                row[k] = {}
                for step, per_layer in taken.items():
                    shares = []
                    base = float(prev.sum()) / float(before.sum())
                    for ids in per_layer:
                        g = ids[i]
                        if not (cur.any() and prev.any()):
                            shares.append(None)
                            continue
                        # per group: of its tokens in the shot before, the share that are the object
                        m = int(g.max()) + 1
                        in_before = torch.bincount(g[before], minlength=m).float()
                        obj_before = torch.bincount(g[prev], minlength=m).float()
                        purity = obj_before / in_before.clamp(min=1)
                        shares.append(round(float(purity[g[cur]].mean()) / base, 3))
                    row[k][step] = shares
            links.append(row)
    return scores, links


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", action="append", required=True, help="repeat for several models")
    ap.add_argument("--stories", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dense-steps", type=float, default=None,
                    help="fraction of the first steps run dense (default: the file's dense warm-up)")
    ap.add_argument("--routing", action="store_true", help="also measure the routed links across each cut")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    stories = heldout_stories(args.stories, seed=args.seed)
    out = {}
    for path in args.checkpoint:
        model = load_demo(path, device=args.device)
        s = demo_info(model)["sampling"]
        moga = mode_config(model, "moga") if model.config.moga_layers else None
        kw = dict(steps=args.steps or s["steps"], cfg=args.cfg or s["cfg"], shift=s["shift"], solver=s["solver"],
                  moga=moga, device=args.device, seed=args.seed,
                  dense_steps=0.0 if moga is None else
                  float(model.dense_warmup if args.dense_steps is None else args.dense_steps))
        if args.routing and moga is not None:
            scores, links = routed_links(model, stories, **kw)
            summary = summarize(scores)
        else:
            res = evaluate_model(model, stories, **kw)
            scores, links, summary = res.scores, None, dict(res.summary, attention_flops_ratio=round(res.flop_ratio, 4))
        rows = it_shots(stories, scores)
        if links is not None:
            for r in rows:
                r["linked"] = links[r["story"]][r["shot"]]
            link_table(rows)
        out[path] = {"summary": summary, "dense_steps": kw["dense_steps"], "it_shots": rows}
        table(rows, f"{Path(path).parent.name}/{Path(path).name} ({summary})")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
