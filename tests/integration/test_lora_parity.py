"""Parity of our LoRA merge (moga.checkpoint.load_model(..., loras=...)) with ComfyUI's own LoRA loading.

The same tiny random Wan2.1 base and LoRA files go through ComfyUI's path (comfy.sd.load_diffusion_model_state_dict,
comfy.sd.load_lora_for_models: model_lora_keys_unet + comfy.lora.load_lora, then ModelPatcher.patch_model) and
through ours; the merged weights and the model outputs are compared in float32. Runs in a subprocess under the
ComfyUI host's python (each host of tests/integration/conftest.py), importing `comfy` from the host and `moga` from this
checkout. As a script (`python tests/integration/test_lora_parity.py`) it prints the errors as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import pytest
except ImportError:  # the host's python need not have pytest
    pytest = None

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # max relative error, float32
# ComfyUI infers Wan's heads as dim // 128: a tiny model of width 256 has 2 heads of 128
CONFIG = dict(dim=256, num_heads=2, ffn_dim=512, num_layers=2, text_dim=4096, freq_dim=256)  # text, freq: fixed by ComfyUI


def _loras(folder: Path, dim: int, ffn: int, text: int):
    """Three LoRA files in the layouts ComfyUI reads for Wan: kohya (alpha), PEFT lora_A/B under diffusion_model.,
    and .diff/.diff_b full deltas; random, non-zero."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    kohya = {}
    for mod, (out, inp) in {"blocks_0_self_attn_q": (dim, dim), "blocks_1_ffn_0": (ffn, dim),
                            "blocks_1_cross_attn_k": (dim, dim), "text_embedding_0": (dim, text)}.items():
        kohya[f"lora_unet_{mod}.lora_up.weight"] = r(out, 8)
        kohya[f"lora_unet_{mod}.lora_down.weight"] = r(8, inp)
        kohya[f"lora_unet_{mod}.alpha"] = torch.tensor(4.0)
    peft = {}
    for mod, (out, inp) in {"blocks.0.self_attn.o": (dim, dim), "blocks.0.ffn.2": (dim, ffn),
                            "blocks.1.self_attn.q": (dim, dim)}.items():
        peft[f"diffusion_model.{mod}.lora_B.weight"] = r(out, 4)
        peft[f"diffusion_model.{mod}.lora_A.weight"] = r(4, inp)
    diff = {"diffusion_model.blocks.0.norm3.diff": 0.1 * torch.randn(dim, generator=g),
            "diffusion_model.blocks.0.norm3.diff_b": 0.1 * torch.randn(dim, generator=g),
            "diffusion_model.blocks.1.self_attn.v.diff_b": 0.1 * torch.randn(dim, generator=g),
            "diffusion_model.head.head.diff": 0.01 * torch.randn(64, dim, generator=g)}
    paths = {}
    for name, sd in (("kohya", kohya), ("peft", peft), ("diff", diff)):
        paths[name] = folder / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    return paths


def compare() -> dict:
    import torch

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(0, str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no GPU here; ComfyUI would otherwise probe CUDA at import
    import comfy.sd
    import comfy.utils

    from moga.checkpoint import load_model
    from moga.testing import random_inputs, write_tiny_checkpoint

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = write_tiny_checkpoint(tmp / "base.safetensors", layout="comfyui", seed=3, **CONFIG)
        files = _loras(tmp, CONFIG["dim"], CONFIG["ffn_dim"], CONFIG["text_dim"])
        cases = {"kohya 0.8": [("kohya", 0.8)], "peft 1.0": [("peft", 1.0)], "diff -0.5": [("diff", -0.5)],
                 "all three": [("kohya", 0.7), ("peft", 1.3), ("diff", 0.6)]}
        for name, loras in cases.items():
            patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(base)),
                                                               model_options={"dtype": torch.float32})
            for lora, strength in loras:
                patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(
                    str(files[lora])), strength, 0)
            patcher.patch_model(device_to=torch.device("cpu"))
            theirs_net = patcher.model.diffusion_model
            theirs = {k: v.float() for k, v in theirs_net.state_dict().items()}
            ours_model = load_model(base, loras=[(files[f], s) for f, s in loras])
            ours = {k: v.float() for k, v in ours_model.dit_state_dict().items()}
            common = set(ours) & set(theirs)
            assert len(common) == len(ours), sorted(set(ours) - set(theirs))[:5]
            w_err = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp(min=1e-12))
                        for k in common)
            changed = sum(not torch.equal(ours[k], v) for k, v in
                          load_model(base).dit_state_dict().items())
            x, t, ctx = random_inputs(ours_model.config, frames=2, height=8, width=8, seed=5)
            padded = torch.cat([ctx, ctx.new_zeros(1, ours_model.config.text_len - ctx.shape[1], ctx.shape[2])], 1)
            with torch.inference_mode():
                a, b = ours_model(x, t, ctx), theirs_net(x, t, padded)
            out_err = float((a - b).abs().max() / b.abs().max())
            results[name] = {"weights": w_err, "output": out_err, "tensors changed": changed}
    worst = max(max(r["weights"], r["output"]) for r in results.values())
    return {"torch": torch.__version__, "errors": results, "max": worst}


def test_our_lora_merge_matches_comfyui_lora_loading(comfy_host):
    """On every host of the integration tests (COMFYUI_PATHS or COMFYUI_PATH, see conftest.py)."""
    path, python = str(comfy_host["comfy"]), str(comfy_host["python"])
    if not (Path(path) / "comfy" / "lora.py").is_file():
        pytest.skip(f"{path} has no comfy/lora.py")
    proc = subprocess.run([python, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": "", "COMFYUI_PATH": path})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    for name, r in report["errors"].items():
        assert r["tensors changed"] > 0, name
    assert report["max"] < TOLERANCE, report


if __name__ == "__main__":
    print(json.dumps(compare()))
