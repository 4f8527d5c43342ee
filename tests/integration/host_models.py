"""Random model files that ComfyUI's own loaders read, for the I2V and two-expert workflows on a CPU host: a Wan2.1
VAE (Load VAE) and a CLIP-vision ViT-H/14 (Load CLIP Vision). Run with a host's python, which has `comfy`:

    python host_models.py wan_vae OUT.safetensors COMFY_DIR
    python host_models.py clip_vision_h OUT.safetensors COMFY_DIR

Neither can be tiny: core builds both at their real sizes from fixed configs (v0.3.64's Wan VAE is always dim 96,
and Wan2.1 I2V's `img_emb` takes 1280-wide CLIP features, which among core's image encoders only ViT-H gives), so
the VAE has its real 127M parameters and the ViT-H its real 632M (stored float16: 0.25 and 1.3 GB). The weights are random
with sane scales (unit norms, weights ~ 1/sqrt(fan_in) or CLIP's 0.02), so the pictures stay finite.
"""
import json
import sys
from pathlib import Path


def _fill(shapes: dict, gen, std_of) -> dict:
    import torch
    out = {}
    for name, shape in shapes.items():
        std = std_of(name, shape)
        out[name] = (torch.ones(shape) if std == "ones" else torch.zeros(shape) if std == 0
                     else torch.randn(shape, generator=gen) * std)
    return out


def wan_vae_tensors(seed: int = 0) -> dict:
    import math

    import torch
    import comfy.ldm.wan.vae as wan_vae

    with torch.device("meta"):  # core's layers skip their init: only the names and shapes are wanted
        model = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True], dropout=0.0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def std_of(name, shape):
        if name.endswith("gamma"):
            return "ones"
        if len(shape) <= 1:
            return 0
        return 1.0 / math.sqrt(math.prod(shape[1:]))
    return {k: v.half() for k, v in _fill(shapes, torch.Generator().manual_seed(seed), std_of).items()}


def clip_vision_h_tensors(comfy_dir: Path, seed: int = 0) -> dict:
    import torch
    import comfy.clip_model
    import comfy.ops

    config = json.loads((comfy_dir / "comfy" / "clip_vision_config_h.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, None, comfy.ops.manual_cast)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def std_of(name, shape):
        if "layer_norm" in name or "layrnorm" in name:
            return "ones" if name.endswith("weight") else 0
        if name.endswith("bias"):
            return 0
        return 0.02  # CLIP's initializer_range
    tensors = _fill(shapes, torch.Generator().manual_seed(seed), std_of)
    return {k: v.half() for k, v in tensors.items()}


def main(kind: str, out: str, comfy_dir: str) -> None:
    comfy_dir = Path(comfy_dir).resolve()
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # no GPU probing at import
    from safetensors.torch import save_file

    tensors = wan_vae_tensors() if kind == "wan_vae" else clip_vision_h_tensors(comfy_dir) \
        if kind == "clip_vision_h" else sys.exit(f"unknown kind {kind!r}: wan_vae or clip_vision_h")
    part = Path(out).with_suffix(".part")
    save_file(tensors, str(part))
    part.rename(out)
    print(json.dumps({"kind": kind, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
