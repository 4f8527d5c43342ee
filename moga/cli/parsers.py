"""The argparse parsers of every command. Importing this (and `moga --help`) loads no torch: each
command module imports torch only when it runs."""
from __future__ import annotations

import argparse

from .demo import cmd_demo
from .forward import add_forward
from .generate import cmd_generate
from .info import cmd_info
from .patch import cmd_patch

_DTYPES = ("auto", "float32", "bfloat16", "float16")

LORA_HELP = ("a LoRA merged into the DiT at load, FILE or FILE:STRENGTH (default 1.0); repeat for several "
             "(docs/loras.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moga", description="MoGA: minute-long multi-shot video with Wan2.1 DiTs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_generate(sub)
    _add_info(sub)
    _add_patch(sub)
    _add_demo(sub)
    add_forward(sub, "train", "moga.train", "train a MoGA model (moga.train)")
    add_forward(sub, "inspect", "moga.diagnostics",
                "one model call, per layer: attention recall, error vs dense, group sizes (moga.diagnostics)")
    return parser


def add_lora_argument(p) -> None:
    """--lora FILE[:STRENGTH], repeatable (generate, patch, inspect)."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help=LORA_HELP)


def _add_overwrite(p):
    p.add_argument("-y", "--overwrite", action="store_true",
                   help="replace an existing output file (only a video / safetensors file; never anything else)")


def _add_generate(sub):
    p = sub.add_parser("generate", help="render a multi-shot video from a shot list",
                       description="Denoise every shot of a story as one sequence and write an mp4.")
    p.add_argument("--model", required=True, help="DiT checkpoint (.safetensors file or folder); Wan2.2 A14B: the "
                   "high-noise expert, or one folder holding both experts")
    p.add_argument("--model-low", help="Wan2.2 A14B: the low-noise expert (with --model HIGH)")
    p.add_argument("--boundary", type=float, default=None,
                   help="Wan2.2 A14B expert switch, a fraction of the timestep range (default 0.875 T2V, 0.9 I2V)")
    p.add_argument("--offload-expert", action="store_true",
                   help="Wan2.2 A14B: keep the expert not in use on the CPU (one expert on the GPU at a time)")
    p.add_argument("--lora-low", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="Wan2.2 A14B: a LoRA of the low-noise expert (repeatable; then --lora is the high-noise "
                        "expert's only; without it --lora goes to both)")
    p.add_argument("--image", help="start image of shot 1 (image-to-video models)")
    p.add_argument("--shot-image", action="append", default=[], metavar="N:FILE",
                   help="start image of shot N (counted from 1; repeatable)")
    p.add_argument("--clip-vision", help="CLIP vision encoder folder (Wan2.1 I2V; a diffusers image_encoder/)")
    p.add_argument("--shots", help="shot list: a .txt (one shot per line, optional [frames] or [2.5s]) or .json")
    p.add_argument("--prompt", action="append", default=[], help="a shot prompt (repeat for more shots); "
                   "instead of --shots")
    p.add_argument("--story", help="story prompt put before every shot's prompt (overrides the file's)")
    p.add_argument("--negative", help="negative prompt (overrides the file's; default: Wan's for umT5 models)")
    p.add_argument("--seconds", type=float, default=None,
                   help="default seconds per shot (default: the checkpoint's shot length, else 5)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels, multiples of 16 (default: the "
                   "checkpoint's, else 832x480)")
    p.add_argument("--fps", type=float, default=None, help="frames per second (default: the plan's, the "
                   "checkpoint's, else 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="story.mp4", help="output video: .mp4 .mkv .mov .m4v .webm (default story.mp4)")
    _add_overwrite(p)
    p.add_argument("--save-latent", help="also save the final latent and shot boundaries (.safetensors)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, else 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's, else 5.0; "
                   "1 runs no negative pass)")
    p.add_argument("--cfg-low", type=float, default=None,
                   help="Wan2.2 A14B: guidance of the low-noise expert (default: --cfg; Wan2.2 T2V uses 4.0 high, 3.0 low)")
    p.add_argument("--shift", type=float, default=None, help="sigma shift (default: the checkpoint's, else 5.0)")
    p.add_argument("--solver", choices=("unipc", "euler"), default=None,
                   help="default unipc (euler with --schedule distill)")
    p.add_argument("--schedule", choices=("wan", "distill"), default=None,
                   help="wan (default) or distill: LightX2V's few-step schedule for step-distill LoRAs/models")
    p.add_argument("--cfg-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="run cond and uncond as one batch of 2 (default: on a GPU when the video is short)")
    p.add_argument("--groups", type=int, default=None, help="MoGA groups M at run time (<= the routers' M)")
    p.add_argument("--window", help="window grid: 'frames,rows,cols' or 'rowsxcols' (default: the checkpoint's)")
    p.add_argument("--fusion", choices=("mean", "lse"), help="branch fusion (default: the checkpoint's)")
    p.add_argument("--capacity", type=float, default=None,
                   help="routed group capacity: groups over capacity * N / M tokens are cut into runs "
                        "(0 = off; default: the checkpoint's)")
    p.add_argument("--capacity-split", choices=("runs", "stride"), default=None,
                   help="how an over-capacity group is cut: consecutive runs, or round robin so every part "
                        "spans all shots (default: the checkpoint's)")
    p.add_argument("--attention-backend", default=None,
                   choices=("auto", "fa4", "flash_attn", "torch", "sdpa", "reference"))
    p.add_argument("--dense", action="store_true", help="run dense attention everywhere (baseline)")
    p.add_argument("--dense-steps", type=float, default=None,
                   help="fraction of the first steps that run dense attention (default: the checkpoint's)")
    p.add_argument("--dense-warmup-steps", type=int, default=None,
                   help="first steps that run dense attention, as a count (overrides --dense-steps)")
    p.add_argument("--dense-layers", default="", help="layers that always run dense, e.g. '0,1' or '0-3'")
    p.add_argument("--text-encoder", help="umT5 encoder folder (with its tokenizer); default: the model's own")
    p.add_argument("--vae", help="Wan VAE folder or .safetensors; default: the model's own")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="the blocks' linear layers on fp8 tensor cores (fp8 files as stored, others quantised at "
                        "load); needs compute capability >= 8.9, else says why it is off and runs as before")
    add_lora_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def _add_info(sub):
    p = sub.add_parser("info", help="what a checkpoint is (architecture, size, MoGA settings, dtype, keys)")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--num-heads", type=int, default=None, help="heads, when the file cannot say")
    p.set_defaults(func=cmd_info)


def _add_patch(sub):
    p = sub.add_parser("patch", help="add MoGA routers to a plain Wan2.1 checkpoint (new file), or write only routers",
                       description="Write a MoGA checkpoint: routers from a file, or calibrated (k-means). With "
                                   "--routers-out instead of DST: calibrate and write only the routers (a few MB, "
                                   "for ComfyUI's MoGA Patch Model on the model core loads).")
    p.add_argument("src")
    p.add_argument("dst", nargs="?", help="the new MoGA checkpoint (.safetensors; or give --routers-out)")
    p.add_argument("--routers-out", help="write only the calibrated routers (+ settings and a fingerprint of SRC) here")
    _add_overwrite(p)
    p.add_argument("--groups", type=int, default=None, help="group count M (needed to calibrate)")
    p.add_argument("--window", default="0,2,2")
    p.add_argument("--routers", help="router weights (.safetensors) from training; else calibrate")
    p.add_argument("--layers", help="layers that get routers, e.g. '0-29' (default: all)")
    p.add_argument("--fusion", choices=("mean", "lse"))
    p.add_argument("--dense-warmup", type=float, default=None)
    p.add_argument("--capacity", type=float, default=None,
                   help="routed group capacity written into the file (0 = off; default 1.0 when calibrating, "
                        "off with --routers)")
    p.add_argument("--calibration-size", default="9,30,52",
                   help="latent frames,height,width of the calibration pass (default 9,30,52: 480p, 33 frames)")
    p.add_argument("--calibration-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=_DTYPES, default="auto")
    add_lora_argument(p)
    p.set_defaults(func=cmd_patch)


def _add_demo(sub):
    p = sub.add_parser("demo", help="render a 4-shot story with the bundled demo model "
                       "(or, without it, the MoGA-vs-dense attention demo)")
    p.add_argument("--out", default="demo.mp4", help="output video (default demo.mp4)")
    _add_overwrite(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    # the demo model's own options (moga.demo.add_arguments lists the same; kept here so --help needs no torch)
    p.add_argument("--prompt", action="append", default=None,
                   help="a shot's caption (repeat per shot; the demo world's grammar); default: the 4-shot demo story")
    p.add_argument("--checkpoint", default=None, help="a demo model file (default: the shipped one)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--dense", action="store_true", help="run with dense attention (routers off)")
    p.add_argument("--dense-steps", type=float, default=None,
                   help="fraction of the first steps run dense (default: the model's dense warm-up)")
    p.add_argument("--long", type=int, nargs="?", const=12, default=None, metavar="SHOTS",
                   help="draw a long story instead (moga.demo.long_world: SHOTS shots of 53 frames, default 12, "
                        "callbacks to objects shown earlier); minutes on a CPU, and labelled untrained-for-long "
                        "unless the model was trained on long stories")
    p.set_defaults(func=cmd_demo)
