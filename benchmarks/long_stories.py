"""Long stories (moga.demo.long_world): the same held-out stories under every attention mode, scored by the
long-story evaluator (every short-world figure + long-range recall by distance), with attention FLOPs and time.

    python benchmarks/long_stories.py --checkpoint MOGA --dense-checkpoint DENSE --stories 32 --steps 40 \\
        --out benchmarks/results/long-stories-h200.json
    python benchmarks/long_stories.py --table benchmarks/results/long-stories-h200.json --doc docs/long-stories.md

Modes (rows):
  dense        the dense twin (DENSE), full attention
  moga         the MoGA model as its file says (its dense warm-up, capacity)
  window       the MoGA model, window branch alone
  lse          the dense twin + routers calibrated training-free (`moga patch`: k-means, lse fusion, capacity 1), no warm-up
  lse-warmup   the same with `moga patch`'s dense warm-up (the first 25% of the steps dense)
  topk         the dense twin with SLA-style top-k block attention at MoGA's keep ratio and MoGA's warm-up
  sol          the dense twin with comfy-kitchen's sol_attn at core's defaults (tau 1.3, 256 extra tokens, the first
               20% of the steps dense); skipped with the reason when comfy-kitchen >= 0.2.40 is not importable
  sol-equal    sol_attn with MoGA's warm-up and tau fitted so its attention FLOPs equal MoGA's
Without --dense-checkpoint the dense-twin rows run the MoGA file's weights with routers off (a stand-in; the JSON
and the table say so). Attention FLOPs: QK^T + PV of every self-attention call over the pairs attended (Sol-Attn:
its exact token pairs + one pooled term per query row and other key block + its block proxy), against dense.
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
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moga import checkpoint as ckpt  # noqa: E402
from moga.demo.long_evaluate import evaluate_long  # noqa: E402
from moga.demo.long_world import BUCKETS, LONG_SHOT_FRAMES, heldout_long_stories, tokens_per_story  # noqa: E402
from moga.demo.model import DEMO_PATH, demo_info, load_demo  # noqa: E402
from moga.demo import sparse_baselines as sb  # noqa: E402
from moga.sampling import dense_step_count  # noqa: E402

MODES = ("dense", "moga", "window", "lse", "lse-warmup", "topk", "sol", "sol-equal")
SOL_TAU, SOL_EXTRA, SOL_DENSE = 1.3, 256, 0.2   # ComfyUI core's Model Sparse Attention defaults


def file_label(path: Path) -> str:
    """A checkpoint's name for the table: its folder too when the file is a run's generic model.safetensors."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name == "model.safetensors" and path.parent.name else path.name


def _device_name(device) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _latent_size(model, story):
    shots = tuple((f - 1) // model.vae.temporal_ratio + 1 for f in story.shot_frames)
    side = story.size // model.vae.spatial_ratio
    return shots, (sum(shots), side, side)


def calibrated(path, twin, story, out_dir: Path, groups: int, seed: int, device):
    """The twin's file with routers calibrated training-free on a held-out story's size (lse, capacity 1)."""
    _, size = _latent_size(twin, story)
    context = twin.text_encoder.encode([story.captions[0]])[0]
    routers = ckpt.calibrate_routers(path, groups, range(twin.config.num_layers), size=size, steps=3,
                                     context=context, seed=seed, model=twin)
    dst = out_dir / f"calibrated-M{groups}.safetensors"
    ckpt.patch_checkpoint(path, dst, num_groups=None, routers=routers, fusion="lse", dense_warmup=0.0,
                          capacity=ckpt.CALIBRATED_CAPACITY)
    return load_demo(dst, device=device)


@torch.inference_mode()
def captured_qk(model, story, sampling, moga, seed: int):
    """(q, k) of every self-attention call of one model call at the middle of the schedule (for fitting tau)."""
    from moga.attention import layer
    from moga.sampling import initial_noise, make_schedule

    shots, size = _latent_size(model, story)
    sched = make_schedule(sampling["steps"], sampling["shift"])
    s = sched.sigmas[sampling["steps"] // 2]
    x = initial_noise((1, model.vae.latent_channels, *size), seed).to(model.device)
    ctx = [t.to(model.device) for t in model.text_encoder.encode(story.captions)]
    seen, original = [], layer.dense_attention

    def grab(q, k, v):
        seen.append((q[0].float().cpu(), k[0].float().cpu()))
        return original(q, k, v)

    layer.dense_attention = grab
    try:
        model(x, torch.tensor([s * 1000.0], device=model.device), ctx, shot_frames=shots, moga=moga)
    finally:
        layer.dense_attention = original
    return seen


def sparse_ratio(calls, tau: float, extra: int = 0) -> float:
    pairs = sum(sb.sol_pairs(q[None], k[None], tau, extra_tokens=extra) for q, k in calls)
    dense = sum(q.shape[0] ** 2 * q.shape[1] for q, _ in calls)
    return pairs / dense


def fit_tau(calls, target: float, lo: float = -4.0, hi: float = 12.0, extra: int = 0) -> tuple[float, float]:
    """tau whose sparse-step FLOP ratio is nearest `target` (bisection; the ratio falls as tau rises); the
    largest tau tried when even it spends more (the diagonal blocks and pooled terms are a floor)."""
    if sparse_ratio(calls, hi, extra) >= target:
        return hi, sparse_ratio(calls, hi, extra)
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sparse_ratio(calls, mid, extra) > target else (lo, mid)
    return hi, sparse_ratio(calls, hi, extra)


def moga_sparse_ratio(model, story, sampling, seed: int) -> float:
    """MoGA's attention FLOPs against dense in a step without the warm-up (the keep ratio top-k gets)."""
    from moga.diagnostics import attention_flops

    with attention_flops(model) as count:
        captured_qk(model, story, sampling, model.moga_config, seed)
    return count.flops / count.dense_flops


def story_strip(video: torch.Tensor, story) -> "np.ndarray":
    """The middle frame of every shot of one decoded story ([3, T, H, W] in -1..1), side by side: [H, S*W, 3]."""
    import numpy as np

    frames, start = [], 0
    for n in story.shot_frames:
        frames.append(video[:, start + n // 2])
        start += n
    strip = torch.cat(frames, dim=-1)
    return ((strip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(np.uint8)


def save_sheet(folder: Path, story, modes_done) -> Path | None:
    """Every mode's strip of the same story, one row each, labelled; the columns say what each shot asks."""
    import numpy as np
    from PIL import Image, ImageDraw

    strips = [(m, folder / f"strip-{m}.png") for m in MODES if m in modes_done]
    strips = [(m, f) for m, f in strips if f.exists()]
    if not strips:
        return None
    rows = [(m, np.asarray(Image.open(f).convert("RGB"))) for m, f in strips]
    h, w = rows[0][1].shape[:2]
    label_w, head_h = 190, 28
    shot_w = w // len(story.shot_frames)
    sheet = Image.new("RGB", (label_w + w, head_h + h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (kind, target) in enumerate(zip(story.kinds, story.targets)):
        text = f"{k + 1}: " + ("new" if kind == "new" else "it" if kind == "it" else f"recall {k - target} back")
        draw.text((label_w + k * shot_w + 4, 8), text, fill=(0, 0, 0))
    for r, (mode, pixels) in enumerate(rows):
        sheet.paste(Image.fromarray(pixels), (label_w, head_h + r * h))
        draw.text((6, head_h + r * h + h // 2 - 6), LABELS[mode], fill=(0, 0, 0))
    out = folder / "long-story-modes.jpg"
    tmp = out.with_name("." + out.name + ".tmp")
    sheet.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, out)
    return out


def measure(args, tmp: Path, argv) -> dict:
    device = args.device
    moga_path = Path(args.checkpoint or DEMO_PATH)
    model = load_demo(moga_path, device=device)
    twin_path = Path(args.dense_checkpoint) if args.dense_checkpoint else moga_path
    twin = load_demo(twin_path, device=device) if args.dense_checkpoint else model
    stand_in = not args.dense_checkpoint
    info = demo_info(model)
    trained_long = (info.get("training") or {}).get("world") == "long"
    s = info["sampling"]
    sampling = dict(steps=args.steps or s["steps"], cfg=args.cfg or s["cfg"], shift=s["shift"], solver=s["solver"])
    stories = heldout_long_stories(args.stories, args.shots, seed=args.seed, shot_frames=args.shot_frames)
    out = Path(args.out)
    settings = {"moga_dense_steps": args.moga_dense_steps, "checkpoint": file_label(moga_path),
                "dense_checkpoint": file_label(twin_path) if not stand_in else None,
                "stand_in_twin": stand_in, "trained_on_long_stories": trained_long, "stories": args.stories,
                "shots": args.shots, "shot_frames": args.shot_frames, "seed": args.seed, "sampling": sampling}
    old = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if old and old.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"--resume: {out} holds other settings ({old.get('settings')}); use another --out")
    rows = {r["mode"]: r for r in old.get("rows", [])}
    skipped = dict(old.get("skipped", {}))
    commands = old.get("commands", []) + ["python benchmarks/long_stories.py " + " ".join(argv)]
    dense_cfg = twin.moga_config.replace(dense=True)
    warm = float(model.dense_warmup if args.moga_dense_steps is None else args.moga_dense_steps)

    def save():
        result = {"date": datetime.date.today().isoformat(), "device": _device_name(device), "settings": settings,
                  "tokens": [tokens_per_story(st) for st in stories], "rows": list(rows.values()),
                  "skipped": skipped, "commands": commands}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        return result

    pictures = Path(args.pictures) if args.pictures else None

    def keep_picture(mode):
        def on_video(index, video):
            if pictures is not None and index == 0:
                from PIL import Image
                pictures.mkdir(parents=True, exist_ok=True)
                Image.fromarray(story_strip(video, stories[0])).save(pictures / f"strip-{mode}.png")
        return on_video

    def run(mode, mdl, moga=None, dense_steps=0.0, override=None, **extra):
        if mode in rows or mode not in args.modes:
            return
        print(f"{mode}: {len(stories)} stories ...", flush=True)
        t0 = time.perf_counter()
        batched = dict(batch=args.batch, on_video=keep_picture(mode))
        if override is None:
            res = evaluate_long(mdl, stories, moga=moga, dense_steps=dense_steps, seed=args.seed, device=device,
                                **batched, **sampling)
        else:
            kind, kw = override
            n_dense = dense_step_count(dense_steps, sampling["steps"])
            with sb.override_attention(kind, dense_steps=n_dense, **kw) as count:
                def step(i, n, x):
                    count.step = i % n   # the next story starts at step 0
                res = evaluate_long(mdl, stories, moga=dense_cfg, seed=args.seed, device=device, callback=step,
                                    **batched, **sampling)
            res["attention_flops_ratio"] = round(count.flops / count.dense_flops, 4)
            res["attention_gflops"] = round(count.flops / len(stories) / 1e9, 3)
        rows[mode] = {"mode": mode, **res, "dense_steps": dense_steps, **extra,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(row_text(rows[mode]), flush=True)
        save()
        if pictures is not None:
            save_sheet(pictures, stories[0], rows)

    twin_note = "stand-in: MoGA weights, routers off" if stand_in else file_label(twin_path)
    run("dense", twin, moga=dense_cfg, model=twin_note)
    run("moga", model, dense_steps=warm, model=file_label(moga_path))
    run("window", model, moga=model.moga_config.replace(routed=False, per_frame=False, windowed=True),
        model=file_label(moga_path))
    if {"lse", "lse-warmup"} & set(args.modes) - set(rows):
        lse = calibrated(twin_path, twin, stories[0], tmp, args.groups, args.seed, device)
        run("lse", lse, dense_steps=0.0, model=f"{twin_note} + calibrated routers (lse, capacity 1)")
        run("lse-warmup", lse, dense_steps=ckpt.CALIBRATED_DENSE_WARMUP,
            model=f"{twin_note} + calibrated routers (lse, capacity 1)")
    if "topk" in args.modes and "topk" not in rows:
        keep = moga_sparse_ratio(model, stories[0], sampling, args.seed)
        run("topk", twin, dense_steps=warm, override=("topk", {"keep": keep}), keep=round(keep, 4), model=twin_note)
    sol_modes = {"sol", "sol-equal"} & set(args.modes) - set(rows)
    if sol_modes:
        fn, why = sb.sol_available()
        if fn is None:
            for m in sol_modes:
                skipped[m] = why
            print(f"skip {sorted(sol_modes)}: {why}", flush=True)
            save()
        else:
            ref = "fused kernel (bf16)" if sb.sol_fused(device) else "eager reference (float32)"
            run("sol", twin, dense_steps=SOL_DENSE, override=("sol", {"tau": SOL_TAU, "token_aug": SOL_EXTRA}),
                tau=SOL_TAU, token_aug=SOL_EXTRA, sol_backend=ref, model=twin_note)
            if "sol-equal" in sol_modes and "moga" not in rows:
                skipped["sol-equal"] = "needs the moga row (its FLOPs are the target): add moga to --modes"
                save()
            elif "sol-equal" in sol_modes:
                n = sampling["steps"]
                nd = dense_step_count(warm, n)
                want = (rows["moga"]["attention_flops_ratio"] * n - nd) / max(n - nd, 1)
                tau, got = fit_tau(captured_qk(twin, stories[0], sampling, dense_cfg, args.seed), want,
                                   extra=SOL_EXTRA if sb.sol_fused(device) else 0)
                run("sol-equal", twin, dense_steps=warm, override=("sol", {"tau": tau, "token_aug": SOL_EXTRA}),
                    tau=round(tau, 4), token_aug=SOL_EXTRA, sol_backend=ref, model=twin_note)
    return save()


# ---- tables --------------------------------------------------------------------------------------

COLUMNS = ("colour", "shape", "size", "direction", "background", "consistency", "smoothness", "recall",
           *(f"recall_{b}" for b in BUCKETS))
LABELS = {"dense": "dense", "moga": "MoGA as trained", "window": "window branch alone",
          "lse": "training-free lse, no warm-up", "lse-warmup": "training-free lse, warm-up 0.25",
          "topk": "top-k blocks (SLA-style)", "sol": "Sol-Attn, core defaults", "sol-equal": "Sol-Attn, MoGA's FLOPs"}


def row_text(r: dict) -> str:
    cells = " ".join("     -" if r.get(c) is None else f"{r[c]:6.1f}" for c in COLUMNS)
    return f"{r['mode']:<11} {cells} {r['attention_flops_ratio']:6.3f} {r['seconds']:7.1f}s"


def tables(result: dict) -> str:
    st = result["settings"]
    rows = {r["mode"]: r for r in result["rows"]}
    dense = rows.get("dense")
    head = ["| mode | model | score | % of dense | colour | shape | size | direction | background | consistency | "
            "smoothness | recall | recall 1 | recall 2-4 | recall 5+ | attention FLOPs vs dense | GFLOP/video | seconds |",
            "|" + "---|" * 18]
    for mode in MODES:
        r = rows.get(mode)
        if r is None:
            if mode in result.get("skipped", {}):
                head.append(f"| {LABELS[mode]} | skipped: {result['skipped'][mode]} |" + " |" * 16)
            continue
        rel = f"{100 * r['score'] / dense['score']:.0f}%" if dense and dense["score"] else "-"
        cells = " | ".join("-" if r.get(c) is None else f"{r[c]:.1f}" for c in COLUMNS)
        extra = f" (tau {r['tau']})" if "tau" in r else f" (keep {r['keep']})" if "keep" in r else ""
        head.append(f"| {LABELS[mode]}{extra} | {r.get('model', '')} | {r['score']:.1f} | {rel} | {cells} | "
                    f"{r['attention_flops_ratio']:.3f} | {r['attention_gflops']:.1f} | {r['seconds']:.0f} |")
    r0 = result["rows"][0] if result["rows"] else {}
    calls = " · ".join(f"{b}: {r0.get(f'callbacks_{b}', 0)}" for b in BUCKETS)
    note = (f"{st['stories']} held-out stories of {st['shots'] or '12-24'} shots × {st['shot_frames']} frames "
            f"({min(result['tokens'])}-{max(result['tokens'])} tokens), {st['sampling']['steps']} "
            f"{st['sampling']['solver']} steps, guidance {st['sampling']['cfg']}; {result['device']}, "
            f"{result['date']}; callbacks by distance {calls}. Model "
            f"{'trained' if st['trained_on_long_stories'] else 'NOT trained'} on long stories"
            f"{'; dense-twin rows: a stand-in (the MoGA weights with routers off)' if st['stand_in_twin'] else ''}.")
    return "\n".join(head + ["", note])


DOC_END = "<!-- end of generated tables -->"


def doc_begin(source: str) -> str:
    return (f"<!-- generated from {source} by `python benchmarks/long_stories.py --table {source} "
            f"--doc docs/long-stories.md`: do not edit by hand -->")


def write_doc(doc, result: dict, source: str) -> None:
    path = Path(doc)
    text = path.read_text()
    begin = doc_begin(source)
    if text.count(begin) != 1 or DOC_END not in text.split(begin, 1)[1]:
        raise SystemExit(f"{doc} needs one line\n{begin}\nand, after it, a line\n{DOC_END}\nwhere the table goes")
    head, rest = text.split(begin)
    path.write_text(f"{head}{begin}\n\n{tables(result)}\n\n{DOC_END}{rest.split(DOC_END, 1)[1]}")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="the MoGA demo model (default: the shipped one)")
    p.add_argument("--dense-checkpoint", default=None, help="its dense twin (default: a stand-in, see above)")
    p.add_argument("--stories", type=int, default=8)
    p.add_argument("--shots", type=int, default=None, help="shots per story (default: 12-24, drawn per story)")
    p.add_argument("--shot-frames", type=int, default=LONG_SHOT_FRAMES)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 40)")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--groups", type=int, default=8, help="M of the calibrated routers")
    p.add_argument("--moga-dense-steps", type=float, default=None,
                   help="the MoGA row's dense warm-up (and top-k's, sol-equal's): default the file's moga.dense_warmup")
    p.add_argument("--seed", type=int, default=0, help="held-out stories and noise")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="stories sampled at once (the same noise per story either "
                   "way; a GPU wants 8 or more)")
    p.add_argument("--pictures", metavar="DIR", default=None,
                   help="write the first story's middle frame of every shot per mode (DIR/strip-MODE.png) and all "
                        "modes as one labelled sheet, DIR/long-story-modes.jpg")
    p.add_argument("--out", default="benchmarks/results/long-stories.json")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, measure the rest")
    p.add_argument("--table", metavar="JSON", help="only print the table of a result file")
    p.add_argument("--doc", metavar="MD", help="with --table: replace the table between the markers in MD")
    args = p.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        if args.doc:
            write_doc(args.doc, result, args.table)
        print(tables(result))
        return result
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        p.error(f"unknown modes {bad}: choose from {MODES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="the demo text encoder does not know")
    tmp = Path(tempfile.mkdtemp(prefix="moga-long-stories-"))
    try:
        result = measure(args, tmp, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
