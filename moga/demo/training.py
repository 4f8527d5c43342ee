"""Training the demo model: the codec first (frozen afterwards), then the DiT and its text encoder
together with flow matching + the group-balancing loss (`moga.train.Trainer`).

    python -m moga.train demo --out runs/demo --device cuda --steps 3000 --batch 32
    python -m moga.train demo --out runs/smoke --tiny --steps 3 --codec-steps 3   # CPU smoke test

The run folder holds codec.safetensors, ckpt/ (resumable: weights, EMA, optimizer moments as
safetensors + state.json), log.jsonl and, at the end, model.safetensors (the shippable file).
Run the same command again with --resume to continue where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..outputs import write_json
from ..attention.config import CAPACITY_SPLITS
from ..train.state import load_tensors, read_json, save_tensors
from ..train.trainer import Trainer, TrainConfig
from .codec import ClipCodec, DemoCodec, PatchCodec, make_codec
from .data import WorldData
from .model import CODEC, build_demo, save_demo
from .world import render_batch, sample_story

# ---- codec ---------------------------------------------------------------------------------------


def codec_batch(step: int, size: int, seed: int, device) -> torch.Tensor:
    """[B, 3, 17, S, S] single-shot clips (the codec codes shots alone)."""
    base = (seed * 1_000_003 + step) * 4096 + 7
    return render_batch([sample_story(base + i, 1) for i in range(size)], device)


def object_weight(video: torch.Tensor, boost: float = 9.0) -> torch.Tensor:
    """Per-pixel loss weight: 1 + boost where the pixel differs from its frame's corner (the background)."""
    corner = video[..., :1, :1]
    return 1.0 + boost * ((video - corner).abs().sum(1, keepdim=True) > 0.05).float()


def train_codec(steps: int = 1500, batch: int = 16, lr: float = 1.5e-3, seed: int = 0, device="cpu",
                latent_noise: float = 0.05, log=print, config: dict | None = None,
                time_limit: float | None = None) -> DemoCodec:
    """Train the autoencoder on world clips; latent noise (relative to the latents' spread) makes the
    decoder forgiving of the small errors a diffusion model leaves. Then measure the latent statistics."""
    torch.manual_seed(seed)
    codec = DemoCodec(**(config or CODEC)).to(device)
    opt = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            log(f"codec: time limit {time_limit:.0f}s reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        video = codec_batch(step, batch, seed, device)
        z = codec.encode_raw(video)
        noise = torch.randn(z.shape, generator=gen).to(device)
        rec = codec.decode_raw(z + latent_noise * z.detach().std() * noise)
        w = object_weight(video)
        loss = (w * (rec - video) ** 2).mean() + 0.5 * (w * (rec - video).abs()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"codec step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    codec.eval()
    measure_latent_stats(codec, seed=seed, device=device)
    return codec


@torch.no_grad()
def measure_latent_stats(codec: ClipCodec, batches: int = 8, batch: int = 16, seed: int = 0, device="cpu"):
    zs = [codec.encode_raw(codec_batch(10_000 + i, batch, seed + 1, device)).float() for i in range(batches)]
    z = torch.cat(zs).transpose(0, 1).reshape(codec.latent_channels, -1)
    codec.latent_mean.copy_(z.mean(1))
    codec.latent_std.copy_(z.std(1).clamp_min(1e-4))


@torch.no_grad()
def codec_quality(codec: ClipCodec, stories: int = 8, seed: int = 0, device="cpu") -> dict:
    """PSNR and the evaluator's scores of round-tripped held-out stories."""
    from .evaluate import score_story, summarize
    from .world import heldout_stories, render_story

    scores, mse = [], []
    for story in heldout_stories(stories, seed=seed):
        video = render_story(story, device)[None]
        rec = codec.decode_shots(codec.encode_shots(video, story.shot_frames),
                                 [(f - 1) // 4 + 1 for f in story.shot_frames])
        mse.append(float(F.mse_loss(rec, video)))
        scores.append(score_story(rec[0].cpu(), story))
    out = summarize(scores)
    out["psnr"] = round(10 * math.log10(4.0 / max(sum(mse) / len(mse), 1e-12)), 2)
    return out


def fit_patch_codec(stories: int = 96, seed: int = 0, device="cpu", channels: int = 16, log=print) -> PatchCodec:
    """The linear pixel-patch codec: principal components of world clips' packed patches (seconds
    on a CPU), then the latent statistics."""
    start = time.perf_counter()
    codec = PatchCodec(channels).to(device)
    codec.fit(codec_batch(20_000 + i, 16, seed, device) for i in range(max(stories // 16, 1)))
    measure_latent_stats(codec, seed=seed, device=device)
    log(f"patch codec fitted on {max(stories // 16, 1) * 16} clips in {time.perf_counter() - start:.1f}s")
    return codec.eval()


def save_codec(codec: ClipCodec, path) -> None:
    save_tensors(path, codec.state_dict(), metadata={"config": json.dumps(codec.config())})


def load_codec(path, device="cpu") -> ClipCodec:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" in meta:
        codec = make_codec(json.loads(meta["config"]))
        codec.load_state_dict(load_tensors(path))
    else:  # a demo model file: its vae.* tensors
        from .model import load_demo
        codec = load_demo(path).vae
    return codec.to(device).eval().requires_grad_(False)


# ---- the DiT -------------------------------------------------------------------------------------

def _tiny(dense: bool, seed: int, num_groups: int | None = None, router_std: float = 0.02):
    from ..model import WanModel
    from ..train.trainer import init_wan_weights
    from .model import MOGA, NUM_GROUPS, demo_wan_config
    from .text import DemoTextEncoder

    torch.manual_seed(seed)
    layers = 2
    over = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, text_dim=32)
    if not dense:
        over.update(moga_layers=tuple(range(layers)), num_groups=num_groups or NUM_GROUPS)
    model = WanModel(demo_wan_config(dense, **over))
    init_wan_weights(model, seed, router_std)
    if not dense:
        model.moga_config = MOGA.replace(num_groups=num_groups or NUM_GROUPS)
    return model, DemoTextEncoder(dim=32, layers=1, heads=2, max_len=16)


def fresh_models(args):
    """(DiT, text encoder) as the command line asks: tiny or full size, dense or MoGA with M groups,
    router rows drawn at --router-init-std (default Wan's 0.02)."""
    std = getattr(args, "router_init_std", None) or 0.02
    if args.tiny:
        model, text = _tiny(args.dense, args.seed, args.num_groups, router_std=std)
    else:
        groups = {"num_groups": args.num_groups} if args.num_groups and not args.dense else {}
        model, text = build_demo(args.dense, args.seed, router_std=std, **groups)
    if getattr(args, "world", "short") == "long":  # callbacks add words ("the red one ...")
        from .long_world import LONG_VOCAB
        from .text import extend_vocab
        text = extend_vocab(text, LONG_VOCAB)
    return model, text


def make_data(args, codec) -> WorldData:
    """The training stories: the short world's, or long stories mixed with them (--world long)."""
    if getattr(args, "world", "short") == "long":
        from .long_data import LongWorldData
        return LongWorldData(codec, seed=args.seed, object_weight=args.object_weight,
                             long_shot_frames=args.long_shot_frames, short_every=args.short_every)
    return WorldData(codec, seed=args.seed, object_weight=args.object_weight)


def train_demo(args) -> dict:
    attention = attention_changes(args)  # bad flags fail before the codec is trained
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logf = open(out / "log.jsonl", "a")

    def log(msg: str, **row):
        print(msg, flush=True)
        if row:
            logf.write(json.dumps(row) + "\n")
            logf.flush()

    # codec: given, found in the run folder, or trained now
    codec_path = out / "codec.safetensors"
    if args.codec:
        codec = load_codec(args.codec, device)
        log(f"codec from {args.codec}")
    elif codec_path.exists():
        codec = load_codec(codec_path, device)
        log(f"codec from {codec_path}")
    else:
        t0 = time.perf_counter()
        if args.codec_kind == "pca":
            codec = fit_patch_codec(32 if args.tiny else 96, seed=args.seed, device=device, log=log)
        else:
            cfg = dict(CODEC, hidden=16, blocks=1) if args.tiny else None
            codec = train_codec(args.codec_steps, args.codec_batch, seed=args.seed, device=device, log=log,
                                config=cfg)
        save_codec(codec, codec_path)
        q = codec_quality(codec, stories=2 if args.tiny else 16, device=device)
        log(f"codec trained in {time.perf_counter() - t0:.0f}s: {q}", event="codec", seconds=time.perf_counter() - t0, **q)
    codec.requires_grad_(False).eval()

    model, text = fresh_models(args)
    if attention:  # trained under the settings it will sample with; the exported file records them
        model.moga_config = model.moga_config.replace(**attention)
    model.to(device)
    text.to(device)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, ema_decay=args.ema, compute_dtype=args.compute_dtype,
                         log_every=args.log_every, save_every=args.save_every, shift=args.shift,
                         max_file_mb=args.max_file_mb, moga=dict(attention),
                         router_lr_scale=args.router_lr_scale, balance_weight=args.balance_weight,
                         dense_warmup=args.dense_warmup)
    data = make_data(args, codec)
    ckpt = out / "ckpt"
    resumed = args.resume and (ckpt / "state.json").exists()
    init_record = out / "init.json"  # how the run began, for the exported file's record after resumes
    if args.init and not resumed:
        fresh = init_from(args.init, model, text, log=log)
        how = "file"
        if fresh:
            how = args.init_routers
            if how == "calibrate":
                calibrate_routers(model, text, data, fresh, seed=args.seed, shift=args.shift, log=log)
        write_json(init_record, {"init": Path(args.init).name, "init_routers": how})
        log(f"weights from {args.init} (fresh optimizer; routers: {how})")
    modules = {"text_encoder": text}
    if resumed:
        saved_config = read_json(ckpt / "state.json")["config"]
        saved = saved_config.get("moga") or {}
        if saved != attention:
            raise ValueError(f"{ckpt} was trained with attention settings {saved or 'the defaults'}, not "
                             f"{attention or 'the defaults'}: resume with the same --context-frames / "
                             f"--capacity / --capacity-split, or start a new --out folder")
        if float(saved_config.get("dense_warmup", 0.0)) != args.dense_warmup:
            raise ValueError(f"{ckpt} was trained with --dense-warmup {saved_config.get('dense_warmup', 0.0)}, "
                             f"not {args.dense_warmup}: resume with the same, or start a new --out folder")
        if args.auto_steps:  # the step count was fitted to the budget when the run began: keep it
            config.steps = int(saved_config["steps"])
        trainer = Trainer.resume(ckpt, model, data, modules=modules, config=config, device=device,
                                 log=lambda m: log(m))
        log(f"resumed at step {trainer.step} of {config.steps} ({trainer.seconds:.0f}s trained)")
    else:
        trainer = Trainer(model, data, config, modules=modules, device=device, log=lambda m: log(m))
    if args.compile:  # in place: parameter names (checkpoints, EMA) stay the model's own
        model.compile()
    n_params = sum(p.numel() for p in trainer.params.values())
    log(f"training {'dense' if args.dense else 'MoGA'} demo DiT: {n_params / 1e6:.2f}M trainable parameters, "
        f"{config.steps} steps of {config.batch_size} on {device}")
    if args.auto_steps and args.time_limit and not resumed:
        rows = auto_size(trainer, args, log)
    else:
        rows = trainer.run(time_limit=args.time_limit, save_dir=ckpt)
    for r in rows:
        logf.write(json.dumps({"event": "train", **r}) + "\n")
    trainer.save(ckpt)

    # export the EMA (or plain) weights as the shippable file
    weights = trainer.weights(ema=True)
    final_model, final_text = fresh_models(args)
    final_model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("text_encoder.")})
    final_text.load_state_dict({k[len("text_encoder."):]: v for k, v in weights.items()
                                if k.startswith("text_encoder.")})
    final_model.moga_config = model.moga_config
    final_model.dense_warmup = args.dense_warmup  # it samples as it trained: the file's moga.dense_warmup
    last = trainer.history[-1] if trainer.history else {}
    extra = {"training": {"steps": trainer.step, "batch": config.batch_size, "seconds": round(trainer.seconds, 1),
                          "final_loss": last.get("loss"), "final_flow": last.get("flow"),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "dense": bool(args.dense), "seed": args.seed, "lr": args.lr, "warmup": args.warmup,
                          "ema": args.ema, "object_weight": args.object_weight,
                          "router_lr_scale": args.router_lr_scale, "balance_weight": args.balance_weight,
                          "dense_warmup": args.dense_warmup, "router_init_std": args.router_init_std,
                          **({"world": "long", "long_shot_frames": args.long_shot_frames,
                              "short_every": args.short_every} if getattr(args, "world", "short") == "long" else {}),
                          **(read_json(init_record) if args.init and init_record.exists() else {}),
                          "date": time.strftime("%Y-%m-%d"), **({"attention": attention} if attention else {})}}
    path = save_demo(out / "model.safetensors", final_model.cpu(), final_text.cpu(), codec.cpu(), extra=extra)
    summary = {"model": str(path), "bytes": path.stat().st_size, **extra["training"]}
    log(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB): {summary}", event="done", **summary)
    logf.close()
    return summary


def attention_changes(args) -> dict:
    """MoGA settings the DiT trains under, where they differ from the shipped defaults (`MOGA`)."""
    changes = {}
    if args.context_frames is not None:
        changes["context_frames"] = int(args.context_frames)
    if args.capacity is not None:
        changes["capacity"] = float(args.capacity)
    if args.capacity_split is not None:
        changes["capacity_split"] = args.capacity_split
    if args.num_groups is not None:
        if args.dense:
            raise ValueError("--num-groups sets the routers' rows; the dense model (--dense) has none: drop it")
        if args.num_groups < 2:
            raise ValueError(f"--num-groups must be at least 2 (router rows M), got {args.num_groups}")
    if args.router_init_std is not None and (args.dense or not args.router_init_std > 0):
        raise ValueError("--router-init-std draws the routers' rows: it must be > 0, and the dense model "
                         f"(--dense) has no routers (got {args.router_init_std}{', --dense' if args.dense else ''})")
    if args.dense_warmup and args.dense:
        raise ValueError("--dense-warmup trains a MoGA model's dense first sampling steps; the dense model "
                         "(--dense) is dense at every step: drop it")
    if not 0.0 <= args.dense_warmup < 1.0:
        raise ValueError(f"--dense-warmup is the share of sampling steps (the first ones) run dense, in [0, 1); "
                         f"got {args.dense_warmup}")
    if changes and args.dense:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in changes)} set the MoGA branches; "
                         f"the dense model (--dense) has none: drop them")
    if changes:
        from .model import MOGA
        MOGA.replace(**changes)  # the config's own checks: a clear error before any training
    return changes


ROUTER_SUFFIX = "self_attn.router.weight"


def init_from(path, model, text, log=print) -> list[int]:
    """Start from a demo model file's DiT and text encoder weights (a second training phase).

    A dense file may start a MoGA model, as the paper fine-tunes dense Wan into MoGA: every weight but the
    routers' rows must match; returns the layers whose routers the file lacks (they keep their fresh rows
    until `calibrate_routers` replaces them). A MoGA file may start a dense model: its routers are dropped
    (a dense twin from the same weights, for a comparison at equal budget). Anything else that differs is an
    error naming it."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = {k: v.float() for k, v in sd.items() if not k.startswith(("text_encoder.", "vae."))}
    expected = model.state_dict()
    routers = {k for k in expected if k.endswith(ROUTER_SUFFIX)}
    if not routers:
        dropped = sorted(k for k in own if k.endswith(ROUTER_SUFFIX))
        for k in dropped:
            del own[k]
        if dropped:
            log(f"--init {path}: a MoGA file starts this dense model: its {len(dropped)} routers are dropped")
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    reshaped = sorted(k for k in set(own) & set(expected) if own[k].shape != expected[k].shape)
    if unexpected or reshaped or (missing and (set(missing) - routers or any(k in own for k in routers))):
        what = (f"weights this model lacks: {unexpected[:3]}" if unexpected else
                f"other shapes: {reshaped[0]} {tuple(own[reshaped[0]].shape)} against "
                f"{tuple(expected[reshaped[0]].shape)}" if reshaped else f"no {sorted(set(missing) - routers or missing)[:3]}")
        raise ValueError(f"--init {path} does not fit this model ({what}): give a demo model file of the same "
                         f"size (a dense file may start a MoGA model; its routers are then calibrated), and the "
                         f"same --num-groups as the file's routers")
    model.load_state_dict(own, strict=False)
    from .text import load_text_state
    load_text_state(text, {k[len("text_encoder."):]: v.float() for k, v in sd.items()
                           if k.startswith("text_encoder.")})
    return sorted(int(k.split(".")[1]) for k in missing)


@torch.no_grad()
def calibrate_routers(model, text, data: WorldData, layers, batches: int = 2, batch: int = 8,
                      tokens: int = 32768, seed: int = 0, shift: float = 3.0, log=print) -> None:
    """Router rows from content: unit k-means centroids (cosine) of each routed layer's self-attention input
    on training stories at training noise levels, the model run dense (its routers are not trained yet).
    A token then joins the group whose centroid it is nearest, and its gate starts near 1 (fresh rows at
    std 0.02 give every group about 1/M, a routed branch scaled to near silence)."""
    from ..checkpoint import spherical_kmeans
    from ..train.trainer import shift_sigma

    layers = sorted(layers)
    dev = next(model.parameters()).device
    per_call = max(1, -(-tokens // batches))
    feats: dict[int, list] = {i: [] for i in layers}
    pick = torch.Generator().manual_seed(seed)

    def hook(index):
        def grab(module, args, kwargs):
            rows = (args[0] if args else kwargs["x"]).flatten(0, -2).float()
            sel = torch.randperm(rows.shape[0], generator=pick)[:per_call].to(rows.device)
            feats[index].append(F.normalize(rows[sel], dim=-1))
        return grab

    handles = [model.blocks[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    dense = model.moga_config.replace(dense=True)
    was_training = model.training
    model.eval()
    try:
        for k in range(batches):
            b = data.batch(10 ** 7 + k, batch, dev)  # story indices no training step draws
            g = torch.Generator(device=dev).manual_seed(seed * 1009 + k)
            x0 = b.latent.to(dev, torch.float32)
            u = torch.rand(x0.shape[0], generator=g, device=dev, dtype=torch.float64)
            s = shift_sigma(u, shift).float().view(-1, *([1] * (x0.dim() - 1)))
            xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g, device=dev)
            n = x0.shape[0]
            context = list(text.encode_batch([c for shot in b.captions for c in shot]).to(dev).split(n))
            model(xt, s.flatten() * 1000.0, context, shot_frames=b.shot_frames, moga=dense)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for i in layers:
        router = model.blocks[i].self_attn.router
        rows = spherical_kmeans(torch.cat(feats.pop(i)), router.num_groups, seed=seed + i)
        router.weight.copy_(rows.to(router.weight))
    log(f"routers of layers {layers} calibrated: k-means of {per_call * batches} tokens each "
        f"({batches} batches of {batch} stories, dense pass)")


def auto_size(trainer: Trainer, args, log) -> list[dict]:
    """Fit the step count to --time-limit: time `--probe` steps (inside the LR warm-up, so the run
    equals one started with the final step count), then set `steps` to what the remaining time
    allows. With --sync-dir, runs training side by side agree on the smallest count (equal budgets)."""
    start = time.perf_counter()
    probe, warmup = max(int(args.probe), 6), trainer.config.warmup
    if probe >= warmup > 6:  # the probe must not change the LR schedule: keep it inside the warm-up
        log(f"--probe {probe} cut to {warmup - 1}: it must stay inside the {warmup}-step warm-up")
        probe = warmup - 1
    if probe >= warmup:
        raise ValueError(f"--auto-steps times {probe} steps inside the warm-up, which is only {warmup} steps: "
                         f"use --warmup 8 or more")
    trainer.config.steps = 10 ** 9
    rows = trainer.run(steps=trainer.step + 5)
    t0 = time.perf_counter()
    rows += trainer.run(steps=trainer.step + probe - 5)
    per_step = (time.perf_counter() - t0) / (probe - 5)
    if args.budget_seconds:  # the whole run's training time, over this call and resumed ones
        left = args.budget_seconds - (time.perf_counter() - start)
    else:
        left = args.time_limit - (time.perf_counter() - start) - args.export_margin
    steps = trainer.step + max(int(left / per_step * 0.97), 1)
    if args.sync_dir:
        steps = _agree(Path(args.sync_dir), args.sync_name or ("dense" if args.dense else "moga"),
                       args.sync_peers.split(","), steps, log)
    trainer.config.steps = steps
    log(f"{per_step * 1000:.0f} ms per step: training {steps} steps", event="auto_steps", steps=steps,
        ms_per_step=per_step * 1000)
    rows += trainer.run(time_limit=args.time_limit - (time.perf_counter() - start) - 0.5 * args.export_margin)
    return rows


def _agree(folder: Path, name: str, peers: list[str], steps: int, log, timeout: float = 120.0) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.steps").write_text(str(steps))
    deadline = time.monotonic() + timeout
    counts = {}
    while time.monotonic() < deadline:
        counts = {p: (folder / f"{p}.steps").read_text() for p in peers if (folder / f"{p}.steps").exists()}
        if len(counts) == len(peers) and all(counts.values()):
            return min(int(v) for v in counts.values())
        time.sleep(0.2)
    log(f"sync: peers {sorted(set(peers) - set(counts))} did not report within {timeout:.0f}s; using {steps}")
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (codec, checkpoints, log, model.safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--shift", type=float, default=3.0, help="timestep shift of the training sigmas")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay (0: off)")
    p.add_argument("--compute-dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="train the dense-attention baseline (no routers)")
    p.add_argument("--codec", default=None, help="use this codec (codec.safetensors or a demo model file)")
    p.add_argument("--codec-kind", choices=("pca", "learned"), default="pca",
                   help="pca: linear pixel patches (fitted in seconds; measured better on this world); "
                        "learned: the small conv autoencoder")
    p.add_argument("--codec-steps", type=int, default=1500)
    p.add_argument("--codec-batch", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=None, help="stop (and save) after this many seconds")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-file-mb", type=float, default=0.0, help="shard checkpoint files over this size")
    p.add_argument("--tiny", action="store_true", help="a tiny model and codec (CPU smoke tests)")
    p.add_argument("--compile", action="store_true",
                   help="model.compile() (measured on an H100: dense step 0.174 -> 0.137 s; MoGA gains less "
                        "and compiles for ~100 s; benchmarks/demo_train_speed.py)")
    p.add_argument("--init", default=None, help="start from this demo model file's weights (fresh optimizer); "
                   "a dense file may start a MoGA model (the paper's dense-to-MoGA fine-tune)")
    p.add_argument("--init-routers", choices=("calibrate", "random"), default="calibrate",
                   help="routers of a MoGA model started from a dense --init file: k-means centroids of its "
                        "tokens (calibrate) or fresh rows at --router-init-std (random)")
    p.add_argument("--context-frames", type=int, default=None,
                   help="latent frames of each neighbouring shot in a window (default: the model's, 1)")
    p.add_argument("--capacity", type=float, default=None,
                   help="train with routed groups capped at this many times N/M tokens (default: off)")
    p.add_argument("--capacity-split", choices=CAPACITY_SPLITS, default=None,
                   help="how an over-full group is cut while training (default: runs)")
    p.add_argument("--num-groups", type=int, default=None,
                   help="router rows M of every MoGA layer (default: the shipped model's, 8)")
    p.add_argument("--router-lr-scale", type=float, default=1.0,
                   help="the routers' learning rate as a multiple of --lr (default 1)")
    p.add_argument("--balance-weight", type=float, default=0.1, help="alpha of the group-balancing loss")
    p.add_argument("--router-init-std", type=float, default=None,
                   help="draw the router rows from N(0, std^2) (default: Wan-style 0.02, near-uniform routing at "
                        "first; about 0.09 is the DiT's own linear scale at dim 256)")
    p.add_argument("--dense-warmup", type=float, default=0.0,
                   help="train (and record for sampling) a dense warm-up: this share of the noise range, "
                        "from the top, runs dense attention (0.075: the first 3 of 40 steps; default 0)")
    p.add_argument("--object-weight", type=float, default=4.0,
                   help="extra flow-loss weight on latent pixels the object touches (0: plain MSE)")
    p.add_argument("--auto-steps", action="store_true", help="fit --steps to --time-limit after a timed probe")
    p.add_argument("--probe", type=int, default=100,
                   help="steps timed by --auto-steps, inside the warm-up (a 30-step probe once read 257 ms "
                        "for what ran at 205 ms a step, costing the run a fifth of its steps)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="with --auto-steps: fit the step count to this many seconds of training in all, "
                        "run in chunks of --time-limit with --resume (the count is kept on resume)")
    p.add_argument("--export-margin", type=float, default=20.0, help="seconds kept for saving and export")
    p.add_argument("--world", choices=("short", "long"), default="short",
                   help="training stories: the short world's 1-4 shots, or long: 12-24-shot stories with callbacks "
                        "(moga.demo.long_world) mixed with short ones (the text encoder gains 'the', 'one')")
    p.add_argument("--long-shot-frames", type=int, default=53,
                   help="--world long: pixel frames per shot (4n+1; 53 = 14 latent frames)")
    p.add_argument("--short-every", type=int, default=4,
                   help="--world long: every this-many-th batch is the short world's (0: long stories only)")
    p.add_argument("--sync-dir", default=None, help="folder where side-by-side runs agree on the step count")
    p.add_argument("--sync-name", default=None)
    p.add_argument("--sync-peers", default="moga,dense")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moga.train demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.compute_dtype is None:
        args.compute_dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return train_demo(args)
