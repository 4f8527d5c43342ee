"""Where a demo-model training step spends its time, and what compiling the model buys.

    python3 benchmarks/demo_train_speed.py --json out.json            # GPU
    python3 benchmarks/demo_train_speed.py --smoke                    # CPU, tiny, seconds

For the MoGA and the dense demo DiT (moga.demo.model sizes) and each of eager / `model.compile()`:
one `Trainer.train_step` (world batch rendered and encoded, forward, backward, AdamW, EMA) timed
with a device sync around it, median over a full cycle of story lengths (1-4 shots) after warm-up
(compilation included in the warm-up, reported apart). Also the data batch alone for each codec
kind, and a profiler table of the eager MoGA step's largest device-time operators.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moga.demo.codec import DemoCodec  # noqa: E402
from moga.demo.data import SHOT_CYCLE, WorldData  # noqa: E402
from moga.demo.model import CODEC, build_demo  # noqa: E402
from moga.demo.training import _tiny, fit_patch_codec  # noqa: E402
from moga.train.trainer import TrainConfig, Trainer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--modes", default="moga,dense")
    ap.add_argument("--compile", default="0,1", help="0: eager, 1: model.compile()")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cycle = len(SHOT_CYCLE)
    batch = 2 if args.smoke else args.batch
    codec = fit_patch_codec(16, device=device, log=lambda m: None)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": batch, "rows": []}

    learned = DemoCodec(**(dict(CODEC, hidden=16, blocks=1) if args.smoke else CODEC)).to(device).eval()
    for name, c in (("pca", codec), ("learned", learned)):
        data = WorldData(c, object_weight=4.0)
        data.batch(0, batch, device)
        times = [timed(lambda i=i: data.batch(i, batch, device), device) for i in range(cycle)]
        result[f"data_s_{name}"] = statistics.median(times)
        print(f"data batch ({name} codec): {statistics.median(times) * 1000:.0f} ms", flush=True)

    for mode in args.modes.split(","):
        for comp in [int(c) for c in args.compile.split(",")]:
            dense = mode == "dense"
            model, text = _tiny(dense, 0) if args.smoke else build_demo(dense, 0)
            model.to(device)
            text.to(device)
            cfg = TrainConfig(steps=10 ** 6, batch_size=batch, lr=3e-4, warmup=10, ema_decay=0.995,
                              compute_dtype="bfloat16" if device.type == "cuda" else "float32", log_every=10 ** 6)
            trainer = Trainer(model, WorldData(codec, object_weight=4.0), cfg, modules={"text_encoder": text},
                              device=device, log=None)
            if comp:
                model.compile()
            warm = timed(lambda: [trainer.train_step() for _ in range(cycle * (2 if comp else 1))], device)
            steps = [timed(trainer.train_step, device) for _ in range(cycle if args.smoke else 2 * cycle)]
            row = {"mode": mode, "compiled": bool(comp), "warmup_s": round(warm, 1),
                   "step_s": statistics.median(steps), "step_s_mean": statistics.mean(steps),
                   "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            if mode == "moga" and not comp:
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(4):
                        trainer.train_step()
                    sync(device)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=key, row_limit=25)
                print(table, flush=True)
                result["profile"] = table
            del trainer, model, text
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

    print(f"\n{result['device']}, batch {batch} stories (1-4 shots of 5 latent frames x 8x8 tokens)")
    print("| model | compiled | median step (s) | mean step (s) | warm-up (s) |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['mode']} | {r['compiled']} | {r['step_s']:.3f} | {r['step_s_mean']:.3f} | {r['warmup_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
