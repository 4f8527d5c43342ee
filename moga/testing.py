"""Test helpers: tiny random Wan2.1 checkpoints in every accepted key layout, random inputs, and a
threaded in-process sequence-parallel exchange, so that tests and examples run on a CPU in seconds.

    path = write_tiny_checkpoint(tmp / "tiny.safetensors", layout="comfyui", num_groups=4)
    model = moga.checkpoint.load_model(path)
    x, t, context = random_inputs(model.config, frames=3, height=8, width=8)
"""
from __future__ import annotations

import math
import threading
import zlib
from pathlib import Path

import torch
from torch import nn

from .model import WanConfig, WanModel


def tiny_config(num_layers: int = 2, dim: int = 64, num_heads: int = 4, ffn_dim: int = 128,
                text_dim: int = 32, freq_dim: int = 32, in_dim: int = 16, out_dim: int = 16,
                num_groups: int = 0, moga_layers=None, image_dim: int = 0) -> WanConfig:
    """A Wan-shaped config small enough for CPU tests (head dim 16). Image-to-video kinds:
    in_dim = 2 * out_dim + 4 (Wan2.2 I2V), plus image_dim (CLIP width; Wan2.1 I2V: 1280, which core
    ComfyUI hard-codes); out_dim = in_dim = 48 is the TI2V-5B kind."""
    if moga_layers is None:
        moga_layers = tuple(range(num_layers)) if num_groups else ()
    return WanConfig(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers,
                     in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                     num_groups=num_groups, moga_layers=tuple(moga_layers), image_dim=image_dim)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values of sensible scale (never zeros): linear and
    conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1), Wan's
    modulation ~ N(0, 1/dim). Each tensor's stream is seeded by (seed, its name), so adding
    routers leaves every other weight as it was. Works on any device (the generator lives there)."""
    for name, p in model.named_parameters():
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        work = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        work.normal_(generator=g)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "modulation":
            work /= math.sqrt(p.shape[-1])
        elif leaf == "bias":
            work *= 0.1
        elif ".norm" in name or name.startswith("norm"):
            work = 1 + 0.1 * work
        elif p.dim() >= 2:
            work /= math.sqrt(math.prod(p.shape[1:]))
        p.copy_(work.to(p.dtype))
    return model


def tiny_model(seed: int = 0, **config) -> WanModel:
    """A random tiny WanModel (float32, CPU) in eval mode."""
    return init_random_(WanModel(tiny_config(**config)), seed).eval().requires_grad_(False)


def random_inputs(config: WanConfig, frames: int = 3, height: int = 8, width: int = 8,
                  batch: int = 1, text_tokens: int = 7, shots: int = 1, seed: int = 0,
                  t: float = 637.0, dtype=torch.float32):
    """(x [B, in_dim, frames, height, width], t [B], context) with seeded N(0, 1) values. `height`
    and `width` are latent pixels (tokens = /2). With shots > 1 the context is a list of per-shot
    embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_dim, frames, height, width, generator=g).to(dtype)
    tt = torch.full((batch,), float(t))
    ctx = [torch.randn(batch, text_tokens + s, config.text_dim, generator=g).to(dtype)
           for s in range(shots)]
    return x, tt, (ctx[0] if shots == 1 else ctx)


def write_tiny_checkpoint(path, layout: str = "wan", num_groups: int = 0, seed: int = 0,
                          dtype=torch.float32, fp8: str | None = None, moga_layers=None,
                          window="0,2,2", fusion: str = "mean", metadata: dict | None = None,
                          **config) -> Path:
    """Write a tiny random Wan2.1 T2V checkpoint (safetensors) and return its path.

    layout: "wan" (original `blocks.N...` names), "comfyui" (`model.diffusion_model.` prefix) or
    "diffusers" (`WanTransformer3DModel` names). num_groups > 0 adds MoGA routers (all layers,
    or `moga_layers`) and the MoGA metadata. fp8: None, "fp8" (e4m3fn block linear weights) or
    "scaled" (ComfyUI scaled fp8: weights / scale, `scale_weight` tensors, `scaled_fp8` marker).
    `config` goes to `tiny_config` (num_layers, dim, num_heads...).
    """
    from .checkpoint import moga_metadata, save_checkpoint, to_layout

    cfg = tiny_config(num_groups=num_groups, moga_layers=moga_layers, **config)
    model = init_random_(WanModel(cfg), seed)
    sd = {k: v.detach().to(dtype) if v.is_floating_point() else v
          for k, v in model.dit_state_dict().items()}
    if num_groups:  # routers stay float32, as `moga patch` writes them
        for k in list(sd):
            if k.endswith("self_attn.router.weight"):
                sd[k] = model.state_dict()[k].float()
    if fp8:
        sd = _to_fp8(sd, scaled=(fp8 == "scaled"))
    meta = {"moga.num_heads": str(cfg.num_heads)}
    if num_groups:
        from .attention import MoGAConfig
        meta.update(moga_metadata(MoGAConfig(num_groups=num_groups, window=MoGAConfig.parse_window(window),
                                             fusion=fusion), cfg.moga_layers))
    meta.update(metadata or {})
    path = Path(path)
    save_checkpoint(to_layout(sd, layout), path, meta)
    return path


def _to_fp8(sd: dict, scaled: bool) -> dict:
    out = {}
    for k, v in sd.items():
        fp8_here = k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2 and "router" not in k
        if not fp8_here:
            out[k] = v
            continue
        if scaled:
            scale = (v.float().abs().max() / 448.0).clamp(min=1e-12).reshape(())
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.float()
        else:
            out[k] = v.to(torch.float8_e4m3fn)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


class ThreadExchange:
    """An in-process sequence-parallel exchange for P ranks run as P threads (tests only).

    Implements the protocol of moga/attention/layer.py (all_gather_tokens, seq_to_heads,
    heads_to_seq) with a shared slot table and a barrier; every wait has a timeout, so a rank
    that diverges fails the test instead of hanging it. Use `ThreadExchange.run(P, fn)`: calls
    fn(exchange) on every rank and returns the P results.
    """

    def __init__(self, rank: int, world_size: int, shared: dict, barrier: threading.Barrier):
        self.rank, self.world_size = rank, world_size
        self._shared, self._barrier = shared, barrier

    def _all(self, t: torch.Tensor) -> list[torch.Tensor]:
        self._barrier.wait()
        self._shared[self.rank] = t
        self._barrier.wait()
        out = [self._shared[r] for r in range(self.world_size)]
        self._barrier.wait()
        return out

    def all_gather_tokens(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return torch.cat(self._all(t), dim=1)[:, :num_tokens]

    def seq_to_heads(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        heads = t.shape[2]
        if heads % self.world_size:
            raise ValueError(f"{heads} heads do not split over {self.world_size} ranks")
        hp = heads // self.world_size
        full = torch.cat(self._all(t), dim=1)[:, :num_tokens]
        return full[:, :, self.rank * hp:(self.rank + 1) * hp].contiguous()

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._all(t)                     # every rank's heads over the full sequence
        full = torch.cat(parts, dim=2)           # [B, N, H, D]
        n = full.shape[1]
        n_local = -(-n // self.world_size)
        start = min(self.rank * n_local, n)
        part = full[:, start:start + n_local]
        pad = n_local - part.shape[1]
        if pad:
            part = torch.cat([part, part.new_zeros(part.shape[0], pad, *part.shape[2:])], dim=1)
        return part

    @classmethod
    def run(cls, world_size: int, fn, timeout: float = 60.0) -> list:
        barrier = threading.Barrier(world_size, timeout=timeout)
        shared: dict = {}
        results: list = [None] * world_size
        errors: list = []

        def work(rank):
            try:
                with torch.inference_mode():
                    results[rank] = fn(cls(rank, world_size, shared, barrier))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(world_size)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout)
        if errors:
            raise errors[0]
        if any(th.is_alive() for th in threads):
            raise TimeoutError(f"a simulated rank did not finish within {timeout} s")
        return results
