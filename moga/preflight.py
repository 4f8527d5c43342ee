"""Preflight: will this run fit? Estimate the memory of a sampling run before any weight is read, and
refuse (with the estimate and what to change) a run that cannot fit or is past the hard limits.

    est = preflight(config, layout, device="cuda", dtype=torch.bfloat16, weight_bytes=...)
    # PreflightError (a ValueError) with the estimate and the fix if it cannot fit; else the estimate
    est = preflight_model(model, layout, device)     # the same for a loaded WanModel

What is counted, per device (sequence parallel: each of P ranks holds ceil(N / P) tokens):
- weights: every DiT parameter in the dtype it is held in (the file's, or the compute dtype the loader
  casts floating weights to; fp8 stays fp8);
- activations: the largest phase of one block's forward (inference: the residual is updated in
  place), counted tensor by tensor from moga/model.py and moga/attention/ (`_block_units`: q/k/v and
  RoPE, dense or MoGA's branches, the Ulysses all-to-all, in units of tokens x dim of float32 or
  compute-dtype bytes), the FFN phase (its [chunk, ffn_dim] hidden, `WanModel.chunk_tokens` tokens at
  a time) and the head phase (its output all-gathered to full N, and the unpatchify copies);
- the sampler's float32 latents alive during a model call (x, the conditional output, UniPC's history).
tests/test_preflight.py checks the estimate against torch's measured peak on the CPU (profiler
memory timeline) and against the H100 figures of benchmarks/RESULTS.md ("DiT step", 1.3B and 14B at
32k-262k tokens, measured before moga.fused: the count is within 2% of them).

Hard limits, whatever the memory: MAX_LATENT_FRAMES (Wan2.1 defines RoPE positions 0..1023 per axis;
beyond, the trained model has never seen a position) and MAX_TOKENS (the varlen kernels index packed
tokens with int32 cumulative lengths).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .shots import MAX_LATENT_FRAMES  # (Wan2.1's RoPE table: rope_params(1024, ...) per axis)

MAX_TOKENS = 2**31 - 1             # int32 cu_seqlens of the varlen attention kernels
HEADROOM = 0.95                    # refuse above this share of the free memory (the count is
                                   # up to 2% under the measured peaks)
TEMPORAL_RATIO = 4                 # Wan VAE: 4n + 1 frames -> n + 1 latent frames


class PreflightError(ValueError):
    """The run cannot fit or is past a hard limit; the message holds the estimate and the fix."""


@dataclass(frozen=True)
class MemoryEstimate:
    device_type: str          # "cuda" or "cpu"
    world_size: int           # devices sharing the tokens (sequence parallel)
    num_tokens: int
    latent_frames: int
    weights: int              # bytes per device
    activations: int          # bytes per device, the peak of one block (with chunk workspaces)
    latent: int               # bytes per device: sampler latents, head output

    @property
    def per_device(self) -> int:
        return self.weights + self.activations + self.latent

    def describe(self) -> str:
        where = (f"per GPU ({self.world_size} GPUs)" if self.device_type == "cuda" and self.world_size > 1
                 else "on the GPU" if self.device_type == "cuda"
                 else f"per process ({self.world_size} processes)" if self.world_size > 1 else "in RAM")
        return (f"{gib(self.per_device)} {where} for {self.num_tokens:,} tokens ({self.latent_frames:,} latent "
                f"frames): weights {gib(self.weights)}, activations {gib(self.activations)}, "
                f"latents {gib(self.latent)}")


def gib(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _bytes(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


def _block_units(c: int, f: int, *, moga: bool, parallel: bool, varlen: bool, fused: bool,
                 fused_elementwise: bool = False) -> dict[str, int]:
    """Bytes per (local token x dim) alive at the peak of each attention phase of one block
    (moga/model.py WanBlock, inference: the residual is updated in place).

    h: the float32 residual, alive throughout; xm: the modulated input in the compute dtype, alive
    for the whole self-attention call. On a float32 model (c == f) the float32 copies are no-ops."""
    h, xm = f, c
    f32_copies = 2 * f if c != f else 0
    # MoGAAttention.qkv: `q, k = apply_rope(q), apply_rope(k)` holds q and k both before and after
    # RoPE, plus v; k's RoPE works in float32 and complex64 (4 bytes a channel). With moga.fused's
    # in-place RMSNorm + RoPE (CUDA inference) only q, k, v remain.
    qkv = h + xm + 3 * c if fused_elementwise else h + xm + 5 * c + f32_copies
    # dense: q, k, v, SDPA's output (flash kernels: nothing N x N) and the o projection
    phases = {"qkv": qkv, "dense": h + xm + 5 * c}
    if moga:
        # routed branch: q, k, v gathered into group order and the packed output; the sdpa backend
        # (CPU, float32) copies every length bucket again and concatenates the pieces
        routed = h + xm + 3 * c + 3 * c + (4 * c if not varlen else c)
        # window branch: the routed output kept, q, k, v gathered into window order, the packed
        # output and (unless the fused merge reads it packed) its unsorted copy
        window = h + xm + 3 * c + c + 3 * c + c + (0 if fused else c)
        phases["moga"] = max(routed, window)
        phases.pop("dense")
    if parallel:
        # Ulysses: q, k, v shards and their head-sharded copies both alive (one tuple assignment),
        # plus the all-to-all's send and receive buffers (moga/parallel/ulysses.py)
        phases["all_to_all"] = h + xm + 3 * c + 3 * c + 2 * c
    return phases


def estimate_memory(config, num_tokens: int, latent_frames: int, *, device_type: str, dtype,
                    weight_bytes: int, world_size: int = 1, moga: bool = True, varlen: bool | None = None,
                    fused_elementwise: bool | None = None, latent_numel: int | None = None,
                    chunk_tokens: int = 16384, batch: int = 1) -> MemoryEstimate:
    """The peak memory of one device during sampling. config: a WanConfig (or its dict);
    dtype: the compute dtype; weight_bytes: bytes of the weights as held on the device; varlen:
    whether the attention runs a varlen kernel (default: on CUDA in 16-bit, as `auto` picks);
    fused_elementwise: moga.fused's Triton passes run (default: on CUDA when Triton is there);
    batch: 2 when both guidance branches run as one batch (`guidance_batch`)."""
    import torch
    get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
    dim, ffn = int(get("dim")), int(get("ffn_dim"))
    heads, out_dim = int(get("num_heads")), int(get("out_dim"))
    patch = math.prod(int(p) for p in get("patch_size"))
    c, f = _bytes(dtype), 4
    cuda = device_type == "cuda"
    if varlen is None:
        varlen = cuda and dtype in (torch.float16, torch.bfloat16)
    p = max(1, int(world_size))
    n, n_local = int(num_tokens), -(-int(num_tokens) // p)
    if fused_elementwise is None:
        import importlib.util

        from . import fused
        fused_elementwise = cuda and fused.FUSED and importlib.util.find_spec("triton") is not None
    units = _block_units(c, f, moga=moga, parallel=p > 1, varlen=varlen, fused=cuda and varlen,
                         fused_elementwise=fused_elementwise)
    rope = 4 * (dim // heads) * n_local  # complex64 [N, head_dim / 2], alive for the whole call
    chunk = min(int(chunk_tokens), n_local)
    phases = {name: u * dim * n_local for name, u in units.items()}
    # FFN, chunk by chunk: modulate's float32 output and its cast, the hidden before and after GELU
    phases["ffn"] = f * dim * n_local + chunk * (dim * (f + c) + 2 * ffn * c)
    # head: its float32 output [N, out_dim * patch] (all-gathered to full N) and two unpatchify copies
    phases["head"] = f * dim * n_local + 3 * n * out_dim * patch * 4
    activations = int(batch) * max(phases.values()) + rope
    if latent_numel is None:
        latent_numel = n * patch * int(get("in_dim"))
    # sampler, float32, alive during a model call: x, the conditional output during the
    # unconditional pass, UniPC's two data predictions and its previous x
    latent = (5 + int(batch) - 1) * latent_numel * 4  # (a batch of 2 also holds the doubled input)
    return MemoryEstimate(device_type, p, n, int(latent_frames), int(weight_bytes), int(activations),
                          int(latent))


def weight_bytes(info, dtype) -> int:
    """Bytes of a checkpoint's weights once loaded with `dtype` (moga.checkpoint.load_model's rule:
    floating weights cast to the compute dtype, fp8 kept); info: a CheckpointInfo."""
    c = _bytes(dtype)
    total = 0
    for name, count in info.dtypes.items():
        name = str(name).removeprefix("torch.").lower()
        if "float8" in name or name.startswith("f8") or "e4m3" in name or "e5m2" in name:
            total += count
        elif name in ("float32", "float16", "bfloat16", "float64", "f32", "f16", "bf16", "f64"):
            total += count * c
        else:  # integer tensors (rarely any) keep their size: count them at 8 bytes, the worst
            total += count * 8
    return total


def available_bytes(device) -> int | None:
    """Free memory where the run goes: CUDA's mem_get_info, else the system's MemAvailable (None if
    this system cannot say)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _fixes(est: MemoryEstimate, available: int, can_add_devices: bool) -> str:
    """What to change, with the share of tokens that would fit."""
    fixed = est.weights
    per_token = max(1.0, (est.per_device - fixed) / max(1, est.num_tokens))
    fit_tokens = max(0, int((available * HEADROOM - fixed) / per_token))
    share = fit_tokens / max(1, est.num_tokens)
    out = []
    if fit_tokens <= 0:
        out.append("the weights alone do not fit: use a smaller model, a lower-precision dtype "
                   "(bfloat16) or a device with more memory")
    else:
        out.append(f"fewer frames or a smaller size: about {fit_tokens:,} tokens fit here "
                   f"({share:.0%} of this run)")
    if can_add_devices:
        word = "GPUs" if est.device_type == "cuda" else "processes"
        need = math.ceil(est.num_tokens * per_token * est.world_size / max(1.0, available * HEADROOM - fixed)) \
            if available * HEADROOM > fixed else None
        if need:
            out.append(f"more {word} (sequence parallel: about {need} share the tokens)")
    return "; or ".join(out)


def check_run(est: MemoryEstimate, available: int | None, *, can_add_devices: bool = True,
              where: str | None = None) -> MemoryEstimate:
    """Raise PreflightError if the run is past a hard limit or does not fit in `available` bytes
    (None: unknown, only the hard limits apply). Returns the estimate."""
    if est.latent_frames > MAX_LATENT_FRAMES:
        frames = (MAX_LATENT_FRAMES - 1) * TEMPORAL_RATIO + 1
        raise PreflightError(
            f"the video has {est.latent_frames:,} latent frames, more than the {MAX_LATENT_FRAMES} Wan2.1 "
            f"has positions for (about {frames:,} frames in all, {frames / 16 / 60:.1f} min at 16 fps); "
            f"estimated memory {est.describe()}. Fix: shorten the shots (at most {frames:,} frames together)")
    if est.num_tokens > MAX_TOKENS:
        raise PreflightError(f"{est.num_tokens:,} tokens are more than the attention kernels can index "
                             f"({MAX_TOKENS:,}); estimated memory {est.describe()}. Fix: fewer frames or a "
                             f"smaller size")
    if available is not None and est.per_device > available * HEADROOM:
        place = where or ("the GPU" if est.device_type == "cuda" else "RAM")
        raise PreflightError(
            f"this run needs about {est.describe()}, but {place} has {gib(available)} free. "
            f"Fix: {_fixes(est, available, can_add_devices)}")
    return est


def guidance_batch(device_type: str, num_tokens: int, world_size: int = 1, cfg=None, cfg_batch=None) -> int:
    """2 where `moga.sampling.sample` runs both guidance branches as one batch (its cfg_batch rule:
    asked for, or by default on one GPU up to CFG_BATCH_MAX_TOKENS tokens), else 1. cfg None:
    unknown (the checkpoint's default): counted as guided."""
    from .sampling import CFG_BATCH_MAX_TOKENS
    if cfg is not None and all(float(c) == 1.0 for c in (cfg if isinstance(cfg, (tuple, list)) else (cfg,))):
        return 1
    if cfg_batch is not None:
        return 2 if cfg_batch else 1
    return 2 if (device_type == "cuda" and world_size == 1 and num_tokens <= CFG_BATCH_MAX_TOKENS) else 1


def preflight(config, layout, *, device, dtype, weight_bytes: int, world_size: int = 1, moga: bool = True,
              available: int | None = -1, resident: int = 0, can_add_devices: bool = True,
              chunk_tokens: int = 16384, batch: int = 1) -> MemoryEstimate:
    """estimate_memory + check_run for a TokenLayout on `device`. available=-1: ask the device
    (available_bytes). resident: bytes of this run's weights already on the device (they count as
    free: the run reuses them)."""
    import torch
    device = torch.device(device)
    est = estimate_memory(config, layout.num_tokens, layout.frames, device_type=device.type, dtype=dtype,
                          weight_bytes=weight_bytes, world_size=world_size, moga=moga,
                          chunk_tokens=chunk_tokens, batch=batch)
    if available == -1:
        available = available_bytes(device)
    if available is not None:
        available += int(resident)
    return check_run(est, available, can_add_devices=can_add_devices)


def model_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers, as held."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def preflight_model(model, layout, device, *, world_size: int = 1, moga_config=None, available: int | None = -1,
                    can_add_devices: bool = True, batch: int = 1, experts: int = 1) -> MemoryEstimate:
    """`preflight` for a loaded WanModel about to run on `device` (its weights move there as they are).
    Weights already on `device` count as free (the run reuses them). experts: models of this shape held
    on the device at once (a Wan2.2 A14B pair without offload: 2; `model` is one of them)."""
    import torch
    device = torch.device(device)
    weights = int(experts) * model_bytes(model)
    cfg = moga_config if moga_config is not None else getattr(model, "moga_config", None)
    moga = model.config.num_groups > 0 and not (cfg is not None and cfg.dense)
    on_device = next(iter(model.parameters())).device
    resident = weights if (on_device.type == device.type and
                           (on_device.index or 0) == (device.index or 0)) else 0
    return preflight(model.config, layout, device=device, dtype=model._compute_dtype(), weight_bytes=weights,
                     world_size=world_size, moga=moga, available=available, resident=resident,
                     can_add_devices=can_add_devices, chunk_tokens=getattr(model, "chunk_tokens", 16384),
                     batch=batch)


# ---- how long a model call takes, roughly: when a step deserves progress inside it --------------
CALL_SECONDS_FOR_BLOCK_PROGRESS = 2.0
FLOP_RATE = {"cuda": 3e14, "cpu": 5e10}   # sustained flop/s, rough (H100 bf16; a few CPU cores)


def model_call_flops(config, num_tokens: int, attention_density: float = 0.1) -> float:
    """Flops of one DiT call: the linear layers (self q k v o, cross q o, FFN) over N tokens, plus
    attention at `attention_density` of dense (MoGA keeps a small share of the N^2 pairs)."""
    get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
    dim, ffn, layers = int(get("dim")), int(get("ffn_dim")), int(get("num_layers"))
    n = float(num_tokens)
    linear = 2 * n * (6 * dim * dim + 2 * dim * ffn)
    attention = 4 * n * n * dim * attention_density
    return layers * (linear + attention)


def wants_block_progress(config, num_tokens: int, device_type: str, world_size: int = 1) -> bool:
    """True when a model call likely takes more than CALL_SECONDS_FOR_BLOCK_PROGRESS: then a step's
    progress is worth showing block by block (off for short runs, where it would only flicker)."""
    rate = FLOP_RATE.get(device_type, FLOP_RATE["cpu"]) * max(1, int(world_size))
    return model_call_flops(config, num_tokens) / rate > CALL_SECONDS_FOR_BLOCK_PROGRESS
