"""The embedded demo: a synthetic multi-shot world, its scorer, and a small MoGA video model trained on it.

    python -m moga demo --out demo.mp4        # a 4-shot story from the shipped model, on a CPU
    python -m moga.eval demo                  # held-out stories: MoGA vs dense vs window-only
    python -m moga.train demo --out runs/x    # train one (codec, then DiT + text encoder)

Importing this package registers the demo model's extras loader with `moga.checkpoint`, so
`load_model("moga/demo/moga-demo.safetensors")` returns a model with `.text_encoder` and `.vae`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .model import DEMO_PATH, demo_info, load_demo, load_demo_extras  # registers the extras loader
from .world import DEMO_CAPTIONS, Story, render_story, sample_story, story_from_captions

# The evaluation's setting (docs/demo-model.md: 40 steps beat 20 on shape and consistency); `moga demo`
# takes 17 s with it on 2 CPU cores, inside its 60 s.
DEMO_STEPS = 40

__all__ = ["DEMO_STEPS", "DEMO_PATH", "DEMO_CAPTIONS", "Story", "demo_info", "load_demo", "load_demo_extras",
           "render_story", "run_demo", "sample_story", "story_from_captions", "add_arguments"]


def add_arguments(p) -> None:
    """The `demo` subcommand's options beyond moga.cli's own (--out --seed --steps --device --quiet)."""
    p.add_argument("--prompt", action="append", default=None,
                   help="a shot's caption (repeat per shot); default: the 4-shot demo story")
    p.add_argument("--checkpoint", default=None, help="a demo model file (default: the shipped one)")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--dense", action="store_true", help="run with dense attention (routers off)")
    p.add_argument("--dense-steps", type=float, default=None,
                   help="fraction of the first steps run dense (default: the model's dense warm-up)")
    p.add_argument("--long", type=int, nargs="?", const=12, default=None, metavar="SHOTS",
                   help="a long story of SHOTS shots (default 12) with callbacks (moga.demo.long_world)")


def run_demo(args) -> int:
    """Render a story with the demo model and write it as a video; prints where it is."""
    import torch
    from tqdm import tqdm

    from ..sampling import sample
    from ..video import video_to_frames, write_video
    from .evaluate import score_story, summarize
    from .generate import latent_shot_frames

    out = Path(getattr(args, "out", None) or "demo.mp4")
    seed = int(getattr(args, "seed", 0) or 0)
    device = torch.device(getattr(args, "device", None) or "cpu")
    quiet = bool(getattr(args, "quiet", False))
    captions = getattr(args, "prompt", None) or DEMO_CAPTIONS
    start = time.perf_counter()
    model = load_demo(getattr(args, "checkpoint", None), device=device)
    settings = demo_info(model)["sampling"]
    given_steps, given_cfg = getattr(args, "steps", None), getattr(args, "cfg", None)
    steps = DEMO_STEPS if given_steps is None else int(given_steps)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1 (the demo's own setting is {DEMO_STEPS}), got {steps}")
    cfg = float(settings["cfg"] if given_cfg is None else given_cfg)
    long_shots = getattr(args, "long", None)
    if long_shots is not None:
        from .long_world import demo_long_story
        if getattr(args, "prompt", None):
            raise ValueError("--long draws its own story: drop --prompt (or drop --long to give captions)")
        long_story = demo_long_story(seed, int(long_shots))
        captions = long_story.captions
        story = long_story.world_story()
        trained_long = (demo_info(model).get("training") or {}).get("world") == "long"
        if not quiet and not trained_long:
            print("note: this model was not trained on long stories (untrained-for-long): callbacks "
                  "('the red one ...') use words it reads as <unk>", file=sys.stderr)
    else:
        story = story_from_captions(list(captions), seed=seed)
    shots = latent_shot_frames(story)
    side = story.size // model.vae.spatial_ratio
    dense = bool(getattr(args, "dense", False))
    moga = model.moga_config.replace(dense=True) if dense else None
    given = getattr(args, "dense_steps", None)
    warmup = float(given) if given is not None else (0.0 if dense else model.dense_warmup)
    positive = model.text_encoder.encode(list(captions))
    negative = model.text_encoder.encode([""])[0]
    bar = tqdm(total=steps, desc=f"demo: {len(captions)} shots", unit="step", disable=quiet, file=sys.stderr)
    latent = sample(model, positive, negative, shot_frames=shots, latent_size=(sum(shots), side, side),
                    steps=steps, cfg=cfg, shift=settings["shift"], solver=settings["solver"], seed=seed,
                    moga=moga, device=device, dtype=torch.float32, dense_steps=warmup,
                    callback=lambda i, n, x: bar.update(1))
    bar.close()
    with torch.inference_mode():
        video = model.vae.decode_shots(latent, shots)[0].cpu()
    path = write_video(out, video_to_frames(video), fps=settings.get("fps", 8))
    seconds = time.perf_counter() - start
    if not quiet and long_shots is not None:
        from .long_evaluate import score_long_story, summarize_long
        scores, calls = score_long_story(video, long_story)
        for i, (caption, s) in enumerate(zip(captions, scores)):
            f = s.found
            print(f"shot {i + 1}: {caption!r} -> {f['colour']} {f['size']} {f['shape']} moving {f['direction']}",
                  file=sys.stderr)
        summary = summarize_long([(scores, calls)])
        print("score: " + ", ".join(f"{k} {summary[k]:.0f}%" for k in ("colour", "shape", "direction",
                                                                        "consistency", "recall")
                                    if summary[k] is not None) +
              f" ({summary['callbacks']} callbacks)" +
              ("" if trained_long else "  [untrained-for-long]"), file=sys.stderr)
    elif not quiet:
        scores = score_story(video, story)
        for i, (caption, s) in enumerate(zip(captions, scores)):
            f = s.found
            print(f"shot {i + 1}: {caption!r} -> {f['colour']} {f['shape']} moving {f['direction']} "
                  f"on {f['background']}", file=sys.stderr)
        summary = summarize([scores])
        print("score: " + ", ".join(f"{k} {summary[k]:.0f}%" for k in ("colour", "shape", "direction",
                                                                        "consistency") if summary[k] is not None),
              file=sys.stderr)
    print(f"wrote {path} ({len(captions)} shots, {video.shape[1]} frames, {seconds:.1f} s)")
    return 0
