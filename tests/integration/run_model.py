"""A small random checkpoint in the demo model's format (DiT + its own text encoder and decoder in one file), so
that a real ComfyUI can run the pack end to end on a CPU in seconds, without the umT5 encoder or the Wan VAE."""
from pathlib import Path

import torch


def write_run_model(path) -> Path:
    from moga.demo.codec import DemoCodec
    from moga.demo.model import build_demo, save_demo

    torch.manual_seed(0)
    model, text = build_demo(seed=0, dim=64, ffn_dim=128, num_heads=4, num_layers=2, moga_layers=(0, 1))
    codec = DemoCodec(latent_channels=16, hidden=32, blocks=1)
    return save_demo(path, model, text, codec, dtype=torch.float32)
