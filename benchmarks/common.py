"""What the GPU benchmarks share: the Wan2.1 configs, the 480p latent frame, shots, and a random-weight model."""
from __future__ import annotations

import torch

WAN_CONFIGS = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
FRAME = (30, 52)      # tokens of one 480p latent frame (832x480 / 16)
SHOT = 21             # latent frames per shot (~5 s)


def layout_for(tokens: int, frame=FRAME, shot=SHOT):
    """(latent frames, latent frames per shot) of about `tokens` tokens in shots of `shot` frames."""
    frames = max(1, round(tokens / (frame[0] * frame[1])))
    shots = [shot] * (frames // shot) + ([frames % shot] if frames % shot else [])
    return frames, shots


def build_random_model(spec: dict, groups: int, device, dtype, seed: int = 0):
    """A WanModel with routers in every layer and seeded random weights, built on `device` (meta init first)."""
    from moga.model import WanConfig, WanModel
    from moga.testing import init_random_

    cfg = WanConfig(**spec, num_groups=groups, moga_layers=tuple(range(spec["num_layers"])))
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    init_random_(model, seed)
    return model.eval().requires_grad_(False)
