"""The Wan DiT (Wan2.1 T2V / I2V, Wan2.2 A14B experts, TI2V-5B), with MoGA self-attention in every
layer that has a router.

The equations follow Wan2.1 (`wan/modules/model.py`) and its ComfyUI port; parameter names are Wan's
original ones, so a checkpoint maps onto this module by name (see `moga.checkpoint` for the other
key layouts). What is ours:

- Self-attention is `moga.attention.MoGAAttention`: dense without a router, MoGA with one.
- Multi-shot: every video token attends, in the cross-attention, only to the text of its own shot.
  The cross-attention runs once per shot over that shot's token range (no mask).
- Positions: the temporal RoPE index is the global latent-frame index, running on across shot
  cuts (frame 0 .. F-1 of the whole video); height/width indices restart in every frame as in Wan.
- Long sequences: nothing N x N is ever built; the FFN and the cross-attention run over chunks of
  `chunk_tokens` tokens, so activation memory grows linearly with N and never with N x ffn_dim.
- Precision as the original: timestep embedding, modulation, the residual stream, the norms and the
  head run in float32; the linear layers of attention, FFN and text embedding run in the compute
  dtype (the weights' dtype; bfloat16 for fp8 weights, which are upcast layer by layer, with their
  `scale_weight` for ComfyUI's "scaled fp8" files, unless `moga.fp8.enable_fp8` puts them on fp8
  tensor cores). On CUDA at inference the elementwise parts run fused (`moga.fused`).
- Sequence parallel (`parallel=`): see `WanModel.forward`.
- Image conditioning, as Wan and core ComfyUI define it (`WanConfig.conditioning`):
  "clip+concat" (Wan2.1 I2V 14B: the noise is concatenated with 4 mask + 16 image-latent channels,
  in_dim 36, and the CLIP-vision features [257, 1280] go through `img_emb` into a second key/value
  set of the cross-attention whose output is added to the text's), "concat" (Wan2.2 I2V A14B: the
  concatenation only), "replace" (Wan2.2 TI2V-5B, 48 channels: the image latent replaces latent
  frames and those frames get timestep 0: `t` may be per latent frame, [B, F]). Per shot: every
  shot may bring its own CLIP tokens (`clip=` a list); `moga.conditioning` builds y and the masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import fused, fused_block
from .attention import MoGAAttention, MoGAConfig, RMSNorm, TokenLayout
from .attention.layer import norm_rope
from .wan_config import WanConfig

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------------------------
# equations (plain functions: the tests check them against hand-written formulas)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [cos | sin], computed in float64 as the original, returned float32."""
    half = dim // 2
    pos = t.reshape(-1).to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


def rope_axis(positions: torch.Tensor, channels: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """One RoPE axis: complex128 [P, channels], exp(i * p * theta^(-2j / (2 * channels)))."""
    dim = 2 * channels
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angle = torch.outer(positions.to(torch.float64), inv)
    return torch.polar(torch.ones_like(angle), angle)


def rope_freqs(layout: TokenLayout, head_dim: int, device=None, dtype=torch.complex64,
               frame_offset: int = 0) -> torch.Tensor:
    """3D RoPE of every token in `layout`: complex [N, head_dim / 2], frame-major token order.

    Channels are split (frames, height, width) as Wan does; the frame index is the global latent
    frame (it runs on across shots), plus `frame_offset`.
    """
    c = head_dim // 2
    split = (c - 2 * (c // 3), c // 3, c // 3)
    f, h, w = layout.frames, layout.height, layout.width
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    ft = rope_axis(ar(f) + frame_offset, split[0])
    fh = rope_axis(ar(h), split[1])
    fw = rope_axis(ar(w), split[2])
    out = torch.cat([ft[:, None, None].expand(f, h, w, -1),
                     fh[None, :, None].expand(f, h, w, -1),
                     fw[None, None, :].expand(f, h, w, -1)], dim=-1)
    return out.reshape(f * h * w, c).to(dtype)


modulate = fused.modulate  # LayerNorm without affine (float32), then x * (1 + scale) + shift


def shard_range(num_tokens: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, end, n_local) of `rank`'s token shard: ceil(N / P) tokens each; the tail shard ends
    early (end - start < n_local) and is zero-padded to n_local."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    n_local = -(-num_tokens // world_size)
    start = min(rank * n_local, num_tokens)
    return start, min(start + n_local, num_tokens), n_local


def shard_tokens(t: torch.Tensor, start: int, end: int, n_local: int, dim: int = 1,
                 fill: float | complex = 0) -> torch.Tensor:
    """Rows [start, end) of `t` along `dim`, padded with `fill` to n_local rows."""
    part = t.narrow(dim, start, end - start)
    pad = n_local - (end - start)
    if pad == 0:
        return part
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([part, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def local_shot_ranges(layout: TokenLayout, start: int, end: int) -> list[tuple[int, int, int]]:
    """(shot, a, b) for every shot that meets the global token range [start, end); a, b local."""
    out = []
    for s, (a, b) in enumerate(layout.shot_token_ranges):
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            out.append((s, lo - start, hi - start))
    return out


# ----------------------------------------------------------------------------------------------
# modules


class WanLinear(nn.Linear):
    """nn.Linear that computes in the input's dtype: weights stored in another dtype (fp8, or
    float32 routers...) are cast per call; `scale_weight` (ComfyUI scaled fp8) multiplies them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        scale = self._buffers.get("scale_weight")
        if scale is not None:
            w = w * scale.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


def _use_wan_linear(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = WanLinear


class WanCrossAttention(nn.Module):
    """Cross-attention (Wan's names q k v o norm_q norm_k); the caller picks the shot's text. With
    `image=True` (Wan2.1 I2V) a second key/value set (k_img v_img norm_k_img) reads the shot's CLIP
    tokens and the two attentions' outputs are summed before `o`, as Wan does."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, image: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def kv(self, context: torch.Tensor, image: torch.Tensor | None = None) -> tuple:
        """(k, v) of the text, plus (k_img, v_img) of the CLIP tokens when this layer has them."""
        out = (self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))
        if hasattr(self, "k_img"):
            if image is None:
                raise ValueError("this is a Wan2.1 I2V model: it needs CLIP-vision image tokens "
                                 "(clip=); encode the start image with the CLIP vision model")
            out += (self._heads(self.norm_k_img(self.k_img(image))), self._heads(self.v_img(image)))
        return out

    def forward(self, x: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self._heads(norm_rope(self.norm_q, self.q(x), None, self.num_heads))
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        if len(kv) == 4:
            out = out + F.scaled_dot_product_attention(q, kv[2], kv[3])
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _pieces(segments, lo: int, hi: int):
    """(a, b, s): the parts of the token range [lo, hi) that lie in each timestep segment s."""
    for a, b, s in segments:
        a, b = max(a, lo), min(b, hi)
        if a < b:
            yield a, b, s


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, num_groups: int = 0):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = MoGAAttention(cfg.dim, cfg.num_heads, num_groups=num_groups, eps=cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(cfg.dim, cfg.num_heads, cfg.eps, image=bool(cfg.image_dim))
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim))

    def _norm3(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """norm3 (float32), cast to the compute dtype in the same pass (moga.fused)."""
        if self.norm3 is None:
            return x.to(dtype)
        return fused.layer_norm_cast(x, self.norm3.weight, self.norm3.bias, self.eps, dtype)

    def forward(self, x, e, rope, context_kv, layout, cfg, shot_ranges, chunk, cdtype, parallel=None,
                segments=None, carry=None):
        """x [B, n, dim] float32 residual; e [B, S, 6, dim] float32, one row per timestep segment
        (segments: (a, b, s) local token ranges; None: one segment, e may be [B, 6, dim]);
        context_kv: per shot (k, v[, k_img, v_img]). With gradients off (inference) x is updated in
        place, chunk by chunk: no full-size temporaries. carry: a `moga.fused_block.Carry` (the fused
        inference path, one segment, hands the next block its input through it)."""
        if e.dim() == 3:
            e = e[:, None]
        if segments is None:
            segments = [(0, x.shape[1], 0)]
        if len(segments) == 1 and e.shape[1] == 1 and fused_block.applies(x):
            mods = (self.modulation.float() + e[:, 0]).chunk(6, dim=1)     # six [B, 1, dim]
            attend = lambda inp: self.self_attn(inp, layout, rope=rope, config=cfg, parallel=parallel)  # noqa: E731
            return fused_block.forward(self, x, mods, attend, context_kv, shot_ranges, chunk, cdtype, carry)
        if carry is not None:
            carry.take()      # an input made for this block by the previous one: made again below
        mod = (self.modulation.float()[:, None] + e).unbind(2)   # six [B, S, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.unsqueeze(2) for m in mod)  # [B, S, 1, dim]
        inplace = not torch.is_grad_enabled()
        n = x.shape[1]
        parts = [fused.modulate_cast(x[:, a:b], shift1[:, s], scale1[:, s], self.eps, cdtype)
                 for a, b, s in _pieces(segments, 0, n)]
        y = self.self_attn(parts[0] if len(parts) == 1 else torch.cat(parts, 1), layout, rope=rope,
                           config=cfg, parallel=parallel)
        del parts
        if inplace:
            for a, b, s in _pieces(segments, 0, n):
                x[:, a:b].addcmul_(y[:, a:b], gate1[:, s])
        else:
            x = torch.cat([torch.addcmul(x[:, a:b], y[:, a:b].float(), gate1[:, s])
                           for a, b, s in _pieces(segments, 0, n)], 1)
        del y

        # cross-attention: each shot's tokens attend to that shot's text only; tokens outside every
        # shot (sequence-parallel padding) get nothing. Chunks only read and write their own rows.
        cross = None if inplace else x.new_zeros(x.shape)
        for s, a, b in shot_ranges:
            kv = context_kv[s]
            for lo in range(a, b, chunk):
                hi = min(lo + chunk, b)
                out = self.cross_attn(self._norm3(x[:, lo:hi], cdtype), *kv)
                if inplace:
                    x[:, lo:hi] += out
                else:
                    cross[:, lo:hi] = out.float()
        if not inplace:
            x = x + cross
            del cross

        # FFN, chunked over tokens: the [n, ffn_dim] activation exists one chunk at a time
        y = None if inplace else x.new_empty(x.shape)
        for lo in range(0, n, chunk):
            for a, b, s in _pieces(segments, lo, min(lo + chunk, n)):
                out = self.ffn(fused.modulate_cast(x[:, a:b], shift2[:, s], scale2[:, s], self.eps, cdtype))
                if inplace:
                    x[:, a:b].addcmul_(out, gate2[:, s])
                else:
                    y[:, a:b] = out.float() * gate2[:, s]
        return x if inplace else x + y


class ImageProjection(nn.Module):
    """Wan2.1 I2V's `img_emb`: CLIP-vision penultimate features [B, 257, 1280] -> [B, 257, dim]
    (LayerNorm, Linear, exact GELU, Linear, LayerNorm; Wan's names proj.0 .. proj.4)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, dim), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n0, l1, _, l2, n4 = self.proj
        ln = lambda m, v: F.layer_norm(v, (v.shape[-1],), m.weight.to(v.dtype), m.bias.to(v.dtype), m.eps)  # noqa: E731
        return ln(n4, l2(F.gelu(l1(ln(n0, x)))))


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, segments=None) -> torch.Tensor:
        """e [B, dim] or [B, S, dim] (one row per timestep segment of `segments`)."""
        if e.dim() == 2:
            e = e[:, None]
        if segments is None:
            segments = [(0, x.shape[1], 0)]
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # [B, S, dim]
        w, bias = _dequant(self.head), self.head.bias.float()
        parts = [F.linear(modulate(x[:, a:b], shift[:, s:s + 1], scale[:, s:s + 1], self.eps), w, bias)
                 for a, b, s in _pieces(segments, 0, x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _per_shot(given, num_shots: int, what: str, embed) -> list:
    """One tensor for every shot, or a list of one per shot; each distinct tensor embedded once (shots that share
    a prompt or an image share its embedding)."""
    items = [given] * num_shots if isinstance(given, torch.Tensor) else list(given)
    if len(items) != num_shots:
        raise ValueError(f"{len(items)} {what} for {num_shots} shots: pass one per shot (or one tensor for all)")
    done: dict[int, torch.Tensor] = {}
    for c in items:
        if id(c) not in done:
            done[id(c)] = embed(c)
    return [done[id(c)] for c in items]


class WanModel(nn.Module):
    """Wan DiT. `model(x, t, context, shot_frames=None, moga=None, dense_layers=(), parallel=None,
    y=None, clip=None)`; see `forward`."""

    chunk_tokens = 16384  # FFN / cross-attention chunk (tokens); memory: chunk x ffn_dim

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        routed = set(cfg.moga_layers)
        self.blocks = nn.ModuleList(
            WanBlock(cfg, cfg.num_groups if i in routed else 0) for i in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self.img_emb = ImageProjection(cfg.image_dim, cfg.dim) if cfg.image_dim else None
        _use_wan_linear(self)
        # MoGA settings used when a call passes none (the checkpoint loader sets them from metadata)
        self.moga_config = MoGAConfig(num_groups=max(cfg.num_groups, 1))
        self.dense_warmup = 0.0
        self.compute_dtype: torch.dtype | None = None  # None: the dtype of the linear weights
        # A model that brings its own text encoder / VAE (the demo model) sets these (moga.checkpoint)
        self.text_encoder = None
        self.vae = None
        self.gradient_checkpointing = False
        self._rope_cache: dict = {}

    # -- helpers -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].ffn[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].ffn[0].weight.device

    def _compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        d = self.dtype
        return torch.bfloat16 if d in FP8_DTYPES else d

    def dit_state_dict(self) -> dict[str, torch.Tensor]:
        """The DiT's tensors under Wan's names (without text_encoder/vae extras), with the
        `scale_weight` of scaled-fp8 layers."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("text_encoder.", "vae."))}

    def rope(self, layout: TokenLayout, device) -> torch.Tensor:
        key = (layout.frames, layout.height, layout.width, str(device))
        hit = self._rope_cache.get(key)
        if hit is None:
            hit = rope_freqs(layout, self.config.head_dim, device=device)
            self._rope_cache.clear()
            self._rope_cache[key] = hit
        return hit

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> e [B, dim] and e0 [B, 6, dim]; t [B, S] -> [B, S, dim], [B, S, 6, dim]. float32 as Wan."""
        sin = sinusoidal_embedding(self.config.freq_dim, t)
        lin = lambda m, x: F.linear(x, _dequant(m), m.bias.float())  # noqa: E731
        e = lin(self.time_embedding[2], F.silu(lin(self.time_embedding[0], sin)))
        e0 = lin(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        if t.dim() == 2:
            return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)
        return e, e0

    def time_segments(self, t: torch.Tensor, batch: int, grid) -> tuple[torch.Tensor, list]:
        """t [B] (or a scalar) or [B, F] per latent frame -> (rows [B, S], segments): runs of
        consecutive frames with the same timesteps become one segment (a, b, s) of global tokens,
        so a per-frame timestep (TI2V's t = 0 on the image frame) costs S rows, never N."""
        frames, per_frame = grid[0], grid[1] * grid[2]
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        if t.dim() <= 1:
            t = t.reshape(-1)
            if t.numel() == 1:
                t = t.expand(batch)
            if t.numel() != batch:
                raise ValueError(f"t has {t.numel()} timesteps for a batch of {batch}")
            return t[:, None], [(0, frames * per_frame, 0)]
        if t.dim() != 2 or t.shape[1] != frames or t.shape[0] not in (1, batch):
            raise ValueError(f"a per-frame t must be [B, {frames}] (one timestep per latent frame), "
                             f"got {tuple(t.shape)}")
        t = t.expand(batch, -1)
        starts = [0] + [f for f in range(1, frames) if not torch.equal(t[:, f], t[:, f - 1])]
        ends = starts[1:] + [frames]
        segments = [(a * per_frame, b * per_frame, s) for s, (a, b) in enumerate(zip(starts, ends))]
        return t[:, starts], segments

    def embed_images(self, clip, batch: int, num_shots: int, cdtype) -> list:
        """Per shot: the CLIP tokens through `img_emb` [B, 257, dim] (None for a model without it)."""
        if self.img_emb is None:
            return [None] * num_shots
        if clip is None:
            raise ValueError("this is a Wan2.1 I2V model: pass clip= (CLIP-vision penultimate features "
                             "[1, 257, 1280] of the start image; one tensor, or a list with one per shot)")
        return _per_shot(clip, num_shots, "CLIP image embeddings", lambda c: self._embed_image(c, batch, cdtype))

    def _embed_image(self, c: torch.Tensor, batch: int, cdtype) -> torch.Tensor:
        if c.dim() == 2:
            c = c[None]
        if c.dim() != 3 or c.shape[-1] != self.config.image_dim or c.shape[0] not in (1, batch):
            raise ValueError(f"a CLIP image embedding must be [1|{batch}, tokens, "
                             f"{self.config.image_dim}], got {tuple(c.shape)}")
        return self.img_emb(c.to(self.device, cdtype)).expand(batch, -1, -1)

    def embed_text(self, context, batch: int, num_shots: int, cdtype) -> list[torch.Tensor]:
        """Per shot: the text tokens [B, max(L, text_len), dim] after Wan's text MLP (zero-padded to
        text_len first, as Wan does)."""
        return _per_shot(context, num_shots, "text embeddings", lambda c: self._embed_one(c, batch, cdtype))

    def _embed_one(self, c: torch.Tensor, batch: int, cdtype) -> torch.Tensor:
        if c.dim() == 2:
            c = c[None]
        if c.dim() != 3 or c.shape[-1] != self.config.text_dim:
            raise ValueError(f"a text embedding must be [B, L, {self.config.text_dim}], got "
                             f"{tuple(c.shape)}: use the text encoder this model was trained with")
        if c.shape[0] not in (1, batch):
            raise ValueError(f"text embedding batch {c.shape[0]} does not match the latent batch {batch}")
        pad = self.config.text_len - c.shape[1]
        if pad > 0:
            c = torch.cat([c, c.new_zeros(c.shape[0], pad, c.shape[2])], dim=1)
        c = self.text_embedding(c.to(device=self.device, dtype=cdtype))
        return c.expand(batch, -1, -1)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, context, shot_frames=None,
                moga: MoGAConfig | None = None, dense_layers=(), parallel=None, y=None,
                clip=None, on_block=None) -> torch.Tensor:
        """x [B, C, F, H, W] latent: C = in_dim, or out_dim with `y` [B|1, in_dim - out_dim, F, H, W]
        (image-to-video: mask + image-latent channels, concatenated after x as Wan does); t [B]
        (or scalar) timestep in [0, 1000], or [B, F] one per latent frame (TI2V); context: one text
        embedding [B|1, L, text_dim] for every shot, or a list with one per shot; clip (Wan2.1 I2V):
        CLIP-vision features [1, 257, 1280], or a list with one per shot; shot_frames: latent frames
        per shot (None: one shot). moga: MoGAConfig for this call (default `self.moga_config`);
        layers with a router run MoGA with it, the others dense; dense_layers: layer indices that
        run dense this call. Returns [B, out_dim, F, H, W] in x's dtype.

        parallel: a sequence-parallel exchange (rank, world_size, all_gather_tokens, seq_to_heads,
        heads_to_seq; see moga/attention/layer.py). Every rank passes the full x and gets the full
        output; the blocks run on this rank's ceil(N / P) tokens (zero-padded at the end).

        on_block(done, num_blocks): called after every block (progress of long calls; no sync).
        """
        cfg = self.config
        x = self._with_condition(x, y)
        b, _, f0, h0, w0 = x.shape
        pt, ph, pw = cfg.patch_size
        pad = [0, (-w0) % pw, 0, (-h0) % ph, 0, (-f0) % pt]
        xin = F.pad(x, pad, mode="circular") if any(pad) else x  # as ComfyUI pads
        cdtype = self._compute_dtype()
        dev = self.device
        tokens = F.conv3d(xin.to(dev, torch.float32), _dequant(self.patch_embedding),
                          self.patch_embedding.bias.float(), stride=cfg.patch_size)
        del xin
        grid = tuple(tokens.shape[2:])
        layout = TokenLayout(*grid, shot_frames=self._token_shots(shot_frames, grid[0]))
        h = tokens.flatten(2).transpose(1, 2).contiguous()   # [B, N, dim] float32
        del tokens
        n = layout.num_tokens

        rows, segments = self.time_segments(t, b, grid)
        e, e0 = self.time_embed(rows)            # [B, S, dim], [B, S, 6, dim]
        texts = self.embed_text(context, b, layout.num_shots, cdtype)
        images = self.embed_images(clip, b, layout.num_shots, cdtype)
        rope = self.rope(layout, dev)
        start, end = 0, n
        if parallel is not None:
            start, end, n_local = shard_range(n, parallel.rank, parallel.world_size)
            h = shard_tokens(h, start, end, n_local).contiguous()
            rope = shard_tokens(rope, start, end, n_local, dim=0, fill=1)
            # local segments; the zero padding after the last token rides with the last segment
            local = [(a - start, b_ - start, s) for a, b_, s in _pieces(segments, start, end)]
            segments = local[:-1] + [(local[-1][0], n_local, local[-1][2])] if local else [(0, n_local, 0)]
        shots = local_shot_ranges(layout, start, end)

        mcfg = moga or self.moga_config
        dense_cfg = mcfg.replace(dense=True)
        dense_layers = set(int(i) for i in dense_layers)
        chunk = int(self.chunk_tokens)
        carry = fused_block.Carry()
        for i, block in enumerate(self.blocks):
            kv_cache: dict[tuple, tuple] = {}
            context_kv = []
            for c, im in zip(texts, images):
                key = (id(c), id(im))
                if key not in kv_cache:
                    kv_cache[key] = block.cross_attn.kv(c) if im is None else block.cross_attn.kv(c, im)
                context_kv.append(kv_cache[key])
            args = (e0, rope, context_kv, layout, dense_cfg if i in dense_layers else mcfg, shots,
                    chunk, cdtype, parallel, segments)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, *args, use_reentrant=False)
            else:
                h = block(h, *args, carry=carry.prepare(self.blocks, i, e0))
            if on_block is not None:
                on_block(i + 1, len(self.blocks))

        out = self.head(h, e, segments)           # [B, n, out_dim * prod(patch)] float32
        if parallel is not None:
            out = parallel.all_gather_tokens(out, n)
        return self.unpatchify(out, grid)[:, :, :f0, :h0, :w0].to(x.dtype)

    def _with_condition(self, x: torch.Tensor, y) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got {tuple(x.shape)}")
        if y is None:
            if x.shape[1] != cfg.in_dim:
                extra = (" (an image-to-video model: pass y, the mask + image latent, see "
                         "moga.conditioning.image_condition)" if x.shape[1] == cfg.out_dim else "")
                raise ValueError(f"x must be [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}{extra}")
            return x
        if cfg.in_dim == cfg.out_dim:
            raise ValueError(f"y (a concatenated image condition) was given but {cfg.name} takes none "
                             f"(its conditioning is {cfg.conditioning!r})")
        if (x.shape[1] != cfg.out_dim or y.dim() != 5 or y.shape[1] != cfg.in_dim - cfg.out_dim
                or y.shape[2:] != x.shape[2:] or y.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"x [B, {cfg.out_dim}, F, H, W] and y [B|1, {cfg.in_dim - cfg.out_dim}, F, H, W] "
                             f"of the same F, H, W expected, got {tuple(x.shape)} and {tuple(y.shape)}")
        return torch.cat([x, y.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)], dim=1)

    def _token_shots(self, shot_frames, frames: int) -> tuple:
        if shot_frames is None:
            return ()
        shots = tuple(int(s) for s in shot_frames)
        pt = self.config.patch_size[0]
        if pt != 1:
            if any(s % pt for s in shots):
                raise ValueError(f"shot lengths {shots} must be multiples of the temporal patch {pt}")
            shots = tuple(s // pt for s in shots)
        if sum(shots) != frames:
            raise ValueError(f"shot_frames {tuple(shot_frames)} add up to {sum(shots)} latent frames "
                             f"but the latent has {frames}: make them sum to the latent's frames")
        return shots

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        c, (pt, ph, pw) = self.config.out_dim, self.config.patch_size
        b = x.shape[0]
        u = x[:, :math.prod(grid)].reshape(b, *grid, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)


def _dequant(m: nn.Module) -> torch.Tensor:
    """A layer's weight in float32 (fp8 upcast, times `scale_weight` when it has one)."""
    w = m.weight.float()
    scale = m._buffers.get("scale_weight")
    return w * scale.float() if scale is not None else w


__all__ = ["WanConfig", "WanModel", "WanBlock", "WanHead", "WanCrossAttention", "WanLinear", "ImageProjection",
           "sinusoidal_embedding", "rope_axis", "rope_freqs", "modulate", "shard_range",
           "shard_tokens", "local_shot_ranges"]
