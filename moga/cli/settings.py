"""A generate run's settings from its flags and the checkpoint: size, LoRAs, the shot plan, the
checkpoint's own sampling defaults, the MoGA configuration. No torch at import."""
from __future__ import annotations

import os
import re

from .errors import CliError


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480), multiples of 16 (the error names the nearest valid sizes)."""
    from ..shots import check_size
    m = re.fullmatch(r"\s*(\d+)\s*[x*X]\s*(\d+)\s*", str(text))
    if not m:
        raise CliError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 832x480")
    width, height = int(m.group(1)), int(m.group(2))
    check_size(width, height)
    return width, height


def lora_list(specs) -> list:
    """The --lora values as [(file, strength)], checked (files exist, strengths are numbers)."""
    from ..checkpoint import lora_specs
    return lora_specs(specs)


def load_plan(args, fps: float | None = None, seconds: float | None = None):
    """The ShotPlan from --shots / --prompt, with --story/--negative/--seconds/--fps applied (flags win
    over the file's values, the file's over `fps` / `seconds`: the checkpoint's defaults)."""
    from ..shots import DEFAULT_FPS, DEFAULT_SECONDS, ShotPlan
    if args.shots and args.prompt:
        raise CliError("give the shots with --shots FILE or with --prompt (repeated), not both")
    seconds = args.seconds if args.seconds is not None else seconds
    if args.shots:
        if not os.path.isfile(args.shots):
            raise CliError(f"shot list {args.shots!r} does not exist: write one prompt per line in a text file")
        if args.fps is None and fps is not None and _plan_gives_fps(args.shots):
            fps = None  # the plan's own fps wins over the checkpoint's
        plan = ShotPlan.load(args.shots, default_seconds=seconds, fps=args.fps or fps)
    elif args.prompt:
        plan = ShotPlan.parse_text("\n".join(args.prompt), default_seconds=seconds or DEFAULT_SECONDS,
                                   fps=args.fps or fps or DEFAULT_FPS)
    else:
        raise CliError("no shots: pass --shots FILE (one prompt per line) or --prompt TEXT (once per shot)")
    if args.story is not None or args.negative is not None:
        plan = type(plan)(plan.shots, plan.story if args.story is None else args.story,
                          plan.negative if args.negative is None else args.negative, plan.fps)
    return plan


def _plan_gives_fps(path) -> bool:
    """Whether a shot file is a JSON plan with its own fps (a text plan has none)."""
    import json
    try:
        obj = json.loads(open(path, "rb").read())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and "fps" in obj


def checkpoint_defaults(metadata) -> dict:
    """Sampling settings a checkpoint records for itself (the demo model's `moga.demo` JSON: steps,
    cfg, shift, solver, fps, its world's frame size and shot length; any file's `moga.sampler.*` keys);
    {} when it records none."""
    import json
    try:
        record = json.loads((metadata or {}).get("moga.demo") or "{}")
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    found = {}
    sampling, world = record.get("sampling") or {}, record.get("world") or {}
    for key, kind in (("steps", int), ("cfg", float), ("shift", float), ("solver", str), ("fps", float)):
        if sampling.get(key) is not None:
            found[key] = kind(sampling[key])
    if world.get("size"):
        found["size"] = f"{int(world['size'])}x{int(world['size'])}"
    if world.get("shot_frames") and found.get("fps"):
        found["seconds"] = int(world["shot_frames"]) / found["fps"]
    from ..checkpoint import sampler_defaults
    found.update(sampler_defaults(metadata or {}))  # a file's moga.sampler.* keys win over its demo record
    return found


def run_settings(args, defaults: dict) -> tuple[dict, list[str]]:
    """Each setting from its flag, else the checkpoint's; and the list of those taken from the checkpoint
    (to say so). The size falls back to Wan's 832x480 here; the sampler's settings left None take Wan's
    defaults in `sampling.sampler_settings` (which also picks Euler for the distill schedule)."""
    out, taken = {}, []
    for key in ("size", "steps", "cfg", "shift", "solver", "schedule"):
        given = getattr(args, key)
        if given is not None:
            out[key] = given
        elif key in defaults:
            out[key] = defaults[key]
            taken.append(f"{key} {defaults[key]:g}" if isinstance(defaults[key], float) else f"{key} {defaults[key]}")
        else:
            out[key] = "832x480" if key == "size" else None
    for key in ("fps", "seconds"):  # applied through the plan
        if getattr(args, key) is None and key in defaults:
            taken.append(f"{key} {defaults[key]:g}" + (" per shot" if key == "seconds" else ""))
    return out, taken


def moga_settings(args, info):
    """The run's MoGAConfig from the checkpoint's settings and the flags; checks --groups against the
    routers before any weight is read."""
    from ..attention import MoGAConfig
    routers = info.moga
    if args.groups is not None:
        if args.groups < 1:
            raise CliError(f"--groups must be >= 1, got {args.groups}")
        if routers is None:
            raise CliError(f"{args.model} has no MoGA routers, so --groups {args.groups} cannot be used: add "
                           f"them with `moga patch {args.model} OUT.safetensors --groups {args.groups}` "
                           f"(or drop --groups to run dense)")
        if args.groups > routers["num_groups"]:
            raise CliError(f"--groups {args.groups} is more than the checkpoint's {routers['num_groups']} router "
                           f"groups: use --groups <= {routers['num_groups']} or re-patch with "
                           f"`moga patch ... --groups {args.groups}`")
    if routers is None:
        base = MoGAConfig()
    else:
        base = MoGAConfig(num_groups=routers["num_groups"], window=MoGAConfig.parse_window(routers["window"]),
                          context_frames=routers["context_frames"], fusion=routers["fusion"],
                          capacity=routers.get("capacity"), capacity_split=routers.get("capacity_split", "runs"))
    changes = {}
    if args.groups is not None:
        changes["num_groups"] = args.groups
    if args.window:
        changes["window"] = MoGAConfig.parse_window(args.window)
    if args.fusion:
        changes["fusion"] = args.fusion
    if getattr(args, "capacity", None) is not None:
        if not args.capacity >= 0:
            raise CliError(f"--capacity must be >= 0 (0 = off; 1 = the balanced group size N / M), "
                           f"got {args.capacity}")
        changes["capacity"] = args.capacity
    if getattr(args, "capacity_split", None):
        changes["capacity_split"] = args.capacity_split
    if args.attention_backend:
        changes["backend"] = args.attention_backend
    if args.dense:
        changes["dense"] = True
    return base.replace(**changes)
