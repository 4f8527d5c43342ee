"""The demo model's latent codec: a small learned autoencoder with the Wan VAE's mapping.

Mapping (as Wan2.1's VAE, so `moga.shots` and the samplers serve both): a clip of 4n+1 frames
becomes n+1 latent frames (frame 0 alone, then groups of 4), 8x8 pixels become one latent pixel,
16 latent channels. Each latent frame is coded on its own: its 4 frames (frame 0 repeated 4 times)
are stacked as 12 channels, 8x8 pixel blocks are unshuffled into 768 channels, and a few 3x3
convolutions at 1/8 resolution map them to 16 channels and back. No temporal convolution: a
shot is coded alone and a cut stays a clean cut.

Latents are normalised per channel (`latent_mean`, `latent_std`, measured on world videos after
training), so the DiT sees roughly unit-variance latents as Wan's VAE scaling gives it.
Why learned and not fixed pixel patches: 768 pixel values per latent pixel cannot pass through
16 channels linearly without losing the shapes (see docs/demo-model.md for the measured numbers).
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


class DemoCodec(nn.Module):
    """`encode(video [B,3,4n+1,H,W] in [-1,1]) -> latent [B,C,n+1,H/8,W/8]`; `decode` back."""

    temporal_ratio = TEMPORAL
    spatial_ratio = SPATIAL

    def __init__(self, latent_channels: int = 16, hidden: int = 128, blocks: int = 2):
        super().__init__()
        self.latent_channels, self.hidden, self.blocks = latent_channels, hidden, blocks
        packed = 3 * TEMPORAL * SPATIAL * SPATIAL
        self.enc_in = nn.Conv2d(packed, hidden, 1)
        self.enc_blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(blocks)))
        self.enc_out = nn.Conv2d(hidden, latent_channels, 1)
        self.dec_in = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.dec_blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(blocks)))
        self.dec_out = nn.Conv2d(hidden, packed, 1)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def config(self) -> dict:
        return {"latent_channels": self.latent_channels, "hidden": self.hidden, "blocks": self.blocks}

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

    # -- raw (unnormalised) nets -------------------------------------------------------------

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        b = video.shape[0]
        x, n = self._pack(video.to(self.enc_in.weight.dtype))
        z = self.enc_out(self.enc_blocks(self.enc_in(x)))
        return z.reshape(b, n, *z.shape[1:]).transpose(1, 2)              # [B, C, n, h, w]

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the codec decodes latents [B, {self.latent_channels}, F, H, W], "
                             f"got {tuple(z.shape)}")
        b, c, n, h, w = z.shape
        x = z.transpose(1, 2).reshape(b * n, c, h, w).to(self.dec_in.weight.dtype)
        return self._unpack(self.dec_out(F.gelu(self.dec_blocks(self.dec_in(x)))), b, n)

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
