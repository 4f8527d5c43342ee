"""The whole demo-model recipe in one command, as run on the lent GPU (docs/demo-model.md):

    python -m moga.demo.recipe --out RUN --train-seconds 360

1. the codec (in this process), saved as RUN/codec.safetensors, with its round-trip quality;
2. the MoGA model and the dense baseline, trained side by side on the same GPU from the same codec,
   seed and data, for the same number of steps (each fits its step count to --train-seconds, then
   both take the smaller);
3. `python -m moga.eval demo` on held-out stories: MoGA, its dense and window-only modes on the same
   weights, and the dense-trained model; RUN/eval.json.
Every child process has a timeout; nothing waits forever.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..outputs import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moga.demo.recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--codec-kind", choices=("pca", "learned"), default="pca")
    p.add_argument("--codec-steps", type=int, default=2000)
    p.add_argument("--codec-batch", type=int, default=96)
    p.add_argument("--codec-seconds", type=float, default=None, help="stop the codec's training after this")
    p.add_argument("--train-seconds", type=float, default=360)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-stories", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", default="moga,dense", help="which models to train")
    p.add_argument("--init-dir", default=None, help="continue from INIT_DIR/NAME.safetensors (and its codec)")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--object-weight", type=float, default=4.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = open(out / "recipe.log", "a")

    def say(msg):
        line = f"[{time.perf_counter() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    from .model import CODEC
    from .training import codec_quality, fit_patch_codec, save_codec, train_codec

    codec_path = out / "codec.safetensors"
    if args.init_dir:
        codec_path = Path(args.init_dir) / "moga.safetensors"  # a demo file: its vae.* is the codec
    if not codec_path.exists():
        if args.codec_kind == "pca":
            codec = fit_patch_codec(32 if args.tiny else 96, seed=args.seed, device=args.device, log=say)
        else:
            cfg = dict(CODEC, hidden=16, blocks=1) if args.tiny else None
            codec = train_codec(args.codec_steps, args.codec_batch, seed=args.seed, device=args.device,
                                log=say, config=cfg, time_limit=args.codec_seconds)
        save_codec(codec, codec_path)
        q = codec_quality(codec, stories=4 if args.tiny else 16, device=args.device)
        say(f"codec: {json.dumps(q)}")
        write_json(out / "codec_quality.json", q)
        del codec
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    procs = {}
    for name in names:
        cmd = [sys.executable, "-m", "moga.train", "demo", "--out", str(out / name), "--device", args.device,
               "--codec", str(codec_path), "--batch", str(args.batch), "--seed", str(args.seed),
               "--time-limit", str(args.train_seconds), "--auto-steps", "--sync-dir", str(out / "sync"),
               "--sync-name", name, "--sync-peers", ",".join(names), "--log-every", "50",
               "--warmup", str(args.warmup), "--lr", str(args.lr), "--object-weight", str(args.object_weight)]
        if args.init_dir:
            cmd += ["--init", str(Path(args.init_dir) / f"{name}.safetensors")]
        if name == "dense":
            cmd.append("--dense")
        if args.tiny:
            cmd += ["--tiny", "--probe", "8", "--warmup", "20", "--export-margin", "5"]
        say("start: " + " ".join(cmd))
        procs[name] = (subprocess.Popen(cmd, stdout=open(out / f"{name}.out", "w"), stderr=subprocess.STDOUT),
                       cmd)
    for name, (proc, _) in procs.items():
        try:
            code = proc.wait(timeout=args.train_seconds + 150)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        say(f"{name} finished: {code}")
    evaluate = [sys.executable, "-m", "moga.eval", "demo", "--stories", str(args.eval_stories),
                "--device", args.device, "--json", str(out / "eval.json")]
    if (out / "moga" / "model.safetensors").exists():
        evaluate += ["--checkpoint", str(out / "moga" / "model.safetensors")]
        if (out / "dense" / "model.safetensors").exists():
            evaluate += ["--dense-checkpoint", str(out / "dense" / "model.safetensors")]
        if args.tiny:
            evaluate += ["--steps", "2"]
        say("evaluate: " + " ".join(evaluate))
        try:
            res = subprocess.run(evaluate, capture_output=True, text=True, timeout=300)
            say(res.stdout + res.stderr[-3000:])
        except subprocess.TimeoutExpired:
            say("evaluation timed out")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
