"""Training-free MoGA on a dense-trained demo model: how close do calibrated routers come to dense attention?

    python benchmarks/training_free.py --dense runs/demo-dense/model.safetensors        # the measurement
    python benchmarks/training_free.py --smoke                                           # tiny random model, seconds
    python benchmarks/training_free.py --table benchmarks/results/training_free.json --doc docs/training-free.md
                                                             # the tables of a result file, written into the doc
                                                             # (one marked block per result file)

For every M in --groups, routers are calibrated training-free for the dense model (`calibrate_routers`:
k-means of each layer's self-attention inputs on a short dense pass, what `moga patch` does) and written
with `patch_checkpoint` as a MoGA checkpoint. Each variant then renders the same held-out stories
(moga.demo.world.heldout_stories, same seeds) with the demo's sampling settings and is scored by the demo
evaluator (moga.demo.evaluate):
    dense                       the dense model itself
    M=m lse|mean, warm-up w     calibrated routers, fusion, first w of the steps dense
    ... cap c                   with group capacity c (--capacity; MoGAConfig.capacity)
Per variant: the evaluator's metrics, `score` (their mean: colour, shape, size, direction, background,
consistency, smoothness), the final latent's error against the dense run of the same seed, attention
FLOPs per video (QK^T and PV, guidance passes included) and their share of dense.
Per M and fusion: per-layer attention recall and output error (moga.diagnostics.inspect_step) on the first
stories' ground-truth latents noised to early / middle / late sigmas of the schedule.
Writes JSON (--out) and prints markdown tables (also --markdown FILE).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moga import checkpoint as ckpt  # noqa: E402
from moga.diagnostics import attention_flops, inspect_step, relative_error  # noqa: E402
from moga.sampling import make_schedule, sample  # noqa: E402

SCORE_METRICS = ("colour", "shape", "size", "direction", "background", "consistency", "smoothness")


def _demo():
    import moga.demo.model as demo_model  # registers the demo's extras loader
    from moga.demo import evaluate, world
    return demo_model, evaluate, world


def story_inputs(model, story):
    """(per-shot embeddings, negative, latent shot frames, latent size) of a story for this model."""
    codec = model.vae
    pos = model.text_encoder.encode(story.captions)
    neg = model.text_encoder.encode([""])[0]
    shot_frames = tuple((f - 1) // codec.temporal_ratio + 1 for f in story.shot_frames)
    side = story.size // codec.spatial_ratio
    return pos, neg, shot_frames, (sum(shot_frames), side, side)


def render(model, story, seed, sampling, moga=None, dense_steps=0.0):
    pos, neg, shot_frames, size = story_inputs(model, story)
    with attention_flops(model) as count:
        latent = sample(model, pos, neg, shot_frames=shot_frames, latent_size=size, steps=sampling["steps"],
                        cfg=sampling["cfg"], shift=sampling["shift"], solver=sampling["solver"], seed=seed,
                        moga=moga, dense_steps=dense_steps)
    video = model.vae.decode_shots(latent, shot_frames)[0]
    return latent, video, count


def score_of(summary: dict) -> float:
    vals = [summary[m] for m in SCORE_METRICS if summary.get(m) is not None]
    return round(sum(vals) / len(vals), 2) if vals else float("nan")


def run_variant(model, stories, sampling, evaluate, reference=None, moga=None, dense_steps=0.0, seed=0):
    scores, errors, flops, dense_flops, latents = [], [], 0.0, 0.0, []
    t0 = time.perf_counter()
    for i, story in enumerate(stories):
        latent, video, count = render(model, story, seed + i, sampling, moga, dense_steps)
        scores.append(evaluate.score_story(video, story))
        latents.append(latent)
        flops += count.flops
        dense_flops += count.dense_flops
        if reference is not None:
            errors.append(relative_error(latent, reference[i]))
    summary = evaluate.summarize(scores)
    return {**summary, "score": score_of(summary),
            "latent_error": round(sum(errors) / len(errors), 4) if errors else 0.0,
            "attention_gflops": flops / len(stories) / 1e9, "flops_ratio": flops / dense_flops if dense_flops else 1.0,
            "seconds": round(time.perf_counter() - t0, 1)}, latents


def calibrated(model, dense_path, num_groups, out_dir, stories, world, seed, steps, capacity=None):
    """A MoGA checkpoint for the dense model with routers calibrated training-free (fusion lse, no warm-up,
    group capacity `capacity`: None/0 = off)."""
    demo_model, _, _ = _demo()
    story = world.sample_story(seed + 99_991, len(stories[0].shots))   # a training story for the text
    pos, _, shot_frames, size = story_inputs(model, story)
    layers = range(model.config.num_layers)
    routers = ckpt.calibrate_routers(dense_path, num_groups, layers, size=size, steps=steps, context=pos[0],
                                     seed=seed, model=model)
    dst = Path(out_dir) / f"calibrated-M{num_groups}.safetensors"
    ckpt.patch_checkpoint(dense_path, dst, num_groups=None, routers=routers, fusion="lse", dense_warmup=0.0,
                          capacity=capacity or 0.0)
    return demo_model.load_demo(dst)


def noised_inputs(model, story, sigmas, seed):
    """The story's ground-truth latent noised to each sigma: [(x, t)], plus per-shot text and shot frames."""
    _, _, world = _demo()
    pos, _, shot_frames, _ = story_inputs(model, story)
    video = world.render_story(story)[None]
    x0 = model.vae.encode_shots(video, story.shot_frames).float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    return [((1 - s) * x0 + s * noise, torch.tensor([s * 1000.0])) for s in sigmas], pos, shot_frames


def layer_diagnostics(model, stories, sampling, fusion, seed, queries):
    """Per layer: recall and error averaged over the stories and the three sigmas."""
    sched = make_schedule(sampling["steps"], sampling["shift"])
    picks = sorted({0, sampling["steps"] // 2, sampling["steps"] - 2})
    sigmas = [sched.sigmas[i] for i in picks]
    cfg = model.moga_config.replace(fusion=fusion)
    rows: dict[int, dict] = {}
    step_errors = []
    for k, story in enumerate(stories):
        inputs, pos, shot_frames = noised_inputs(model, story, sigmas, seed + k)
        for x, t in inputs:
            rep = inspect_step(model, x, t, pos, shot_frames=shot_frames, moga=cfg, queries=queries, seed=seed)
            step_errors.append(rep.step_error)
            for r in rep.layers:
                acc = rows.setdefault(r.layer, {"recall": [], "error": [], "overlap_mass": [], "kept": [],
                                                "largest_group": []})
                for key in acc:
                    if key == "largest_group":   # share of the tokens in the largest routed group
                        acc[key].append(max(r.group_sizes) / sum(r.group_sizes) if r.group_sizes else 0.0)
                    else:
                        acc[key].append(getattr(r, key))
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    return {"sigmas": [round(s, 3) for s in sigmas],
            "layers": {i: {k: mean(v) for k, v in acc.items()} for i, acc in sorted(rows.items())},
            "step_error": mean(step_errors)}


def smoke_model(tmp: Path) -> Path:
    """A tiny random dense demo-format model (untrained: scores near 0; for checking the pipeline)."""
    demo_model, _, _ = _demo()
    from moga.demo.codec import DemoCodec
    from moga.demo.training import _tiny
    model, text = _tiny(dense=True, seed=0)
    codec = DemoCodec(hidden=16, blocks=1)
    return demo_model.save_demo(tmp / "tiny-dense.safetensors", model, text, codec, dtype=torch.float32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", help="the dense-trained demo model (.safetensors)")
    p.add_argument("--trained", help="optional: the MoGA-trained demo model, scored as a reference row")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 story, 2 steps")
    p.add_argument("--stories", type=int, default=8)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--groups", default="2,4,8")
    p.add_argument("--fusions", default="lse,mean")
    p.add_argument("--warmups", default="0,0.25", help="dense warm-up fractions")
    p.add_argument("--capacity", type=float, default=0.0,
                   help="routed group capacity (MoGAConfig.capacity, written into the calibrated checkpoint): "
                        "groups over ceil(capacity * N / M) tokens are cut into runs; 0 = off (the default here, "
                        "so that variant names without 'cap' mean uncapped)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the demo model's)")
    p.add_argument("--calibration-steps", type=int, default=3)
    p.add_argument("--diag-stories", type=int, default=2)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/training_free[-smoke].json)")
    p.add_argument("--markdown", default=None, help="also write the tables here")
    p.add_argument("--table", metavar="JSON", help="only print the tables of a result file (no measurement)")
    p.add_argument("--doc", metavar="MD", help="with --table: replace the tables between the markers in this "
                                               "markdown file (docs/training-free.md)")
    p.add_argument("--resume", action="store_true", help="keep the variants already in --out (same settings) and "
                                                          "measure only the missing ones")
    args = p.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        if args.doc:
            write_doc_tables(args.doc, result, source_name(args.table))
        print(tables(result))
        return result
    if args.doc:
        p.error("--doc goes with --table JSON")
    if not args.dense and not args.smoke:
        p.error("give --dense MODEL (the dense-trained demo model) or --smoke")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="moga-training-free-"))   # calibrated checkpoints; removed at the end
    try:
        return measure(args, tmp, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: Path, argv) -> dict:
    demo_model, evaluate, world = _demo()
    dense_path = smoke_model(tmp) if args.smoke else Path(args.dense)
    if args.smoke:
        args.stories, args.diag_stories, args.queries = 1, 1, 32
        args.steps = args.steps or 2
    dense = demo_model.load_demo(dense_path)
    if dense.config.moga_layers:
        print(f"note: {dense_path} has routers; calibration replaces them (its dense path is what is measured)")
    sampling = dict(demo_model.SAMPLING)
    info = demo_model.demo_info(dense)
    sampling.update(info.get("sampling", {}))
    if args.steps:
        sampling["steps"] = args.steps
    size = info.get("world", {}).get("size", world.DEFAULT_SIZE)
    stories = world.heldout_stories(args.stories, num_shots=args.shots, seed=args.seed, size=size)
    groups = [int(g) for g in args.groups.split(",")]
    fusions = args.fusions.split(",")
    warmups = [float(w) for w in args.warmups.split(",")]

    out = Path(args.out or f"benchmarks/results/training_free{'-smoke' if args.smoke else ''}.json")
    settings = {"dense_model": "tiny random (smoke)" if args.smoke else str(dense_path), "stories": args.stories, "shots": args.shots, "sampling": sampling,
                "calibration_steps": args.calibration_steps, "queries": args.queries, "diag_stories": args.diag_stories,
                "seed": args.seed, "smoke": args.smoke}
    old = json.loads(out.read_text()) if (args.resume and out.exists()) else {}
    if old and old.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"--resume: {out} was measured with other settings ({old.get('settings')}); "
                         f"use another --out or the same settings")
    rows = {r["variant"]: r for r in old.get("rows", [])}
    diags = dict(old.get("diagnostics", {}))
    commands = old.get("commands", []) + [
        "python benchmarks/training_free.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    say = lambda msg: print(msg, flush=True)  # noqa: E731

    def save():
        result = {"date": datetime.date.today().isoformat(), "device": "cpu: " + (platform.processor() or
                  platform.machine()), "threads": torch.get_num_threads(), "settings": settings,
                  "tokens": _tokens(dense, stories[0]), "rows": list(rows.values()), "diagnostics": diags,
                  "commands": commands}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        return result

    # the dense run's latents are the reference for every variant's latent error; kept between resumed runs
    cache = Path(tempfile.gettempdir()) / f"moga-training-free-{zlib.crc32(str(out.resolve()).encode()):08x}.safetensors"
    if "dense" in rows and cache.exists():
        from safetensors.torch import load_file
        saved = load_file(str(cache))
        ref_latents = [saved[str(i)] for i in range(len(stories))]
    else:
        base, ref_latents = run_variant(dense, stories, sampling, evaluate, seed=args.seed,
                                        moga=dense.moga_config.replace(dense=True))   # routers or not: dense
        rows["dense"] = {"variant": "dense", "groups": None, "fusion": None, "warmup": None, **base}
        from safetensors.torch import save_file
        save_file({str(i): t.contiguous() for i, t in enumerate(ref_latents)}, str(cache))
        save()
    base = rows["dense"]
    say(f"dense: {base}")
    if args.trained:
        trained = demo_model.load_demo(args.trained)
        name = f"trained MoGA M={trained.config.num_groups} {trained.moga_config.fusion}"
        if name not in rows:
            res, _ = run_variant(trained, stories, sampling, evaluate, ref_latents, seed=args.seed)
            rows[name] = {"variant": name, "groups": trained.config.num_groups,
                          "fusion": trained.moga_config.fusion, "warmup": 0.0, **res}
            save()
        say(f"{name}: {rows[name]}")
    cap = f" cap {args.capacity:g}" if args.capacity else ""
    for m in groups:
        todo = [(f, w) for f in fusions for w in warmups if f"M={m} {f} warm-up {w:g}{cap}" not in rows]
        if not todo and all(f"M={m} {f}{cap}" in diags for f in fusions):
            continue
        t0 = time.perf_counter()
        model = calibrated(dense, dense_path, m, tmp, stories, world, args.seed, args.calibration_steps,
                           args.capacity)
        say(f"calibrated M={m} in {time.perf_counter() - t0:.1f} s")
        for fusion in fusions:
            if f"M={m} {fusion}{cap}" not in diags:
                diags[f"M={m} {fusion}{cap}"] = layer_diagnostics(model, stories[:args.diag_stories], sampling,
                                                                 fusion, args.seed, args.queries)
                save()
            for w in warmups:
                name = f"M={m} {fusion} warm-up {w:g}{cap}"
                if name in rows:
                    continue
                res, _ = run_variant(model, stories, sampling, evaluate, ref_latents,
                                     moga=model.moga_config.replace(fusion=fusion), dense_steps=w, seed=args.seed)
                rows[name] = {"variant": name, "groups": m, "fusion": fusion, "warmup": w,
                              "capacity": args.capacity or None, **res}
                save()
                say(f"{name}: score {res['score']} (dense {base['score']}), FLOPs x{res['flops_ratio']:.3f}, "
                    f"latent error {res['latent_error']}, {res['seconds']} s")
    result = save()
    text = tables(result)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return result


def _tokens(model, story) -> int:
    _, _, shot_frames, (f, h, w) = story_inputs(model, story)
    ph, pw = model.config.patch_size[1:]
    return f * (h // ph) * (w // pw)


DEFAULT_SOURCE = "benchmarks/results/training_free.json"
DOC_END = "<!-- end of generated tables -->"


def doc_begin(source: str = DEFAULT_SOURCE) -> str:
    """The opening marker of the block of tables generated from the result file `source` (a doc may hold one
    block per result file)."""
    return (f"<!-- generated from {source} by `python benchmarks/training_free.py "
            f"--table {source} --doc docs/training-free.md`: do not edit by hand -->")


DOC_BEGIN = doc_begin()


def source_name(path) -> str:
    """How a result file is named in the doc's markers: relative to the repository when inside it."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def doc_tables(result: dict, source: str = DEFAULT_SOURCE) -> str:
    """The block of the doc between (and with) the markers of `source`."""
    return f"{doc_begin(source)}\n\n{tables(result)}\n\n{DOC_END}"


def write_doc_tables(doc, result: dict, source: str = DEFAULT_SOURCE) -> None:
    """Replace the block of `doc` marked for `source` with the tables of `result` (the doc cannot drift from the
    JSON); the block ends at the first end marker after its opening marker."""
    path = Path(doc)
    text = path.read_text()
    begin = doc_begin(source)
    if text.count(begin) != 1 or DOC_END not in text.split(begin, 1)[1]:
        raise SystemExit(f"{doc} needs one line\n{begin}\nand, after it, one line\n{DOC_END}\n"
                         f"where the tables go")
    head, rest = text.split(begin)
    tail = rest.split(DOC_END, 1)[1]
    path.write_text(head + doc_tables(result, source) + tail)


def lowest_figure(row: dict, dense: dict) -> str:
    """The evaluator figure on which `row` comes closest to failing dense: the lowest row/dense ratio."""
    ratios = [(100.0 * row[m] / dense[m], m) for m in SCORE_METRICS
              if row.get(m) is not None and dense.get(m)]
    if row is dense or not ratios:
        return "-"
    pct, name = min(ratios)
    return f"{name} {pct:.0f}%"


def tables(result: dict) -> str:
    dense = next(r for r in result["rows"] if r["variant"] == "dense")
    head = ("| variant | score | % of dense | colour | shape | size | direction | background | consistency | "
            "smoothness | lowest figure vs dense | latent error | attention GFLOP/video | FLOPs vs dense |")
    lines = [head, "|" + "---|" * 14]
    order = lambda r: (r["groups"] is not None, r["variant"].startswith("M="), r.get("capacity") or 0,  # noqa: E731
                       r["groups"] or 0, r["fusion"] or "", r["warmup"] or 0.0)
    for r in sorted(result["rows"], key=order):
        rel = 100.0 * r["score"] / dense["score"] if dense["score"] else float("nan")
        cons = "-" if r["consistency"] is None else f"{r['consistency']:.1f}"
        lines.append(f"| {r['variant']} | {r['score']:.1f} | {rel:.0f}% | {r['colour']:.1f} | {r['shape']:.1f} | "
                     f"{r['size']:.1f} | {r['direction']:.1f} | {r['background']:.1f} | {cons} | "
                     f"{r['smoothness']:.1f} | {lowest_figure(r, dense)} | {r['latent_error']:.3f} | {r['attention_gflops']:.2f} | "
                     f"{r['flops_ratio']:.3f} |")
    diag = result["diagnostics"]
    if diag:
        layers = sorted({int(i) for d in diag.values() for i in d["layers"]})
        lines += ["", "Per layer (mean over stories and sigmas " + ", ".join(
            str(s) for s in next(iter(diag.values()))["sigmas"]) + "): recall / output error", "",
            "| variant | " + " | ".join(f"layer {i}" for i in layers) + " | model output error |",
            "|" + "---|" * (len(layers) + 2)]
        for name, d in diag.items():
            cells = [f"{d['layers'][i]['recall']:.3f} / {d['layers'][i]['error']:.3f}"
                     for i in (k if k in d["layers"] else str(k) for k in layers)]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {d['step_error']:.3f} |")
        if all("largest_group" in v for d in diag.values() for v in d["layers"].values()):
            lines += ["", "Share of the tokens in the largest routed group, per layer (balanced: 1/M)", "",
                      "| variant | " + " | ".join(f"layer {i}" for i in layers) + " |",
                      "|" + "---|" * (len(layers) + 1)]
            for name, d in diag.items():
                cells = [f"{d['layers'][i]['largest_group']:.2f}"
                         for i in (k if k in d["layers"] else str(k) for k in layers)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
