"""The shape and kind of a Wan DiT (`WanConfig`), read from a checkpoint's tensor shapes."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping


WAN22_VAE_CHANNELS = 48  # TI2V-5B's latents: the Wan2.2 VAE's (the Wan2.1 VAE makes 16)


def vae_spatial_ratio(latent_channels: int) -> int:
    """Pixels per latent pixel, each way: 16 for the Wan2.2 VAE's 48-channel latents, 8 for the Wan2.1 VAE's."""
    return 16 if int(latent_channels) == WAN22_VAE_CHANNELS else 8


@dataclass(frozen=True)
class WanConfig:
    """Shape and kind of a Wan DiT (T2V, I2V, TI2V: `conditioning`). `from_state_dict` reads it from
    the tensors' shapes."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    num_groups: int = 0          # router rows M (0: no routers)
    moga_layers: tuple = ()      # indices of the layers that have a router
    cross_attn_norm: bool = True  # Wan T2V has `norm3` (affine LayerNorm) before the cross-attention
    image_dim: int = 0           # CLIP-vision feature width of `img_emb` (Wan2.1 I2V: 1280; 0: none)

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim",
                     "freq_dim", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WanConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if not isinstance(self.image_dim, int) or self.image_dim < 0:
            raise ValueError(f"WanConfig.image_dim must be an integer >= 0, got {self.image_dim!r}")
        if self.in_dim != self.out_dim and self.in_dim != 2 * self.out_dim + 4:
            raise ValueError(
                f"in_dim {self.in_dim} with out_dim {self.out_dim}: an image-to-video Wan takes the noise "
                f"plus 4 mask and {self.out_dim} image-latent channels ({2 * self.out_dim + 4}); other "
                f"extra inputs (control, camera, VACE models) are not supported")
        if self.image_dim and self.in_dim == self.out_dim:
            raise ValueError("a CLIP image branch (image_dim > 0) needs the concatenated image latent "
                             f"(in_dim {2 * self.out_dim + 4}), got in_dim {self.in_dim}")
        layers = tuple(sorted(int(i) for i in self.moga_layers))
        if any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"moga_layers {layers} must lie in 0..{self.num_layers - 1}")
        if layers and self.num_groups < 1:
            raise ValueError("moga_layers given but num_groups is 0")
        object.__setattr__(self, "moga_layers", layers)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex channels of the (frame, height, width) RoPE axes, as Wan splits head_dim / 2."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    @property
    def vae_spatial_ratio(self) -> int:
        """Pixels per latent pixel, each way, of the VAE this model samples for (`vae_spatial_ratio`)."""
        return vae_spatial_ratio(self.out_dim)

    @property
    def conditioning(self) -> str:
        """How an image enters: "none" (T2V), "concat" (Wan2.2 I2V A14B: mask + image latent channels),
        "clip+concat" (Wan2.1 I2V: also CLIP tokens), "replace" (TI2V-5B: the image latent replaces
        the first latent frame, at timestep 0; its 48-channel latents tell it apart)."""
        if self.image_dim:
            return "clip+concat"
        if self.in_dim != self.out_dim:
            return "concat"
        return "replace" if self.out_dim == WAN22_VAE_CHANNELS else "none"

    @property
    def name(self) -> str:
        key = (self.dim, self.num_layers, self.num_heads, self.ffn_dim, self.in_dim, bool(self.image_dim))
        known = {(1536, 30, 12, 8960, 16, False): "Wan2.1 T2V 1.3B",
                 (5120, 40, 40, 13824, 16, False): "Wan2.1 T2V 14B",
                 (5120, 40, 40, 13824, 36, True): "Wan2.1 I2V 14B",
                 (5120, 40, 40, 13824, 36, False): "Wan2.2 I2V A14B expert",
                 (3072, 30, 24, 14336, 48, False): "Wan2.2 TI2V 5B"}
        kind = {"none": "T2V", "concat": "I2V (concat)", "clip+concat": "I2V (CLIP)", "replace": "TI2V"}
        return known.get(key, f"Wan2.1-architecture {kind[self.conditioning]} (dim {self.dim}, "
                              f"{self.num_layers} layers)")

    def replace(self, **changes) -> "WanConfig":
        return replace(self, **changes)

    @classmethod
    def from_state_dict(cls, sd: Mapping, num_heads: int | None = None, **overrides) -> "WanConfig":
        """Infer the config from canonical (Wan-original) names -> tensors or shapes.

        Wan's head dim is 128 (1.3B: 12 heads, 14B: 40 heads); `num_heads` overrides that rule for
        models with another head dim (our tiny test models carry it as `moga.num_heads` metadata).
        """
        shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}

        def need(key):
            if key not in shape:
                raise ValueError(f"the state dict has no {key!r}: it is not a Wan2.1 DiT")
            return shape[key]

        pe = need("patch_embedding.weight")          # [dim, in_dim, pt, ph, pw]
        if len(pe) != 5:
            raise ValueError(f"patch_embedding.weight has shape {pe}; Wan's is [dim, in_dim, 1, 2, 2]")
        dim, in_dim, patch = pe[0], pe[1], pe[2:]
        head = need("head.head.weight")
        out_dim = head[0] // math.prod(patch)
        layers = sorted({int(k.split(".")[1]) for k in shape if k.startswith("blocks.")})
        if not layers or layers != list(range(len(layers))):
            raise ValueError(f"blocks are not numbered 0..n-1 (found {layers[:8]}...)")
        if num_heads is None:
            if dim % 128:
                raise ValueError(
                    f"dim {dim} is not a multiple of Wan's head dim 128: the head count cannot be "
                    f"inferred; pass num_heads (or store `moga.num_heads` in the file's metadata)")
            num_heads = dim // 128
        routers = {i: shape[f"blocks.{i}.self_attn.router.weight"] for i in layers
                   if f"blocks.{i}.self_attn.router.weight" in shape}
        rows = {r[0] for r in routers.values()}
        if len(rows) > 1:
            raise ValueError(f"the routers disagree on the group count: {sorted(rows)} rows "
                             f"in layers {sorted(routers)}; every router needs the same M")
        for i, r in routers.items():
            if len(r) != 2 or r[1] != dim:
                raise ValueError(f"router of layer {i} has shape {r}, the model needs [M, {dim}]")
        if "img_emb.emb_pos" in shape:
            raise ValueError("the file has img_emb.emb_pos: a first-last-frame (FLF2V) model, which is "
                             "not supported; use Wan2.1 I2V 14B or Wan2.2 I2V A14B")
        image_dim = need("img_emb.proj.1.weight")[1] if "img_emb.proj.0.weight" in shape else 0
        if image_dim and "blocks.0.cross_attn.k_img.weight" not in shape:
            raise ValueError("the file has img_emb but no blocks.N.cross_attn.k_img: an incomplete "
                             "Wan2.1 I2V checkpoint; use the whole file")
        cfg = dict(
            dim=dim, ffn_dim=need("blocks.0.ffn.0.weight")[0], num_heads=int(num_heads),
            num_layers=len(layers), in_dim=in_dim, out_dim=out_dim,
            text_dim=need("text_embedding.0.weight")[1], freq_dim=need("time_embedding.0.weight")[1],
            patch_size=patch, num_groups=rows.pop() if rows else 0, moga_layers=tuple(sorted(routers)),
            cross_attn_norm="blocks.0.norm3.weight" in shape, image_dim=image_dim)
        cfg.update(overrides)
        return cls(**cfg)


__all__ = ["WanConfig"]
