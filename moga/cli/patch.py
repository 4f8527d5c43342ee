"""`moga patch`: a MoGA checkpoint from a plain one (routers from a file, or calibrated), or only the
calibrated routers (--routers-out)."""
from __future__ import annotations

import os
import sys

from .device import resolve_device_dtype
from .errors import CliError, check_exists
from .settings import lora_list


def cmd_patch(args) -> int:
    check_exists(args.src, "checkpoint")
    check_exists(args.routers, "router file")
    if (args.dst is None) == (args.routers_out is None):
        raise CliError("give either DST (a new MoGA checkpoint) or --routers-out FILE (only the routers), not both")
    if args.routers is None and not args.groups:
        raise CliError("calibrating routers needs --groups M (e.g. --groups 5), or pass --routers FILE")
    if args.routers_out is not None and args.routers is not None:
        raise CliError("--routers-out writes calibrated routers; --routers FILE already is a router file")
    try:
        size = tuple(int(v) for v in args.calibration_size.split(","))
    except ValueError:
        size = ()
    if args.capacity is not None and not args.capacity >= 0:
        raise CliError(f"--capacity must be >= 0 (0 = off), got {args.capacity}")
    if len(size) != 3 or min(size) < 1:
        raise CliError(f"--calibration-size {args.calibration_size!r} is not 'frames,height,width' in latent units")
    from ..outputs import check_output
    target, flag = (args.dst, "DST") if args.dst is not None else (args.routers_out, "--routers-out")
    if os.path.abspath(target) == os.path.abspath(args.src):
        raise CliError(f"{flag} {target!r} is the source: write the patched checkpoint to a new file")
    check_output(target, "safetensors", args.overwrite, flag=flag)  # before calibration, not after
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    from tqdm import tqdm
    bar = [None]

    def calibrating(done, total):  # the calibration pass block by block, then each layer's k-means
        if bar[0] is None:
            bar[0] = tqdm(total=total, desc="calibrating (blocks, then k-means per layer)", file=sys.stderr)
        bar[0].update(done - bar[0].n)

    try:
        return _patch(args, size, device, dtype, calibrating)
    finally:
        if bar[0] is not None:
            bar[0].close()


def _patch(args, size, device, dtype, calibrating) -> int:
    from ..checkpoint import format_layers, parse_layers, patch_checkpoint
    if args.routers_out is not None:
        from ..checkpoint.router_file import calibrate_router_file
        print(f"calibrating {args.groups} groups", file=sys.stderr)
        rs = calibrate_router_file(args.src, args.routers_out, args.groups,
                                   layers=parse_layers(args.layers) if args.layers else None, window=args.window,
                                   fusion=args.fusion, dense_warmup=args.dense_warmup, capacity=args.capacity,
                                   size=size, steps=args.calibration_steps, seed=args.seed, device=device,
                                   dtype=None if args.dtype == "auto" else dtype, loras=lora_list(args.lora) or None,
                                   progress=calibrating)
        print(f"{args.routers_out}: routers for layers {format_layers(rs.layers)}, {rs.num_groups} groups, fusion "
              f"{rs.config.fusion}, dense warm-up {rs.dense_warmup}, capacity {rs.config.capacity}")
        return 0
    info = patch_checkpoint(args.src, args.dst, args.groups, window=args.window, routers=args.routers,
                            calibrate=args.routers is None,
                            layers=parse_layers(args.layers) if args.layers else None, fusion=args.fusion,
                            dense_warmup=args.dense_warmup, capacity=args.capacity, calibration_size=size,
                            calibration_steps=args.calibration_steps, seed=args.seed, device=device,
                            dtype=None if args.dtype == "auto" else dtype,
                            progress=lambda msg: print(msg, file=sys.stderr), loras=lora_list(args.lora) or None,
                            calibration_progress=calibrating)
    print(str(info))
    return 0
