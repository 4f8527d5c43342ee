"""Small random checkpoints for the real-server tests, so that a real ComfyUI runs the pack end to end on a CPU in
seconds, without the umT5 encoder:
- `write_run_model`: the demo model's format (DiT + its own text encoder and decoder in one file), for the MoGA
  Sampler path;
- `write_core_model`: a Wan DiT that core's Load Diffusion Model reads (width 256 = two heads of 128, text width
  4096, as core infers them), T2V or Wan2.1 I2V (36 input channels, a CLIP-vision `img_emb`), in the demo format
  too, so MoGA Shot Prompts can take the text encoder from it; its head is random (Wan's init zeroes it), so the
  video depends on the model and what conditions it;
- `write_router_file`: the routers of such a checkpoint as a router file, with the checkpoint's fingerprint;
- `write_lora`: a small kohya LoRA for it (core's LoraLoaderModelOnly reads it)."""
from pathlib import Path

import torch


def write_run_model(path) -> Path:
    from moga.demo.codec import DemoCodec
    from moga.demo.model import build_demo, save_demo

    torch.manual_seed(0)
    model, text = build_demo(seed=0, dim=64, ffn_dim=128, num_heads=4, num_layers=2, moga_layers=(0, 1))
    codec = DemoCodec(latent_channels=16, hidden=32, blocks=1)
    return save_demo(path, model, text, codec, dtype=torch.float32)


def write_core_model(path, seed: int = 0, num_groups: int = 8, image: bool = False) -> Path:
    from moga.demo.codec import DemoCodec
    from moga.demo.model import build_demo, save_demo
    from moga.demo.text import DemoTextEncoder

    torch.manual_seed(seed)
    extra = dict(in_dim=36, image_dim=1280) if image else {}
    model, _ = build_demo(seed=seed, dim=256, ffn_dim=256, num_heads=2, num_layers=2, moga_layers=(0, 1),
                          text_dim=4096, num_groups=num_groups, **extra)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.head.head.weight.copy_(torch.randn(model.head.head.weight.shape, generator=g) / 16)
    text = DemoTextEncoder(dim=4096, layers=0, heads=4, max_len=16)
    return save_demo(path, model, text, DemoCodec(latent_channels=16, hidden=32, blocks=1), dtype=torch.float32)


def write_router_file(path, checkpoint) -> Path:
    from moga.checkpoint.router_file import file_fingerprint, read_routers, write_routers

    routers = read_routers(checkpoint)
    return write_routers(path, routers.weights, routers.config, routers.dense_warmup, file_fingerprint(checkpoint))


def write_lora(path, seed: int, dim: int = 256, rank: int = 4) -> Path:
    """Small deltas on two of the blocks' linears (the routers' fingerprint still reads "close")."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module in ("blocks_0_self_attn_o", "blocks_1_ffn_2"):
        sd[f"lora_unet_{module}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.05
        sd[f"lora_unet_{module}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.05
        sd[f"lora_unet_{module}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return Path(path)
