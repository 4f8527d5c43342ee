"""`patch`: add routers to a plain Wan checkpoint, from a router file or by training-free calibration
(k-means of each layer's self-attention inputs during a short dense denoising pass)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..attention import MoGAConfig
from ..model import WanConfig, WanModel
from .errors import CheckpointError
from .inspection import CheckpointInfo, inspect_checkpoint, plan_checkpoint
from .layouts import canonical_key, detect_layout, router_key
from .loader import load_model
from .lora import check_loras
from .moga_format import moga_metadata
from .safetensors_io import TensorSource, write_safetensors

# Dense warm-up written into calibrated checkpoints (fraction of the first sampling steps that run dense
# attention); chosen from the measurements in docs/training-free.md. Trained routers get 0.
CALIBRATED_DENSE_WARMUP = 0.25
# Group capacity written into calibrated checkpoints (MoGAConfig.capacity: routed groups over
# ceil(capacity * N / M) tokens are cut into runs); k-means groups are very unbalanced, so uncapped
# they leave most of dense attention's FLOPs (docs/training-free.md). Trained routers get None (off).
CALIBRATED_CAPACITY = 1.0


def patch_checkpoint(src, dst, num_groups: int | None, window="0,2,2", routers=None, calibrate: bool = True,
                     *, layers=None, context_frames: int = 1, fusion: str | None = None,
                     dense_warmup: float | None = None, capacity: float | None = None,
                     calibration_size=(9, 30, 52),
                     calibration_steps: int = 3, calibration_context: torch.Tensor | None = None,
                     calibration_tokens: int = 8192, seed: int = 0, device="cpu",
                     dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None,
                     num_heads: int | None = None, loras=None,
                     calibration_progress: Callable[[int, int], None] | None = None) -> CheckpointInfo:
    """Turn a Wan2.1 T2V checkpoint into a MoGA checkpoint at `dst` (a new file).

    Routers come from `routers` (a router file: safetensors with blocks.{i}.self_attn.router.weight in
    any key layout, or a dict {layer: tensor [M, dim]}), else, with `calibrate`, from training-free
    calibration: a short seeded denoising pass (`calibration_steps` Euler steps of the model itself
    on a seeded latent of `calibration_size` = latent (frames, height, width), and
    `calibration_context` or a seeded random text embedding), then per layer k-means (cosine) of
    the self-attention input tokens into M groups; the unit centroids are the router rows.
    Every other tensor of `src` is written with the same name, dtype and bytes; existing routers
    are replaced. fusion defaults to "mean" for a router file (trained) and "lse" for calibration;
    dense_warmup (the fraction of early sampling steps to run dense) to 0.0 and CALIBRATED_DENSE_WARMUP;
    capacity (MoGAConfig.capacity, 0 = off) to off and CALIBRATED_CAPACITY.
    loras: [(file, strength), ...] merged before calibrating, so the routers fit the LoRA'd model; the
    written file keeps the base weights (give the same LoRAs when loading it) and records them in
    `moga.calibration_loras`.
    progress(message): what it does next; calibration_progress(done, total): calibrate_routers' events.
    """
    say = progress or (lambda msg: None)
    dst = Path(dst)
    plan = plan_checkpoint(src, num_heads=num_heads)
    source, cfg = plan.source, plan.config
    if dst.resolve() == source.path.resolve() or dst.resolve() in [f.resolve() for f in source.files]:
        raise ValueError(f"dst {dst} is the source: write the patched checkpoint to a new file")
    if isinstance(window, str):
        window = MoGAConfig.parse_window(window)
    chosen = tuple(range(cfg.num_layers)) if layers is None else tuple(sorted(int(i) for i in layers))
    if not chosen or any(not 0 <= i < cfg.num_layers for i in chosen):
        raise ValueError(f"layers {chosen} must be indices in 0..{cfg.num_layers - 1}")
    if loras and routers is not None:
        raise ValueError("LoRAs only change calibration; with a router file they do nothing: drop the LoRAs "
                         "(give them when loading the patched file) or calibrate instead of --routers")
    if routers is not None:
        weights = _router_weights(routers, cfg)
        if layers is not None:
            weights = {i: w for i, w in weights.items() if i in chosen}
        m = {w.shape[0] for w in weights.values()}.pop()
        if num_groups not in (None, m):
            raise ValueError(f"the router file has {m} groups but num_groups={num_groups}: pass "
                             f"num_groups={m} (or None), or calibrate new routers")
        num_groups = m
        fusion = fusion or "mean"
        warmup = 0.0 if dense_warmup is None else dense_warmup
        cap = capacity
    elif calibrate:
        if not num_groups or num_groups < 1:
            raise ValueError("calibration needs num_groups >= 1 (the router's group count M)")
        say(f"calibrating {num_groups} groups in {len(chosen)} layers")
        weights = calibrate_routers(source.path if not isinstance(src, TensorSource) else src,
                                    num_groups, chosen, size=calibration_size, steps=calibration_steps,
                                    context=calibration_context, max_tokens=calibration_tokens, seed=seed,
                                    device=device, dtype=dtype, num_heads=num_heads, loras=loras,
                                    progress=calibration_progress)
        fusion = fusion or "lse"
        warmup = CALIBRATED_DENSE_WARMUP if dense_warmup is None else dense_warmup
        cap = CALIBRATED_CAPACITY if capacity is None else capacity
    else:
        raise ValueError("give routers (a router file from training) or calibrate=True")
    settings = MoGAConfig(num_groups=int(num_groups), window=window, context_frames=context_frames, fusion=fusion,
                          capacity=cap)

    old_routers = {k for c, k in plan.names.items() if c.endswith(".self_attn.router.weight")}
    copy = {k: source for k in source.keys() if k not in old_routers}
    new = {router_key(i, plan.layout): w.detach().float().cpu().contiguous() for i, w in sorted(weights.items())}
    # keep every other metadata key (a demo model's `moga.demo`, `moga.text_len`...); the MoGA settings are rewritten
    written = set(moga_metadata(settings, ()))
    meta = {k: v for k, v in source.metadata.items() if k not in written}
    if num_heads is not None:
        meta["moga.num_heads"] = str(num_heads)
    elif cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
        meta["moga.num_heads"] = str(cfg.num_heads)
    meta.update(moga_metadata(settings, sorted(weights), warmup))
    meta.pop("moga.calibration_loras", None)
    if loras and routers is None:
        meta["moga.calibration_loras"] = json.dumps([[Path(f).name, s] for f, s in check_loras(loras)])
    say(f"writing {dst}")
    write_safetensors(dst, new, meta, copy_from=copy)
    source.close()
    return inspect_checkpoint(dst)


def _router_weights(routers, cfg: WanConfig) -> dict[int, torch.Tensor]:
    if isinstance(routers, Mapping):
        weights = {int(i): torch.as_tensor(w) for i, w in routers.items()}
    else:
        rs = TensorSource(routers)
        layout = detect_layout(rs.keys()) or "wan"
        weights = {}
        for k in rs.keys():
            c = canonical_key(k, layout)
            m = re.match(r"^blocks\.(\d+)\.self_attn\.router\.weight$", c or "")
            if m:
                weights[int(m.group(1))] = rs.get(k)
        rs.close()
        if not weights:
            raise CheckpointError(f"{routers} holds no router tensors (blocks.N.self_attn.router.weight)")
    rows = {tuple(w.shape) for w in weights.values()}
    if len({r[0] for r in rows}) != 1:
        raise CheckpointError(f"the routers disagree on the group count: shapes {sorted(rows)}")
    bad = [i for i, w in weights.items() if w.dim() != 2 or w.shape[1] != cfg.dim or not 0 <= i < cfg.num_layers]
    if bad:
        i = bad[0]
        raise CheckpointError(f"router for layer {i} has shape {tuple(weights[i].shape)} but the model has "
                              f"{cfg.num_layers} layers of width {cfg.dim}: the router file belongs to "
                              f"another model")
    return weights


# ---- calibration ------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_routers(path, num_groups: int, layers: Iterable[int], size=(9, 30, 52), steps: int = 3,
                      context: torch.Tensor | None = None, max_tokens: int = 8192, seed: int = 0,
                      device="cpu", dtype=None, shift: float = 5.0, num_heads: int | None = None,
                      model: WanModel | None = None, loras=None, progress=None) -> dict[int, torch.Tensor]:
    """Training-free routers: {layer: unit centroids [M, dim] float32} from k-means (cosine) of each
    layer's self-attention input tokens during a short, seeded, dense Euler pass of the model
    (with `loras` merged: [(file, strength), ...]).
    progress(done, total): after every block of every pass and every layer's k-means
    (total = steps * num_layers + len(layers))."""
    model = model or load_model(path, device=device, dtype=dtype, num_heads=num_heads, loras=loras)
    cfg = model.config
    layers = sorted(set(int(i) for i in layers))
    f, h, w = (int(s) for s in size)
    tokens = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    if tokens < num_groups:
        raise ValueError(f"the calibration latent {size} has {tokens} tokens, fewer than {num_groups} groups")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, f, h, w, generator=g)
    if context is None:
        context = torch.randn(1, 64, cfg.text_dim, generator=g)
    cond = {}  # image-to-video kinds: a random image latent on frame 0 (mask on), random CLIP tokens
    if cfg.in_dim != cfg.out_dim:
        y = torch.cat([torch.zeros(1, 4, f, h, w), torch.randn(1, cfg.out_dim, f, h, w, generator=g)], dim=1)
        y[:, :4, 0] = 1.0
        cond["y"] = y.to(model.device)
    if cfg.image_dim:
        cond["clip"] = torch.randn(1, 257, cfg.image_dim, generator=g).to(model.device)
    per_step = max(1, -(-max_tokens // steps))
    feats: dict[int, list] = {i: [] for i in layers}
    pick_gen = torch.Generator().manual_seed(seed + 1)

    def hook(index):
        def grab(module, args, kwargs):
            xs = args[0] if args else kwargs["x"]
            rows = xs[0].float()
            if rows.shape[0] > per_step:
                sel = torch.randperm(rows.shape[0], generator=pick_gen)[:per_step].to(rows.device)
                rows = rows[sel]
            feats[index].append(torch.nn.functional.normalize(rows, dim=-1))
        return grab

    handles = [model.blocks[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    total = steps * len(model.blocks) + len(layers)
    tick = progress or (lambda done, total: None)
    try:
        dense = model.moga_config.replace(dense=True)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        dev = model.device
        lat = x.to(dev)
        for i in range(steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v = model(lat, torch.tensor([s * 1000.0], device=dev), context.to(dev), moga=dense, **cond,
                      on_block=lambda b, nb, i=i: tick(i * nb + b, total)).float()
            lat = lat + (s_next - s) * v
    finally:
        for hd in handles:
            hd.remove()
    out = {}
    for j, i in enumerate(layers, 1):
        out[i] = spherical_kmeans(torch.cat(feats.pop(i)), num_groups, seed=seed + i).cpu()
        tick(steps * len(model.blocks) + j, total)
    return out


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """k-means on unit vectors by cosine similarity; k-means++ seeding; returns unit centroids [k, d].
    Deterministic for a seed; an emptied cluster is re-seeded with the worst-served point."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} tokens cannot form {k} groups")
    g = torch.Generator().manual_seed(seed)   # seeding draws on the CPU: same picks on any device
    cent = [x[int(torch.randint(n, (1,), generator=g))]]
    best = (x @ cent[0]).clamp(max=1.0)
    for _ in range(1, k):
        dist = (1.0 - best).clamp(min=0).double().cpu()
        if float(dist.sum()) <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(dist, 1, generator=g))
        cent.append(x[idx])
        best = torch.maximum(best, x @ x[idx])
    c = torch.stack(cent)
    for _ in range(iters):
        sim = x @ c.T
        assign = sim.argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        served = sim.gather(1, assign[:, None]).squeeze(1)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            worst = int(served.argmin())
            new[j] = x[worst]
            served[worst] = 2.0
        new = torch.nn.functional.normalize(new, dim=-1)
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c
