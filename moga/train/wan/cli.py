"""The command line of `moga train wan` and `moga train prepare`: options, and the run they start.

Imports no torch until a command runs, so `--help` and bad flags answer at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import DTYPE_NAMES, MODES, OUTPUT_NAME, ROUTER_INITS, TrainSettings, defaults


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="encode clips + captions into training shards (VAE latents, text "
                                       "embeddings), once")
    p.add_argument("source", help="a folder of clips with sidecar .json files, or a manifest (.json/.jsonl)")
    p.add_argument("--out", required=True, help="folder for the shards (new)")
    p.add_argument("--text-encoder", help="umT5 text encoder folder (a Wan2.1 diffusers folder works); needs "
                                          "the 'wan' extra")
    p.add_argument("--vae", help="Wan VAE: diffusers folder or .safetensors; needs the 'wan' extra")
    p.add_argument("--model", help="a checkpoint that brings its own text encoder and VAE (the demo model)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--max-shot-frames", type=int, default=81, help="4n+1; longer shots are cut (default 81)")
    p.add_argument("--min-shot-frames", type=int, default=5, help="4n+1; clips with a shorter shot are skipped")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES), help="storage dtype of the shards")
    p.add_argument("--shard-gib", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def _wan_parser(sub) -> None:
    d = argparse.Namespace(**defaults())
    p = sub.add_parser("wan", help="fine-tune a Wan2.1 checkpoint into a MoGA checkpoint")
    p.add_argument("--model", required=True, help="Wan2.1 T2V checkpoint (any key layout; MoGA or plain)")
    p.add_argument("--data", required=True, help="shard folder from `moga train prepare`")
    p.add_argument("--out", required=True, help="run folder: state/, train_log.jsonl, moga.safetensors")
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=None, help="default: routers 1e-3, lora 1e-4, full 1e-5")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--batch", type=int, default=d.batch, help="clips per step over all data-parallel groups")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad)
    p.add_argument("--balance-weight", type=float, default=d.balance_weight)
    p.add_argument("--balance-form", choices=("paper", "switch"), default=d.balance_form)
    p.add_argument("--shift", type=float, default=d.shift)
    p.add_argument("--groups", type=int, default=d.num_groups, help="M for new routers")
    p.add_argument("--window", default=d.window)
    p.add_argument("--context-frames", type=int, default=d.context_frames)
    p.add_argument("--routers", choices=ROUTER_INITS, default=d.routers)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default=d.lora_targets)
    p.add_argument("--lora-output", choices=("merged", "separate"), default=d.lora_output)
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=d.dtype)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--sp", type=int, default=d.sp, help="ranks per sequence-parallel group (torchrun)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW over the ranks")
    p.add_argument("--backend", default=d.backend, help="varlen attention kernel")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help=f"checkpoint path (default OUT/{OUTPUT_NAME})")
    p.add_argument("--routers-out", default=None,
                   help="also write only the trained routers here (a router file with the fingerprint of "
                        "--model), for ComfyUI's MoGA Router Loader on core's own model; must not exist")
    p.add_argument("--quiet", action="store_true")


def cmd_prepare(args) -> int:
    from ..data import PrepareSettings, describe, prepare
    from .distributed import default_device
    settings = PrepareSettings(width=args.width, height=args.height, fps=args.fps,
                               max_shot_frames=args.max_shot_frames, min_shot_frames=args.min_shot_frames,
                               dtype=args.dtype, shard_bytes=int(args.shard_gib * 2**30))
    device = args.device or default_device()
    if args.model:
        from ...checkpoint import load_model
        m = load_model(args.model, device="cpu")
        te, vae = m.text_encoder, m.vae
        if te is None or vae is None:
            raise ValueError(f"{args.model} brings no text encoder/VAE of its own: pass --text-encoder and --vae")
        names = {"encoders": Path(args.model).name}
    else:
        if not (args.text_encoder and args.vae):
            raise ValueError("give --text-encoder and --vae (Wan2.1's umT5 and VAE), or --model with its own")
        from ...wan_io import TextEncoder, WanVAE
        te = TextEncoder.load(args.text_encoder, device=device)
        vae = WanVAE.load(args.vae, device=device)
        names = {"text_encoder": str(args.text_encoder), "vae": str(args.vae)}
    index = prepare(args.source, args.out, vae, te, settings, progress=not args.quiet,
                    log=None if args.quiet else print, encoder_names=names)
    print(describe(index))
    return 0 if index["samples"] else 1


def cmd_wan(args) -> int:
    import torch

    from ..data import ShardDataset
    from .distributed import init_distributed
    from .trainer import WanTrainer
    distributed = init_distributed()
    settings = TrainSettings(
        mode=args.mode, steps=args.steps, lr=args.lr, warmup=args.warmup, batch=args.batch,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, balance_weight=args.balance_weight,
        balance_form=args.balance_form, shift=args.shift, num_groups=args.groups, window=args.window,
        context_frames=args.context_frames, routers=args.routers, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, lora_output=args.lora_output,
        dtype=args.dtype, grad_checkpointing=not args.no_grad_checkpointing, seed=args.seed,
        save_every=args.save_every, sp=args.sp, fsdp=args.fsdp, backend=args.backend)
    main_rank = not distributed or torch.distributed.get_rank() == 0
    log = print if (main_rank and not args.quiet) else None
    try:
        if args.routers_out is not None:  # before training: a bad path must not cost the run
            _check_routers_out(args.routers_out, args.model)
        data = ShardDataset(args.data)
        trainer = WanTrainer.from_checkpoint(args.model, data, settings, args.out, device=args.device,
                                             log=log, progress=main_rank and not args.quiet)
        trainer.run()
        path = trainer.export(args.output)
        routers = trainer.export_routers(args.routers_out) if args.routers_out is not None else None
        if routers is not None and log:
            from ...checkpoint.moga_format import format_layers
            print(f"wrote {routers} (routers of layers {format_layers(trainer.layers)}, "
                  f"{trainer.num_groups} groups)")
        if path is not None and log:
            last = trainer.history[-1].to_json() if trainer.history else {}
            print(f"wrote {path} (step {trainer.step}, loss {last.get('loss', float('nan')):.4f}, "
                  f"max/mean group size {last.get('balance_max', 0):.2f})")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


def _check_routers_out(path, model) -> None:
    from ...outputs import check_output
    if Path(path).exists():  # the train command has no --overwrite: never replace a file
        raise ValueError(f"--routers-out {path} already exists: choose another name (or delete it first)")
    check_output(path, "safetensors", overwrite=False, flag="--routers-out")
    if Path(path).resolve() == Path(model).resolve():
        raise ValueError(f"--routers-out {path} is the --model checkpoint: write the routers to a new file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moga train", description="prepare data and fine-tune MoGA models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _prepare_parser(sub)
    _wan_parser(sub)
    return parser


def main(argv=None) -> int:
    """`moga train wan|prepare ...` (argv starts with the command's name)."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_prepare(args) if args.command == "prepare" else cmd_wan(args)
    except ValueError as e:
        print(f"moga train: error: {e}", file=sys.stderr)
        return 2


def main_wan(argv) -> int:
    """`moga train wan ARGV...` (moga.train.commands calls a command with what follows its name)."""
    return main(["wan", *argv])


def main_prepare(argv) -> int:
    """`moga train prepare ARGV...`."""
    return main(["prepare", *argv])


__all__ = ["main", "main_wan", "main_prepare", "build_parser", "cmd_wan", "cmd_prepare"]
