"""`python -m moga` (or `moga`): generate, info, patch, demo (+ train / inspect where those modules exist).

Imports are lazy: `moga --help` loads neither torch nor a model. Every error a person can act on is
printed as one line (`moga: error: ...`) with exit status 2; see docs/cli.md.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time

EXIT_USAGE, EXIT_CANCELLED = 2, 130
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(ValueError):
    """A problem with the command line's input; the message says what to do."""


# ---- argument parsing --------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480), multiples of 16 (the error names the nearest valid sizes)."""
    from .shots import check_size
    m = re.fullmatch(r"\s*(\d+)\s*[x*X]\s*(\d+)\s*", str(text))
    if not m:
        raise CliError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 832x480")
    width, height = int(m.group(1)), int(m.group(2))
    check_size(width, height)
    return width, height


LORA_HELP = ("a LoRA merged into the DiT at load, FILE or FILE:STRENGTH (default 1.0); repeat for several "
             "(docs/loras.md)")


def add_lora_argument(p) -> None:
    """--lora FILE[:STRENGTH], repeatable (generate, patch, inspect)."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help=LORA_HELP)


def lora_list(specs) -> list:
    """The --lora values as [(file, strength)], checked (files exist, strengths are numbers)."""
    from .checkpoint import lora_specs
    return lora_specs(specs)


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


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _add_forward(sub, name: str, module: str, help_text: str):
    """`moga NAME ARGS...` runs `module` with ARGS (its own parser); registered only if it exists."""
    if not _has_module(module):
        return
    p = sub.add_parser(name, help=help_text, add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _run_module(module, args.argv))
    _FORWARDS[name] = module


_FORWARDS: dict[str, str] = {}  # forwarded command -> module (filled by build_parser)
# a forwarded command whose options a torch-free module parses first: --help and bad flags answer at once
_LIGHT_PARSERS = {"inspect": "moga.inspect_args"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moga", description="MoGA: minute-long multi-shot video with Wan2.1 DiTs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_generate(sub)
    _add_info(sub)
    _add_patch(sub)
    _add_demo(sub)
    _add_forward(sub, "train", "moga.train", "train a MoGA model (moga.train)")
    _add_forward(sub, "inspect", "moga.diagnostics",
                 "one model call, per layer: attention recall, error vs dense, group sizes (moga.diagnostics)")
    return parser


def _run_module(module: str, argv) -> int:
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        import runpy
        saved = sys.argv
        sys.argv = [module] + list(argv)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved
        return 0
    return int(main(list(argv)) or 0)


def _run_parsed(module: str, options) -> int:
    if getattr(options, "device", None) is not None:
        options.device = str(check_device(options.device))
    return int(importlib.import_module(module).main(options) or 0)


# ---- shared pieces (also for moga.parallel's torchrun entry) ------------------------------------
def check_device(device):
    """--device as a torch.device that exists here, else a CliError naming the ones that do."""
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"--device {device!r} is not a device torch knows: use cpu, cuda or cuda:N "
                       f"(or mps on a Mac)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device} asked for but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CliError(f"--device {device} asked for but MPS is not available here: use --device cpu")
    elif dev.type != "cpu":
        raise CliError(f"--device {device}: moga runs on cpu, cuda or mps, not {dev.type}")
    return dev


def resolve_device_dtype(device, dtype_name: str):
    import torch
    device = check_device(device)
    if dtype_name in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    return device, dtype


def load_plan(args, fps: float | None = None, seconds: float | None = None):
    """The ShotPlan from --shots / --prompt, with --story/--negative/--seconds/--fps applied (flags win
    over the file's values, the file's over `fps` / `seconds`: the checkpoint's defaults)."""
    from .shots import DEFAULT_FPS, DEFAULT_SECONDS, ShotPlan
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
    from .checkpoint import sampler_defaults
    found.update(sampler_defaults(metadata or {}))  # a file's moga.sampler.* keys win over its demo record
    return found


def _run_settings(args, defaults: dict) -> tuple[dict, list[str]]:
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


def _check_exists(path, what: str):
    if path and not os.path.exists(path):
        raise CliError(f"{what} {path!r} does not exist")


def moga_settings(args, info):
    """The run's MoGAConfig from the checkpoint's settings and the flags; checks --groups against the
    routers before any weight is read."""
    from .attention import MoGAConfig
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


def load_encoders(args, model, device, dtype):
    """(text encoder, vae, uses_umt5): --text-encoder / --vae, else what the model brings itself."""
    te, vae, umt5 = getattr(model, "text_encoder", None), getattr(model, "vae", None), False
    if args.text_encoder or args.vae:
        _quiet_hf()
    if args.text_encoder:
        from .wan_io import TextEncoder
        te, umt5 = TextEncoder.load(args.text_encoder, text_len=model.config.text_len, device=device,
                                    dtype=dtype), True
    if args.vae:
        from .wan_io import WanVAE
        vae = WanVAE.load(args.vae, device=device)  # float32, as Wan decodes
    if te is None:
        raise CliError(f"{args.model} brings no text encoder: pass --text-encoder DIR (a umT5 encoder folder "
                       f"with its tokenizer, e.g. a Wan2.1 diffusers folder)")
    if vae is None:
        raise CliError(f"{args.model} brings no VAE: pass --vae PATH (a Wan2.1 VAE folder or .safetensors)")
    return te, vae, umt5


def _quiet_hf():
    """transformers/diffusers print load bars and advice; the command line has its own progress."""
    for name in ("transformers", "diffusers"):
        try:
            logging_mod = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        logging_mod.set_verbosity_error()
        getattr(logging_mod, "disable_progress_bar", lambda: None)()


def encode_plan(te, plan, use_wan_negative: bool):
    """Per-shot embeddings (each distinct prompt once) and the negative embedding."""
    negative = plan.negative
    if not negative and use_wan_negative:
        from .wan_io import WAN_NEGATIVE
        negative = WAN_NEGATIVE
    prompts = plan.prompts()
    distinct = list(dict.fromkeys(prompts + [negative]))
    table = dict(zip(distinct, te.encode(distinct)))
    return [table[p] for p in prompts], table[negative]


def effective_groups(model, capacity: float | None = None, split: str = "runs") -> float | None:
    """M_eff = N^2 / sum |g|^2 of the routed branch, averaged over the MoGA layers' last call
    (with a group capacity, over the capped groups the layer attended in)."""
    from .attention.router import cap_routing
    vals = []
    for m in model.modules():
        routing = getattr(m, "last_routing", None)
        if routing is None:
            continue
        ids = cap_routing(routing, capacity, split).group_ids.reshape(-1)
        counts = ids.bincount().double()
        vals.append(float(ids.numel() ** 2 / (counts ** 2).sum()))
    return sum(vals) / len(vals) if vals else None


def _record_routing(model, on: bool):
    for m in model.modules():
        if hasattr(m, "record_routing"):
            m.record_routing = on
            if not on:
                m.last_routing = None


def parse_shot_images(args, num_shots: int) -> dict:
    """{shot index: path} from --image and --shot-image N:FILE."""
    out = {}
    if args.image:
        out[0] = args.image
    for item in args.shot_image:
        n, sep, path = item.partition(":")
        if not sep or not n.strip().isdigit() or not path:
            raise CliError(f"--shot-image {item!r}: write N:FILE, N the shot counted from 1 (e.g. 5:sheet.png)")
        k = int(n) - 1
        if not 0 <= k < num_shots:
            raise CliError(f"--shot-image {item!r}: the plan has shots 1..{num_shots}")
        if k in out:
            raise CliError(f"shot {k + 1} has two start images (--image is shot 1's)")
        out[k] = path
    for path in out.values():
        _check_exists(path, "start image")
    return out


def load_dit(args, device, dtype, loras=None, loras_low=None):
    """A WanModel, or an ExpertPair (--model-low, or a folder holding both experts); each expert gets
    the run's MoGA settings from its own routers and the flags. LoRAs: `loras` on the model (a pair:
    on both experts unless `loras_low` gives the low-noise expert its own, as Wan2.2 distill LoRAs come)."""
    from . import checkpoint as ckpt
    pair = (args.model, args.model_low) if args.model_low else ckpt.find_experts(args.model)
    if pair is None:
        return ckpt.load_model(args.model, device=device, dtype=dtype, loras=loras or None), None
    model = ckpt.load_experts(*pair, boundary=args.boundary, offload=args.offload_expert, device=device,
                              dtype=dtype, loras=loras or None,
                              loras_low=(loras if loras_low is None else loras_low) or None)
    for net, path in ((model.high, pair[0]), (model.low, pair[1])):
        net.moga_config = moga_settings(args, ckpt.inspect_checkpoint(path))
    return model, pair


def encode_images(args, model, vae, plan, images, width, height):
    """The ImageCondition of the start images (None: text-to-video)."""
    from .conditioning import image_condition
    from .wan_image_io import ClipVision, encode_start_images, load_image
    cfg = model.config
    if not images:
        if cfg.conditioning in ("concat", "clip+concat"):
            raise CliError(f"{args.model} is {cfg.name}, an image-to-video model: pass --image FILE (shot 1's "
                           f"start image)")
        return None
    if cfg.conditioning == "none":
        raise CliError(f"{args.model} is {cfg.name}, a text-to-video model: --image/--shot-image need an "
                       f"image-to-video checkpoint (Wan2.1 I2V, Wan2.2 I2V A14B, TI2V-5B)")
    pixels = {s: load_image(p, width, height) for s, p in images.items()}
    latents, fill = encode_start_images(vae, cfg, plan.shot_frames, pixels)
    clip = None
    if cfg.image_dim:
        if not args.clip_vision:
            raise CliError(f"{cfg.name} also reads the image through CLIP vision: pass --clip-vision DIR (a "
                           f"CLIPVisionModel folder, e.g. the diffusers release's image_encoder/)")
        enc = ClipVision.load(args.clip_vision)
        clip = {s: enc.encode(img) for s, img in pixels.items()}
    shots = plan.latent_shot_frames()
    lat = next(iter(latents.values()))
    return image_condition(cfg, shots, (sum(shots), *lat.shape[-2:]), latents, clip=clip, fill=fill)


def cmd_generate(args) -> int:
    """One process, or one rank of a torchrun launch (WORLD_SIZE > 1): every rank checks the request
    before any collective (a bad flag is one clear error, not a hang), reads the same checkpoint,
    encodes the same prompts and samples the full latent with the Ulysses exchange; rank 0 decodes
    and writes."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.size is not None:
        parse_size(args.size)
    shots_only = load_plan(args)  # the shot list's own errors first (no torch yet)
    _check_exists(args.model, "model checkpoint")
    _check_exists(args.model_low, "low-noise expert")
    _check_exists(args.clip_vision, "CLIP vision encoder")
    images = parse_shot_images(args, shots_only.num_shots)
    _check_exists(args.text_encoder, "text encoder")
    _check_exists(args.vae, "VAE")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.dense_steps is not None and not 0.0 <= args.dense_steps <= 1.0:
        raise CliError(f"--dense-steps is a fraction of the steps in [0, 1], got {args.dense_steps}")
    _check_outputs(args)  # before any model is loaded: a bad --out must not cost the run

    import torch

    from . import checkpoint as ckpt
    from .outputs import save_safetensors
    from .preflight import wants_block_progress
    from .sampling import sample, sampler_settings
    from .video import video_to_frames, write_video
    from .wan_io import decode_shots

    found = (args.model, args.model_low) if args.model_low else ckpt.find_experts(args.model)
    info = ckpt.inspect_checkpoint(found[0] if found else args.model)
    loras = lora_list(args.lora)
    loras_low = lora_list(args.lora_low) if args.lora_low else None
    if loras_low is not None and not found:
        raise CliError("--lora-low is the low-noise expert's LoRA: it needs a Wan2.2 A14B pair (--model-low, "
                       "or a folder holding both experts)")
    defaults = checkpoint_defaults(info.metadata)
    run, from_ckpt = _run_settings(args, defaults)
    width, height = parse_size(run["size"])
    plan = load_plan(args, fps=defaults.get("fps"), seconds=defaults.get("seconds"))
    moga = moga_settings(args, info)
    dense_layers = ckpt.parse_layers(args.dense_layers) if args.dense_layers else ()
    if any(i >= info.config["num_layers"] for i in dense_layers):
        raise CliError(f"--dense-layers {args.dense_layers}: the model has {info.config['num_layers']} layers "
                       f"(0..{info.config['num_layers'] - 1})")
    if not info.extras and not (args.text_encoder and args.vae):
        missing = " and ".join(n for n, v in (("--text-encoder DIR", args.text_encoder), ("--vae PATH", args.vae))
                               if not v)
        raise CliError(f"{args.model} brings no text encoder/VAE of its own: pass {missing} (Wan2.1's umT5 "
                       f"encoder folder with its tokenizer; the Wan VAE folder or .safetensors)")

    exchange, world, lead = None, 1, True
    if distributed:
        try:
            from .parallel.launch import agree_on_error, env_ranks, init_from_env
            from .parallel.ulysses import check_heads
        except ImportError as e:
            raise CliError(f"this is a torchrun launch (WORLD_SIZE={os.environ['WORLD_SIZE']}) but the "
                           f"sequence-parallel runtime moga.parallel is not available ({e}); run "
                           f"without torchrun for one device") from None
        rank, world, _ = env_ranks()
        num_heads = info.config.get("num_heads") if isinstance(info.config, dict) else None
        if num_heads:  # before joining the group: no rank waits on another
            on_gpu = args.device in (None, "cuda") or str(args.device).startswith("cuda")
            check_heads(int(num_heads), world, "GPUs" if on_gpu and torch.cuda.is_available() else "processes")
        exchange, device = init_from_env(None if args.device in (None, "cuda") else args.device)
        lead = rank == 0
        _, dtype = resolve_device_dtype(str(device), args.dtype)
    else:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    try:
        refused = None
        try:
            _preflight(info, plan.token_layout(width, height), device, dtype, world, moga,
                       experts=2 if (found and not args.offload_expert) else 1, cfg=args.cfg,
                       cfg_batch=args.cfg_batch)
        except ValueError as e:
            refused = e
        if exchange is not None:
            agree_on_error(refused)  # one rank short of memory stops every rank, none waits for it
        elif refused is not None:
            raise refused
        say = (lambda *a: print(*a, file=sys.stderr)) if (lead and not args.quiet) else (lambda *a: None)
        if info.extras:
            _import_extras(info.extras)
        if from_ckpt:
            say(f"from the checkpoint's own settings: {', '.join(from_ckpt)} (flags override them)")
        say(plan.describe())
        if exchange is not None:
            say(f"sequence parallel: {world} ranks ({exchange.backend}), this one on {device}")
        t_load = time.perf_counter()
        model, experts = load_dit(args, device, dtype, loras, loras_low)
        net = model.high if experts else model   # the expert that answers config/encoder questions
        if getattr(args, "fp8_matmul", False):
            from .fp8 import enable_fp8
            for each in ((model.high, model.low) if experts else (model,)):
                report = enable_fp8(each, device)
                if lead:  # said even with --quiet when it is off: the user asked for it
                    (say if report.enabled else (lambda *a: print(*a, file=sys.stderr)))(report.summary())
        if exchange is not None:
            check_heads(model.config.num_heads, world, "GPUs" if device.type == "cuda" else "processes")
        te, vae, umt5 = load_encoders(args, net, device, dtype)
        say(f"loaded {info.architecture} in {time.perf_counter() - t_load:.1f} s")

        positive, negative = encode_plan(te, plan, use_wan_negative=umt5)
        del te
        spatial = 16 if net.config.out_dim == 48 else 8   # TI2V-5B: the Wan2.2 VAE's 16x16 pixels
        image = encode_images(args, net, vae, plan, images, width, height)
        if not lead:
            vae = None  # only rank 0 decodes
        latent_size = plan.latent_size(width, height, spatial_ratio=spatial)
        shot_frames = plan.latent_shot_frames()
        layout = plan.token_layout(width, height, spatial_ratio=spatial)
        if args.cfg_low is not None and not experts:
            raise CliError("--cfg-low is the low-noise expert's guidance: it needs a Wan2.2 A14B pair "
                           "(--model-low, or a folder holding both experts)")
        run = sampler_settings(model, run["steps"], run["cfg"], run["shift"], run["solver"], run["schedule"])
        if args.cfg_low is not None:
            run["cfg"] = (run["cfg"], args.cfg_low)
        steps = run["steps"]
        if args.dense_warmup_steps is not None and not 0 <= args.dense_warmup_steps <= steps:
            raise CliError(f"--dense-warmup-steps is a step count in 0..{steps}, got {args.dense_warmup_steps}")
        dense_steps = getattr(net, "dense_warmup", 0.0) if args.dense_steps is None else args.dense_steps
        warmup_steps = args.dense_warmup_steps
        if net.config.num_groups == 0:
            dense_steps, warmup_steps = 0.0, None  # no routers: every step is dense anyway

        bar = None
        if lead and not args.quiet:
            from tqdm import tqdm
            desc = "denoising" if exchange is None else f"denoising on {world} ranks"
            bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr)

        def progress(step, total, latent):
            if bar is not None:
                bar.update(1)

        block_progress = None
        if bar is not None and wants_block_progress(net.config, layout.num_tokens, device.type, world):
            def block_progress(step, done, total):  # long steps: say where inside the step
                bar.set_postfix_str(f"block {done}/{total}")

        probe = model.low if experts else model   # the last expert to run: its routing is the last step's
        _record_routing(probe, True)
        try:
            result = sample(model, positive, negative, shot_frames=shot_frames, latent_size=latent_size,
                            seed=args.seed, moga=None if experts else moga, dense_steps=dense_steps,
                            dense_warmup_steps=warmup_steps, dense_layers=dense_layers, callback=progress,
                            device=device, dtype=dtype, parallel=exchange, image=image,
                            cfg_batch=args.cfg_batch, return_result=True, block_callback=block_progress, **run)
        finally:
            if bar is not None:
                bar.close()
        m_eff = effective_groups(probe, moga.capacity, moga.capacity_split)
        run_groups = moga.num_groups if net.config.num_groups else 0
        _record_routing(probe, False)
        if not lead:
            return 0

        t_dec = time.perf_counter()
        dec_bar = None
        if not args.quiet:
            from tqdm import tqdm
            dec_bar = tqdm(total=len(shot_frames), desc="decoding", unit="shot", file=sys.stderr)
        try:
            frames = video_to_frames(decode_shots(vae, result.latent, shot_frames,
                                                  progress=dec_bar and (lambda done, n: dec_bar.update(1))))
        finally:
            if dec_bar is not None:
                dec_bar.close()
        if frames.shape[0] != plan.total_frames or frames.shape[1:3] != (height, width):
            raise RuntimeError(f"the VAE returned {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}, "
                               f"the plan asks for {plan.total_frames} of {width}x{height}")
        out = write_video(args.out, frames, fps=plan.fps)
        if args.save_latent:
            save_safetensors({"latent": result.latent.contiguous().cpu(),
                              "shot_frames": torch.tensor(shot_frames, dtype=torch.int64)}, args.save_latent,
                             metadata={"fps": str(plan.fps), "size": f"{width}x{height}", "world_size": str(world)})
        decode_s = time.perf_counter() - t_dec

        sparsity = "dense" if m_eff is None else f"{m_eff:.2f}" + _groups_note(run_groups, moga.capacity)
        ranks = "" if exchange is None else f" over {world} ranks"
        print(f"wrote {out}: {plan.num_shots} shots, {plan.total_frames} frames {width}x{height} at "
              f"{plan.fps:g} fps ({plan.seconds:.1f} s)")
        print(f"tokens {layout.num_tokens:,} ({layout.frames} latent frames x {layout.height}x{layout.width}){ranks}, "
              f"M_eff {sparsity}, {result.steps} steps at {result.seconds_per_step:.2f} s/step, "
              f"decode {decode_s:.1f} s")
        return 0
    finally:
        if exchange is not None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _check_outputs(args):
    from .outputs import check_output
    overwrite = getattr(args, "overwrite", False)
    check_output(args.out, "video", overwrite, flag="--out")
    if args.save_latent:
        check_output(args.save_latent, "safetensors", overwrite, flag="--save-latent")
        if os.path.abspath(args.save_latent) == os.path.abspath(args.out):
            raise CliError("--save-latent and --out name the same file: give the latent its own .safetensors")


def _groups_note(groups: int, capacity) -> str:
    """What M_eff is measured against: with a group capacity the over-full groups are cut into parts,
    each attended alone, so M_eff (the routed branch's dense-cost ratio) can exceed M."""
    if not groups:
        return ""
    return f" (M {groups}" + (f", capacity {capacity:g}: groups cut to size, so M_eff can exceed M)"
                              if capacity else ")")


def _preflight(info, layout, device, dtype, world: int, moga, experts: int = 1, cfg=None, cfg_batch=None):
    """Refuse, before any weight is read, a run past the hard limits or beyond the device's free
    memory (moga.preflight; the message holds the estimate and the fix). experts: expert models held
    on the device at once (an A14B pair without --offload-expert: 2)."""
    from .preflight import PreflightError, available_bytes, guidance_batch, preflight, weight_bytes
    available = available_bytes(device)
    if available is not None and device.type == "cpu":
        available //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # ranks of one host share its RAM
    try:
        return preflight(info.config, layout, device=device, dtype=dtype,
                         weight_bytes=experts * weight_bytes(info, dtype), world_size=world,
                         moga=bool(info.moga) and not moga.dense, available=available,
                         batch=guidance_batch(device.type, layout.num_tokens, world, cfg, cfg_batch))
    except PreflightError as e:
        if experts > 1 and "Fix:" in str(e):
            raise PreflightError(f"{e}; or --offload-expert (one expert on the device at a time)") from None
        raise


def _import_extras(name: str):
    """A checkpoint that brings its own text encoder/VAE names the module that loads them (moga.demo)."""
    from . import checkpoint as ckpt
    if name in ckpt.EXTRA_LOADERS:
        return
    for module in ("moga.demo",):
        if _has_module(module):
            importlib.import_module(module)


def cmd_info(args) -> int:
    import json

    from .checkpoint import inspect_checkpoint
    _check_exists(args.checkpoint, "checkpoint")
    info = inspect_checkpoint(args.checkpoint, num_heads=args.num_heads)
    print(json.dumps(info.to_dict(), indent=2, default=str) if args.json else str(info))
    return 0


def cmd_patch(args) -> int:
    _check_exists(args.src, "checkpoint")
    _check_exists(args.routers, "router file")
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
    from .outputs import check_output
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
    from .checkpoint import format_layers, parse_layers, patch_checkpoint
    if args.routers_out is not None:
        from .checkpoint.router_file import calibrate_router_file
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


def cmd_demo(args) -> int:
    from .outputs import check_output
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1 (the demo model's own setting is 40), got {args.steps}")
    if args.dense_steps is not None and not 0.0 <= args.dense_steps <= 1.0:
        raise CliError(f"--dense-steps is a fraction of the steps in [0, 1], got {args.dense_steps}")
    if args.checkpoint is not None:
        _check_exists(args.checkpoint, "demo checkpoint")
    check_output(args.out, "video", args.overwrite, flag="--out")
    args.device = str(check_device(args.device))
    if _has_module("moga.demo"):
        demo = importlib.import_module("moga.demo")
        run_demo = getattr(demo, "run_demo", None)
        if run_demo is not None:
            return int(run_demo(args) or 0)
    if _has_module("moga.attention.demo"):
        return int(importlib.import_module("moga.attention.demo").main() or 0)
    raise CliError("no demo is installed in this copy of moga (moga.demo.run_demo / moga.attention.demo)")


# ---- entry -------------------------------------------------------------------------------------
def _loaded_types(*types) -> tuple:
    """Exception types to catch; (module, name) ones only if that module was imported (it alone raises
    them), so that `moga train --help` and the like never import torch for an except clause."""
    out = []
    for t in types:
        if isinstance(t, tuple):
            t = getattr(sys.modules.get(t[0]), t[1], None)
        if t is not None:
            out.append(t)
    return tuple(out)


def _subparser(parser, command):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _unknown_hint(command, unknown) -> str:
    if any(a.split("=")[0] in ("--gpus", "--gpu", "--nproc", "--world-size") for a in unknown):
        return (f"; `moga {command}` runs on one device (--device); for several GPUs launch it with "
                f"`torchrun --nproc-per-node G -m moga {command} ...` (docs/parallel.md)")
    return ""



def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _LIGHT_PARSERS and argv[0] in _FORWARDS:
        options = importlib.import_module(_LIGHT_PARSERS[argv[0]]).build_parser().parse_args(argv[1:])
        args = argparse.Namespace(func=lambda a: _run_parsed(_FORWARDS[argv[0]], options))
    elif argv and argv[0] in _FORWARDS:  # the module parses its own options, --help included
        args = argparse.Namespace(func=lambda a: _run_module(_FORWARDS[argv[0]], argv[1:]))
    else:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would blame the top-level parser and print its usage, not the command's
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}"
                                                   + _unknown_hint(args.command, unknown))
    rank = _torchrun_rank()  # under torchrun: rank 0 alone prints, every rank exits alike
    stop_watch = None
    if rank is not None:
        from .parallel import launch  # imports no torch
        stop_watch = launch.watch_signals(lead=rank == 0)
    say = (lambda msg: print(msg, file=sys.stderr)) if rank in (None, 0) else (lambda msg: None)
    try:
        code = _run(args, say, rank)
        return launch.exit_together(int(code or 0)) if rank is not None else code
    finally:
        if stop_watch is not None:
            stop_watch()


def _torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (WORLD_SIZE > 1), else None."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except ValueError:
        return None


def _run(args, say, rank) -> int:
    """The command, with every error a person can act on as one line and its exit status."""
    def cancelled_by_signal():  # under torchrun: a collective broken by the other ranks' Ctrl-C
        if rank is None:
            return False
        from .parallel import launch
        return launch.cancelled()

    try:
        return args.func(args)
    except _loaded_types(KeyboardInterrupt, ("moga.sampling", "Cancelled")):
        say("moga: cancelled")
        return EXIT_CANCELLED
    except _loaded_types(CliError, ValueError, FileNotFoundError, ("moga.wan_io", "MissingExtra")) as e:
        if cancelled_by_signal():
            say("moga: cancelled")
            return EXIT_CANCELLED
        say(f"moga: error: {e}")
        return EXIT_USAGE
    except BaseException:
        if cancelled_by_signal():
            say("moga: cancelled")
            return EXIT_CANCELLED
        raise


if __name__ == "__main__":
    sys.exit(main())
