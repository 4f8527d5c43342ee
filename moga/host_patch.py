"""MoGA self-attention for a host's own Wan model (ComfyUI's MODEL patch), given tensors only.

The host runs its own block: its q/k/v/o projections, qk-norms and RoPE (so its weight casting, quantisation
and LoRA patches apply). It hands this module, per self-attention call, the projected q, k, v, the tensor that
fed the projections (the router's input, as in `moga.attention.MoGAAttention`) and the token grid; this module
routes, runs the three branches and fuses them (`moga.attention.moga_attention`). It knows no host: no ComfyUI
import, only tensors, a `TokenLayout` and a `MoGAConfig`.

    patch = HostPatch(routers, config, layers=None, dense_warmup=0.2, name="my_routers.safetensors")
    layout = patch.layout((frames, rows, cols), shot_frames=None)
    out = patch.attend(layer, q, k, v, heads, router_input, layout)   # [B, N, H*D] in, [B, N, H*D] out

The dense warm-up is a share of the sampler's sigma range, as a host's start_percent: the host maps it to a
sigma with its own model sampling and asks `dense_at`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .attention import MoGAConfig, TokenLayout
from .attention.mixture import moga_attention
from .attention.router import Router


class HostPatchError(ValueError):
    """A MoGA patch that cannot run on this model or input; the message names the problem and the fix."""


class HostPatch:
    """Routers per layer + the MoGA settings a patched host model runs with.

    routers: {layer: [M, dim] tensor}; every router has the same M and dim.
    config: the MoGAConfig of every patched layer (config.num_groups <= M merges router rows, as the library).
    layers: the layers that run MoGA (None: every layer with a router); the others stay the host's own.
    dense_warmup: share in [0, 1] of the sigma range, from the start, that runs the host's dense attention.
    name: where the routers came from (for messages).
    """

    def __init__(self, routers: Mapping[int, torch.Tensor], config: MoGAConfig,
                 layers: Sequence[int] | None = None, dense_warmup: float = 0.0, name: str = "routers"):
        if not routers:
            raise HostPatchError(f"{name} holds no routers: load a router file made for this model "
                                 "(`python -m moga patch SRC --routers-out FILE`)")
        weights = {int(i): torch.as_tensor(w).detach().float().cpu().contiguous() for i, w in routers.items()}
        shapes = {tuple(w.shape) for w in weights.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise HostPatchError(f"{name}: the routers have shapes {sorted(shapes)}; every router must be [M, dim] "
                                 "with one M and one dim (a router file from one model)")
        self.num_router_groups, self.dim = next(iter(shapes))
        if config.routed and config.num_groups > self.num_router_groups:
            raise HostPatchError(f"{name} has {self.num_router_groups} groups but {config.num_groups} were asked: "
                                 f"choose groups <= {self.num_router_groups} (0 = the routers' own), or calibrate "
                                 "new routers with that many groups")
        chosen = tuple(sorted(weights)) if layers is None else tuple(sorted({int(i) for i in layers}))
        missing = [i for i in chosen if i not in weights]
        if missing:
            raise HostPatchError(f"{name} has no router for layers {missing} (it has {_ranges(sorted(weights))}): "
                                 "pick routed layers among those")
        if not 0.0 <= float(dense_warmup) <= 1.0:
            raise HostPatchError(f"dense_warmup is a share of the sigma range in [0, 1], got {dense_warmup!r}")
        self.routers = weights
        self.config = config
        self.layers = frozenset(chosen)
        self.dense_warmup = float(dense_warmup)
        self.name = name
        self._device_routers: dict = {}

    # -- what the host asks before it calls -----------------------------------------------------------

    def check_model(self, dim: int, num_layers: int, model: str = "this model") -> None:
        """Raise when the routers cannot belong to a model of `dim` width and `num_layers` blocks."""
        if dim != self.dim:
            raise HostPatchError(f"{self.name} has routers of width {self.dim} but {model} has width {dim}: load "
                                 "routers made for this model")
        beyond = sorted(i for i in self.layers if i >= num_layers)
        if beyond:
            raise HostPatchError(f"{self.name} routes layers {beyond} but {model} has {num_layers} blocks: load "
                                 "routers made for this model or choose routed layers below that")

    def runs_layer(self, layer: int) -> bool:
        return layer in self.layers

    @staticmethod
    def dense_at(sigma: float, warmup_sigma: float) -> bool:
        """Dense while the sampler's sigma is above the warm-up's end (the host maps the share to a sigma)."""
        return float(sigma) > float(warmup_sigma)

    def layout(self, grid: Sequence[int], shot_frames: Sequence[int] | None = None) -> TokenLayout:
        frames, height, width = (int(g) for g in grid)
        return TokenLayout(frames, height, width, shot_frames=tuple(shot_frames or ()))

    # -- the call -------------------------------------------------------------------------------------

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               router_input: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """MoGA self-attention of one layer. q, k, v [B, N, H*D] (qk-normed, RoPE applied), router_input
        [B, N, dim] (what fed the projections). Returns [B, N, H*D] in q's dtype."""
        if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[-1] % heads:
            raise HostPatchError(f"self-attention q, k, v must be [batch, tokens, heads*head_dim] of one shape, got "
                                 f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} with {heads} heads")
        b, n, hd = q.shape
        if n != layout.num_tokens:
            raise HostPatchError(
                f"the self-attention sees {n} tokens but the latent's grid {layout} has {layout.num_tokens}: this "
                "input adds tokens MoGA cannot place (a reference latent, in-context latents, or extra frames); "
                "remove the MoGA patch for this workflow")
        if tuple(router_input.shape[:2]) != (b, n) or router_input.shape[-1] != self.dim:
            raise HostPatchError(f"the router input {tuple(router_input.shape)} does not match [batch {b}, tokens "
                                 f"{n}, width {self.dim}]: routers made for another model")
        shape = (b, n, heads, hd // heads)
        routing = None
        if self.config.routed:
            routing = self._router(layer, router_input.device)(router_input, num_groups=self.config.num_groups)
        out = moga_attention(q.view(shape), k.view(shape), v.view(shape), routing, layout, self.config)
        return out.reshape(b, n, hd)

    def _router(self, layer: int, device) -> Router:
        key = (layer, str(device))
        hit = self._device_routers.get(key)
        if hit is None:
            weight = self.routers[layer]
            with torch.inference_mode(False), torch.no_grad():  # a plain module, whatever mode the host runs in
                hit = Router(self.dim, self.num_router_groups, device=device, dtype=torch.float32)
                hit.requires_grad_(False).weight.copy_(weight.to(device))
            self._device_routers[key] = hit
        return hit

    def release(self) -> None:
        """Drop the routers' device copies (the host calls this when sampling ends)."""
        self._device_routers.clear()

    def describe(self) -> str:
        c = self.config
        branches = "+".join(n for n, on in (("routed", c.routed), ("window", c.windowed), ("frame", c.per_frame)) if on)
        cap = f", capacity {c.capacity:g}" if c.capacity else ""
        return (f"MoGA {c.num_groups}/{self.num_router_groups} groups ({branches}, fusion {c.fusion}{cap}) in "
                f"{len(self.layers)} layers, dense for the first {self.dense_warmup:.0%} of sigmas; routers: "
                f"{self.name}")


def _ranges(layers: Sequence[int]) -> str:
    out, start = [], None
    for j, i in enumerate(layers):
        if start is None:
            start = i
        if j + 1 == len(layers) or layers[j + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out) or "none"


__all__ = ["HostPatch", "HostPatchError"]


def patch_from_routers(routers, groups: int = 0, window: str = "", windowed: bool = True, per_frame: bool = True,
                       fusion: str = "", capacity: float = -1.0, dense_warmup: float = -1.0, layers=None,
                       backend: str = "auto") -> HostPatch:
    """A HostPatch from a `moga.checkpoint.router_file.RouterSet`, its metadata's settings changed where asked.

    groups 0, window "", fusion "", capacity -1, dense_warmup -1: the routers' own; windowed / per_frame switch the
    static branches; layers None: every layer with a router."""
    base = routers.config
    changes = dict(windowed=bool(windowed), per_frame=bool(per_frame), backend=backend)
    changes["num_groups"] = int(groups) if groups else base.num_groups
    if window and window.strip():
        changes["window"] = MoGAConfig.parse_window(window)
    if fusion:
        changes["fusion"] = fusion
    if float(capacity) != -1.0:
        if not float(capacity) >= 0.0:
            raise HostPatchError(f"capacity {capacity} is not a capacity: -1 (the routers'), 0 (off) or > 0")
        changes["capacity"] = float(capacity)
    warmup = routers.dense_warmup if float(dense_warmup) == -1.0 else float(dense_warmup)
    try:
        config = base.replace(**changes)
    except ValueError as e:
        raise HostPatchError(str(e)) from e
    return HostPatch(routers.weights, config, layers=layers, dense_warmup=warmup, name=routers.name)


__all__ += ["patch_from_routers"]
