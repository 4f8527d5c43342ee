"""Parity of moga.model.WanModel (dense) with ComfyUI's Wan implementation on tiny random models:
Wan2.1 T2V, Wan2.1 I2V (CLIP branch + concatenated image latent), Wan2.2 I2V A14B (concatenation
only) and Wan2.2 TI2V-5B (48 channels, one timestep per latent frame, t = 0 on the image frame).

Runs only where a ComfyUI host exists: COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (a
python with ComfyUI's requirements; CI builds both). The comparison runs in a subprocess under that
python, importing comfy.ldm.wan.model from COMFYUI_PATH and our `moga` from this checkout. Executed
as a script (`python tests/test_model_parity.py`) it prints the measured errors as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import pytest
except ImportError:  # the ComfyUI python that runs compare() need not have pytest
    pytest = None

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max relative error, float32


def compare() -> dict:
    """Build one tiny random model, run ours and ComfyUI's on the same inputs, return the errors."""
    import torch

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(0, str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no GPU here; ComfyUI would otherwise probe CUDA at import
    import comfy.ops
    from comfy.ldm.wan.model import WanModel as ComfyWan

    from moga.testing import random_inputs, tiny_model

    torch.manual_seed(0)
    results = {}
    cases = [
        dict(name="1 shot, 3x8x8 latent", frames=3, height=8, width=8, t=637.0, batch=1),
        dict(name="batch 2, 5x6x10 latent, t=999", frames=5, height=6, width=10, t=999.0, batch=2),
        dict(name="odd latent 2x7x9 (patch padding)", frames=2, height=7, width=9, t=12.5, batch=1),
    ]
    for layers, heads in ((2, 4), (3, 2)):
        ours = tiny_model(seed=layers, num_layers=layers, num_heads=heads)
        cfg = ours.config
        theirs = ComfyWan(model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len,
                          in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim,
                          text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
                          num_layers=cfg.num_layers, eps=cfg.eps, device="cpu", dtype=torch.float32,
                          operations=comfy.ops.disable_weight_init)
        missing, unexpected = theirs.load_state_dict(ours.dit_state_dict(), strict=False)
        assert not unexpected and not missing, (missing, unexpected)
        theirs.eval()
        for case in cases:
            x, t, ctx = random_inputs(cfg, frames=case["frames"], height=case["height"],
                                      width=case["width"], batch=case["batch"], t=case["t"],
                                      seed=len(results))
            padded = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], cfg.text_len - ctx.shape[1],
                                                   ctx.shape[2])], dim=1)
            with torch.inference_mode():
                a = ours(x, t, ctx)
                b = theirs(x, t, padded)
            err = ((a - b).abs().max() / b.abs().max()).item()
            results[f"{layers} layers, {heads} heads, {case['name']}"] = err
    results.update(compare_image_models(ComfyWan, comfy.ops, torch, tiny_model))
    return {"torch": torch.__version__, "errors": results, "max": max(results.values())}


def compare_image_models(ComfyWan, ops, torch, tiny_model) -> dict:
    """The image-conditioned kinds, each against core's WanModel built as core's loader builds it."""
    results = {}
    kinds = [
        # (name, tiny_model config, core model_type, per-frame t)
        ("Wan2.1 I2V (CLIP 1280 + concat 36)", dict(in_dim=36, image_dim=1280), "i2v", False),
        ("Wan2.2 I2V A14B (concat 36)", dict(in_dim=36), "t2v", False),
        ("Wan2.2 TI2V-5B (48 ch, per-frame t)", dict(in_dim=48, out_dim=48), "t2v", True),
    ]
    for name, conf, model_type, per_frame in kinds:
        ours = tiny_model(seed=7, num_layers=2, num_heads=4, **conf)
        cfg = ours.config
        theirs = ComfyWan(model_type=model_type, patch_size=cfg.patch_size, text_len=cfg.text_len,
                          in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim,
                          text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
                          num_layers=cfg.num_layers, eps=cfg.eps, device="cpu", dtype=torch.float32,
                          operations=ops.disable_weight_init)
        missing, unexpected = theirs.load_state_dict(ours.dit_state_dict(), strict=False)
        assert not unexpected and not missing, (name, missing, unexpected)
        theirs.eval()
        for frames, height, width, batch in ((3, 8, 8, 1), (4, 6, 10, 2)):
            g = torch.Generator().manual_seed(len(results) + 100)
            noise = torch.randn(batch, cfg.out_dim, frames, height, width, generator=g)
            ctx = torch.randn(batch, 9, cfg.text_dim, generator=g)
            padded = torch.cat([ctx, ctx.new_zeros(batch, cfg.text_len - 9, cfg.text_dim)], dim=1)
            kw_ours, kw_theirs = {}, {}
            x_theirs = noise
            if cfg.in_dim != cfg.out_dim:
                y = torch.randn(batch, cfg.in_dim - cfg.out_dim, frames, height, width, generator=g)
                kw_ours["y"] = y
                x_theirs = torch.cat([noise, y], dim=1)
            if cfg.image_dim:
                clip = torch.randn(batch, 257, cfg.image_dim, generator=g)
                kw_ours["clip"], kw_theirs["clip_fea"] = clip, clip
            if per_frame:  # core's WAN22.process_timestep: t per latent frame, 0 on the image frame
                t = torch.full((batch, frames), 811.0)
                t[:, 0] = 0.0
            else:
                t = torch.full((batch,), 811.0)
            with torch.inference_mode():
                a = ours(noise, t, ctx, **kw_ours)
                b = theirs(x_theirs, t, padded, **kw_theirs)
            err = ((a - b).abs().max() / b.abs().max()).item()
            results[f"{name}, {frames}x{height}x{width}, batch {batch}"] = err
    return results


def test_dense_output_matches_comfyui_wan():
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip("set COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its python) to compare "
                    "with ComfyUI's comfy/ldm/wan/model.py; CI builds them with comfy-host.sh")
    if not (Path(path) / "comfy" / "ldm" / "wan" / "model.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} has no comfy/ldm/wan/model.py")
    proc = subprocess.run([python, str(Path(__file__).resolve())], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max"] < TOLERANCE, report


if pytest is not None:
    test_dense_output_matches_comfyui_wan = pytest.mark.integration(test_dense_output_matches_comfyui_wan)

if __name__ == "__main__":
    print(json.dumps(compare()))
