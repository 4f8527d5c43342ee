"""The `moga inspect` options, without torch: `moga inspect --help` and bad flags answer at once
(moga.diagnostics, which does the work, imports torch)."""
from __future__ import annotations

import argparse

STREAMS = ("moga", "dense")
DESCRIPTION = "How close MoGA comes to dense attention, layer by layer, for one model evaluation."


def add_arguments(p) -> None:
    """The `moga inspect` options (argparse)."""
    p.add_argument("checkpoint", help="Wan2.1 / MoGA checkpoint (.safetensors file or folder)")
    p.add_argument("--shots", help="shot plan: a .txt (one shot per line) or .json file")
    p.add_argument("--prompt", action="append", help="a shot's prompt (repeat for several shots)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per shot for --prompt (default 2)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--text-encoder", help="text encoder folder for a model that brings none (else a seeded "
                                          "random embedding is used, and the report says so)")
    p.add_argument("--steps", type=int, default=50, help="schedule length (default 50)")
    p.add_argument("--at", type=int, default=0, help="inspect the model call of this step; the steps "
                                                     "before it run dense from seeded noise (default 0)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--groups", type=int, help="M for this run (default: the checkpoint's)")
    p.add_argument("--fusion", choices=("mean", "lse"), help="default: the checkpoint's")
    p.add_argument("--capacity", type=float, help="routed group capacity, 0 = off (default: the checkpoint's)")
    p.add_argument("--window", help="'frames,rows,cols' or 'rowsxcols' (default: the checkpoint's)")
    p.add_argument("--context-frames", type=int)
    p.add_argument("--dense-layers", default="", help="layers run dense, e.g. '0-1,29'")
    p.add_argument("--queries", type=int, default=256, help="query tokens sampled per layer for the recall")
    p.add_argument("--stream", choices=STREAMS, default="moga",
                   help="moga: layers see the MoGA model's activations (errors compound); dense: the dense "
                        "model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA merged into the DiT at load (default strength 1.0); repeat for several")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moga inspect", description=DESCRIPTION)
    add_arguments(parser)
    return parser
