"""The demo model's latent codecs, both with the Wan VAE's mapping so `moga.shots` and the samplers
serve them as they serve Wan: a clip of 4n+1 frames becomes n+1 latent frames (frame 0 alone, then
groups of 4), 8x8 pixels one latent pixel, 16 channels. Each latent frame is coded on its own: its 4
frames (frame 0 repeated 4 times) are stacked as 12 channels and 8x8 pixel blocks unshuffled into 768
channels per latent pixel. No temporal mixing: a shot is coded alone and a cut stays a clean cut.

- `PatchCodec` ("pca"): those 768 values projected linearly on their top 16 principal components
  (fitted in seconds) and back.
- `DemoCodec` ("learned"): a few 3x3 convolutions at 1/8 resolution each way, trained with latent
  noise so the decoder forgives a diffusion model's small errors.
On held-out world stories the linear codec round-trips better (docs/demo-model.md has the numbers),
so new runs use it; the first shipped model was trained on the learned one, and the file says which
(`moga.demo` metadata, `vae.kind`).

Latents are normalised per channel (`latent_mean`, `latent_std`, measured on world clips), so the
DiT sees roughly unit-variance latents as Wan's VAE scaling gives it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPORAL = 4
SPATIAL = 8


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class ClipCodec(nn.Module):
    """The shared part of the demo codecs: packing 4n+1 frames into latent frames, latent
    normalisation, and the VAE contract. Subclasses define `encode_raw` / `decode_raw`."""

    temporal_ratio = TEMPORAL
    spatial_ratio = SPATIAL
    kind = "base"

    def __init__(self, latent_channels: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def _param_dtype(self) -> torch.dtype:
        return self.latent_mean.dtype if not list(self.parameters()) else next(self.parameters()).dtype

    # -- packing -----------------------------------------------------------------------------

    @staticmethod
    def _check_video(video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"the codec encodes video [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % TEMPORAL:
            raise ValueError(f"a clip has 4n+1 frames (1, 5, 9, 17, ...), got {t}: encode each shot alone")
        if h % SPATIAL or w % SPATIAL:
            raise ValueError(f"frame size {h}x{w} must be a multiple of {SPATIAL}")

    def _pack(self, video: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = video.shape
        groups = torch.cat([video[:, :, :1].expand(b, 3, TEMPORAL, h, w), video[:, :, 1:]], dim=2)
        n = groups.shape[2] // TEMPORAL
        x = groups.reshape(b, 3, n, TEMPORAL, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, n, 4, 3, H, W]
        x = x.reshape(b * n, TEMPORAL * 3, h, w)
        return F.pixel_unshuffle(x, SPATIAL), n

    def _unpack(self, x: torch.Tensor, b: int, n: int) -> torch.Tensor:
        x = F.pixel_shuffle(x, SPATIAL)                                  # [B*n, 12, H, W]
        h, w = x.shape[-2:]
        x = x.reshape(b, n, TEMPORAL, 3, h, w).permute(0, 3, 1, 2, 4, 5)  # [B, 3, n, 4, H, W]
        first = x[:, :, 0, -1:]                                           # frame 0
        rest = x[:, :, 1:].reshape(b, 3, (n - 1) * TEMPORAL, h, w)
        return torch.cat([first, rest], dim=2)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the codec decodes latents [B, {self.latent_channels}, F, H, W], "
                             f"got {tuple(z.shape)}")

    # -- the VAE contract (docs/interfaces.md) -----------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (z - self.latent_mean.view(shape).to(z)) / self.latent_std.view(shape).to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return z * self.latent_std.view(shape).to(z) + self.latent_mean.view(shape).to(z)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 4n+1, H, W] in [-1, 1] -> normalised latent [B, C, n+1, H/8, W/8]."""
        return self.normalize(self.encode_raw(video).float())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """normalised latent [B, C, n+1, h, w] (one clip) -> video [B, 3, 4n+1, 8h, 8w] in [-1, 1]."""
        self._check_latent(latent)
        return self.decode_raw(self.denormalize(latent.float())).float().clamp(-1.0, 1.0)

    def encode_shots(self, video: torch.Tensor, shot_frames) -> torch.Tensor:
        """A multi-shot video (pixel frames per shot) -> the latents of its shots, concatenated."""
        out, start = [], 0
        for f in shot_frames:
            out.append(self.encode(video[:, :, start:start + f]))
            start += f
        if start != video.shape[2]:
            raise ValueError(f"shot lengths {list(shot_frames)} cover {start} frames, the video has {video.shape[2]}")
        return torch.cat(out, dim=2)

    def decode_shots(self, latent: torch.Tensor, latent_shot_frames) -> torch.Tensor:
        """Decode each shot's latent frames alone and join the clips (cuts stay clean)."""
        out, start = [], 0
        for f in latent_shot_frames:
            out.append(self.decode(latent[:, :, start:start + f]))
            start += f
        if start != latent.shape[2]:
            raise ValueError(f"shot lengths {list(latent_shot_frames)} cover {start} latent frames, "
                             f"the latent has {latent.shape[2]}")
        return torch.cat(out, dim=2)


class DemoCodec(ClipCodec):
    """A small learned autoencoder: `encode(video [B,3,4n+1,H,W] in [-1,1]) -> latent
    [B,C,n+1,H/8,W/8]`; `decode` back."""

    kind = "learned"

    def __init__(self, latent_channels: int = 16, hidden: int = 128, blocks: int = 2):
        super().__init__(latent_channels)
        self.hidden, self.blocks = hidden, blocks
        packed = 3 * TEMPORAL * SPATIAL * SPATIAL
        self.enc_in = nn.Conv2d(packed, hidden, 1)
        self.enc_blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(blocks)))
        self.enc_out = nn.Conv2d(hidden, latent_channels, 1)
        self.dec_in = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.dec_blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(blocks)))
        self.dec_out = nn.Conv2d(hidden, packed, 1)

    def config(self) -> dict:
        return {"kind": self.kind, "latent_channels": self.latent_channels, "hidden": self.hidden,
                "blocks": self.blocks}

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        b = video.shape[0]
        x, n = self._pack(video.to(self.enc_in.weight.dtype))
        z = self.enc_out(self.enc_blocks(self.enc_in(x)))
        return z.reshape(b, n, *z.shape[1:]).transpose(1, 2)              # [B, C, n, h, w]

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        b, c, n, h, w = z.shape
        x = z.transpose(1, 2).reshape(b * n, c, h, w).to(self.dec_in.weight.dtype)
        return self._unpack(self.dec_out(F.gelu(self.dec_blocks(self.dec_in(x)))), b, n)


class PatchCodec(ClipCodec):
    """Pixel patches, linearly: each latent pixel's 768 packed values (4 frames x 3 colours x 8 x 8)
    projected on their top `latent_channels` principal components (`fit`), and back. No training
    loop, no nonlinearity; on this world it round-trips better than the learned codec (see
    docs/demo-model.md)."""

    kind = "pca"

    def __init__(self, latent_channels: int = 16):
        super().__init__(latent_channels)
        packed = 3 * TEMPORAL * SPATIAL * SPATIAL
        self.register_buffer("basis", torch.zeros(packed, latent_channels))
        self.register_buffer("patch_mean", torch.zeros(packed))

    def config(self) -> dict:
        return {"kind": self.kind, "latent_channels": self.latent_channels}

    @torch.no_grad()
    def fit(self, videos) -> "PatchCodec":
        """Principal components of the packed patches of clips [B, 3, 4n+1, H, W] (an iterable of
        batches); then the latent statistics."""
        rows = []
        for v in videos:
            self._check_video(v)
            rows.append(self._pack(v.float())[0].permute(0, 2, 3, 1).reshape(-1, self.basis.shape[0]))
        x = torch.cat(rows).double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(x.shape[0] - 1, 1)
        vals, vecs = torch.linalg.eigh(cov)
        basis = vecs[:, vals.argsort(descending=True)[: self.latent_channels]]
        basis = basis * torch.where(basis.sum(0) < 0, -1.0, 1.0)  # a fixed sign per component
        self.basis.copy_(basis.float())
        self.patch_mean.copy_(mean.float())
        return self

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        b = video.shape[0]
        x, n = self._pack(video.float())
        z = torch.einsum("bphw,pc->bchw", x - self.patch_mean.view(1, -1, 1, 1), self.basis)
        return z.reshape(b, n, *z.shape[1:]).transpose(1, 2)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        b, c, n, h, w = z.shape
        x = z.float().transpose(1, 2).reshape(b * n, c, h, w)
        return self._unpack(torch.einsum("bchw,pc->bphw", x, self.basis) + self.patch_mean.view(1, -1, 1, 1), b, n)


def make_codec(config: dict) -> ClipCodec:
    """A codec from its `config()` (files written before `kind` existed hold the learned one)."""
    cfg = dict(config)
    kind = cfg.pop("kind", "learned")
    if kind == "learned":
        return DemoCodec(**cfg)
    if kind == "pca":
        return PatchCodec(**cfg)
    raise ValueError(f"unknown codec kind {kind!r}: 'learned' or 'pca'")
