"""Parity of moga.model.WanModel (dense) with ComfyUI's Wan2.1 implementation on a tiny random model.

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
    return {"torch": torch.__version__, "errors": results, "max": max(results.values())}


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
