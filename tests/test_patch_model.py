"""MoGA Patch Model on core's own Wan model: parity with core (dense settings) and with moga.model (MoGA on).

Runs under a ComfyUI host's python (COMFYUI_PATH, COMFYUI_PYTHON; CI builds both): a subprocess loads a tiny
random MoGA checkpoint with core's own loader (comfy.sd.load_diffusion_model: it drops the router tensors), reads
the routers from the same file (moga.checkpoint.router_file), patches the MODEL with nodes/patch_hooks.py and compares
  - one group, static branches off: core's own output (the patch's attention path, no MoGA maths left);
  - dense warm-up over the whole sigma range: core's own output (the patch steps aside);
  - MoGA on (mean / lse fusion, capacity, two shots): moga.model.WanModel from the same file, same settings;
  - a LoRA applied by core first: core's own LoRA'd output (dense setting), and the library model with the
    LoRA merged by hand (MoGA on);
  - per-shot prompts (model_conds): the library's per-shot cross-attention (dense and MoGA), and core's own
    output when every shot has the same prompt (one call and a KSampler run);
  - an attention override already there: still called for everything MoGA does not replace;
  - a real KSampler run (comfy.sample.sample): equals core's with the dense setting, and the routers' device
    copies are dropped when sampling ends;
  - a model MoGA cannot patch: an error naming it.
These run through the fused block (moga.host_block) where it applies; tests/test_patch_fast_block.py compares it
with core's own block path and checks where it steps aside.
Executed as a script it prints the measurements as JSON (the last line).
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
except ImportError:  # the ComfyUI python that runs compare() need not have pytest
    pytest = None

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max relative error, float32
# core's loader infers heads as dim // 128 and uses freq_dim 256, text_dim 4096: a tiny model it reads
TINY = dict(num_layers=3, dim=256, num_heads=2, ffn_dim=256, text_dim=4096, freq_dim=256)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def load_host():
    """ComfyUI from COMFYUI_PATH on the CPU, and nodes/patch_hooks.py loaded by file (ComfyUI has its own top-level
    `nodes` module); returns the hooks module."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(0, str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import importlib.util
    spec = importlib.util.spec_from_file_location("moga_patch_hooks", ROOT / "nodes" / "patch_hooks.py")
    hooks = sys.modules["moga_patch_hooks"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def denoised(patcher, x, sigma, context, **conds):
    """core's denoised output of one call, through the wrappers the sampler would merge in."""
    import torch
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers
    with torch.inference_mode():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to, **conds).float()


def compare() -> dict:
    import torch

    hooks = load_host()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    from moga.attention import MoGAConfig
    from moga.checkpoint import load_model
    from moga.host_patch import patch_from_routers
    from moga.checkpoint.router_file import read_routers
    from moga.testing import write_tiny_checkpoint
    PatchError, apply_patch = hooks.PatchError, hooks.apply_patch

    torch.manual_seed(0)
    out: dict = {"errors": {}}
    err = out["errors"]
    tmp = Path(tempfile.mkdtemp())
    path = write_tiny_checkpoint(tmp / "tiny_moga.safetensors", layout="comfyui", num_groups=4, seed=3, **TINY)
    core = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    routers = read_routers(path)
    lib = load_model(path, dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 8, 12, generator=g)     # 4 latent frames of 4 x 6 tokens
    ctx = torch.randn(1, 9, 4096, generator=g)
    ctx_padded = torch.cat([ctx, ctx.new_zeros(1, 512 - 9, 4096)], dim=1)
    sigma = torch.tensor([0.55])

    def run(patcher, **conds):
        return denoised(patcher, x, sigma, ctx_padded, **conds)

    def library(cfg, shots=None, model=lib, texts=None):
        with torch.inference_mode():
            v = model(x, sigma * 1000, ctx if texts is None else texts, shot_frames=shots, moga=cfg)
        return x - sigma.view(1, 1, 1, 1, 1) * v  # core's CONST denoised: x - sigma * v

    reference = run(core)
    err["library dense vs core"] = _rel(library(MoGAConfig(dense=True)), reference)

    one = patch_from_routers(routers, groups=1, windowed=False, per_frame=False)
    err["1 group, static off vs core"] = _rel(run(apply_patch(core, one)), reference)
    warm = patch_from_routers(routers, dense_warmup=1.0)
    err["dense warm-up 1.0 vs core"] = _rel(run(apply_patch(core, warm)), reference)

    # the warm-up share maps to a sigma through the model's own sampling (ModelSamplingSD3 or not), as start_percent
    ms = core.get_model_object("model_sampling")
    shares = [i / 100 for i in range(101)]
    before = max(p for p in shares if ms.percent_to_sigma(p) > 0.56)  # sigma 0.55 is past its end: MoGA runs
    after = min(p for p in shares if ms.percent_to_sigma(p) < 0.54)   # still inside it: dense
    moga_patch = patch_from_routers(routers, fusion="mean", capacity=0.0)
    out["warm-up shares"] = [before, after]
    out["warm-up ended: MoGA"] = _rel(run(apply_patch(core, patch_from_routers(
        routers, fusion="mean", capacity=0.0, dense_warmup=before))), reference)
    err["warm-up not ended: dense vs core"] = _rel(run(apply_patch(core, patch_from_routers(
        routers, fusion="mean", capacity=0.0, dense_warmup=after))), reference)
    del moga_patch

    cases = {
        "mean": dict(fusion="mean", capacity=0.0),
        "lse, capacity 1": dict(fusion="lse", capacity=1.0),
        "3 groups merged, window 0,1,2": dict(groups=3, window="0,1,2", fusion="mean", capacity=0.0),
        "layers 0,2, no frame branch": dict(fusion="mean", capacity=0.0, per_frame=False, layers=(0, 2)),
    }
    for name, kw in cases.items():
        patch = patch_from_routers(routers, **kw)
        cfg = patch.config
        dense_layers = [i for i in range(TINY["num_layers"]) if i not in patch.layers]
        with torch.inference_mode():
            v = lib(x, sigma * 1000, ctx, moga=cfg, dense_layers=dense_layers)
        expect = x - sigma.view(1, 1, 1, 1, 1) * v
        got = run(apply_patch(core, patch))
        err[f"MoGA {name} vs library"] = _rel(got, expect)
        out.setdefault("moga vs dense", {})[name] = _rel(got, reference)  # MoGA really changes the output
    shots = [3, 1]
    patch = patch_from_routers(routers, fusion="mean", capacity=0.0)
    err["MoGA two shots vs library"] = _rel(run(apply_patch(core, patch, shot_frames=shots)),
                                            library(patch.config, shots))

    # per-shot prompts (what MoGA Shot Conditioning puts into model_conds): each shot's tokens see only its text
    shot_texts = [ctx, torch.randn(1, 5, 4096, generator=g)]
    pad = lambda c: torch.cat([c, c.new_zeros(1, 512 - c.shape[1], 4096)], dim=1)  # noqa: E731
    per_shot = {hooks.SHOT_CONTEXT_KEY: torch.stack([pad(c)[0] for c in shot_texts])[None],
                hooks.SHOT_FRAMES_KEY: torch.tensor([shots], dtype=torch.long)}
    dense_shots = patch_from_routers(routers, dense_warmup=1.0)
    err["per-shot prompts, dense vs library"] = _rel(run(apply_patch(core, dense_shots), **per_shot),
                                                     library(MoGAConfig(dense=True), shots, texts=shot_texts))
    patch = patch_from_routers(routers, fusion="lse", capacity=1.0)
    err["per-shot prompts, MoGA vs library"] = _rel(run(apply_patch(core, patch), **per_shot),
                                                    library(patch.config, shots, texts=shot_texts))
    same = {**per_shot, hooks.SHOT_CONTEXT_KEY: torch.stack([ctx_padded[0]] * 2)[None]}
    err["per-shot prompts all equal, dense vs core"] = _rel(run(apply_patch(core, dense_shots), **same), reference)

    # LoRA on q and v of every block, through core's own LoRA loader
    lora = {}
    for i in range(TINY["num_layers"]):
        for p in ("q", "v"):
            key = f"diffusion_model.blocks.{i}.self_attn.{p}"
            lora[key + ".lora_up.weight"] = torch.randn(256, 4, generator=g) * 0.05
            lora[key + ".lora_down.weight"] = torch.randn(4, 256, generator=g) * 0.05
    lora_model, _ = comfy.sd.load_lora_for_models(core, None, lora, 0.8, 0.0)
    lora_ref = run(lora_model)
    out["lora changes core"] = _rel(lora_ref, reference)
    err["LoRA, 1 group static off vs core LoRA"] = _rel(run(apply_patch(lora_model, one)), lora_ref)
    merged = load_model(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for i in range(TINY["num_layers"]):
            for p in ("q", "v"):
                key = f"diffusion_model.blocks.{i}.self_attn.{p}"
                w = getattr(merged.blocks[i].self_attn, p).weight
                w += 0.8 * lora[key + ".lora_up.weight"] @ lora[key + ".lora_down.weight"]
    patch = patch_from_routers(routers, fusion="mean", capacity=0.0)
    err["LoRA, MoGA on vs library with the LoRA merged"] = _rel(run(apply_patch(lora_model, patch)),
                                                              library(patch.config, model=merged))

    # ComfyUI's scaled fp8 file: the patch projects with core's own fp8 layers (casting and scale_weight are core's)
    fp8_path = write_tiny_checkpoint(tmp / "tiny_fp8.safetensors", layout="comfyui", num_groups=4, seed=3,
                                     fp8="scaled", **TINY)
    fp8 = comfy.sd.load_diffusion_model(str(fp8_path), model_options={"dtype": torch.float32})
    fp8_ref = run(fp8)
    out["fp8 vs float32 core"] = _rel(fp8_ref, reference)
    err["scaled fp8, 1 group static off vs core"] = _rel(run(apply_patch(fp8, one)), fp8_ref)

    # Wan2.2 TI2V-5B's layout (48-channel latent, core's WAN22 with a per-token timestep from a denoise mask, as its
    # image-to-video first frame): no library twin yet, so the dense setting against core, and MoGA on runs
    ti2v_path = write_tiny_checkpoint(tmp / "tiny_ti2v.safetensors", layout="comfyui", num_groups=4, seed=5,
                                      in_dim=48, out_dim=48, **TINY)
    ti2v = comfy.sd.load_diffusion_model(str(ti2v_path), model_options={"dtype": torch.float32})
    out["ti2v model"] = type(ti2v.model).__name__
    x48 = torch.randn(1, 48, 4, 8, 12, generator=g)
    mask = torch.ones(1, 1, 4, 8, 12)
    mask[:, :, 0] = 0.0  # the first latent frame is given (timestep 0 there)

    def run48(patcher):
        return denoised(patcher, x48, sigma, ctx_padded, denoise_mask=mask)
    ti2v_ref = run48(ti2v)
    ti2v_routers = read_routers(ti2v_path)
    err["TI2V-5B layout, 1 group static off vs core"] = _rel(run48(apply_patch(ti2v, patch_from_routers(
        ti2v_routers, groups=1, windowed=False, per_frame=False))), ti2v_ref)
    out["TI2V-5B layout, MoGA vs dense"] = _rel(run48(apply_patch(ti2v, patch_from_routers(ti2v_routers))), ti2v_ref)

    # routers meet the weights they were made for, the same in scaled fp8, and other weights (a warning naming both)
    import logging
    dm = lambda m: m.get_model_object("diffusion_model")  # noqa: E731
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    mm.load_models_gpu([core])  # core's weights without the LoRA again (the LoRA'd clone shares them)
    try:
        out["fingerprint"] = {
            "own checkpoint": hooks.check_fingerprint(routers, dm(core), "the float32 model"),
            "scaled fp8 of it": hooks.check_fingerprint(routers, dm(fp8), "the fp8 model"),
            "with a LoRA merged": hooks.check_fingerprint(routers, dm(lora_model), "the LoRA'd model"),
            "other weights": hooks.check_fingerprint(routers, dm(ti2v), "the TI2V model"),
        }
    finally:
        logging.getLogger().removeHandler(handler)
    out["fingerprint warnings"] = [w for w in warnings if "were made for" in w]

    # an attention override already there stays in use for what MoGA does not replace
    calls = []

    def counting(func, *a, **kw):
        calls.append(a[1].shape[1])  # key length: 512 = cross-attention, else self-attention
        return func(*a, **kw)
    below = core.clone()
    below.model_options["transformer_options"]["optimized_attention_override"] = counting
    patch = patch_from_routers(routers, fusion="mean", capacity=0.0, layers=(1,))
    run(apply_patch(below, patch))
    out["override calls (key lengths)"] = calls
    n = TINY["num_layers"]
    out["override ok"] = sorted(calls) == sorted([512] * n + [96] * (n - 1))

    # a real KSampler run: dense setting equals core; routers' device copies dropped afterwards
    latent = torch.randn(1, 16, 4, 8, 12, generator=g)
    noise = torch.randn(1, 16, 4, 8, 12, generator=g)
    positive = [[ctx_padded, {}]]

    def ksample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 3, 1.0, "euler", "simple", positive, positive, latent,
                                       denoise=1.0, seed=0)
    base_run = ksample(core)
    from comfy.conds import CONDRegular
    shot_cond = lambda ctxs: [[ctxs[0], {"model_conds": {  # noqa: E731
        hooks.SHOT_CONTEXT_KEY: CONDRegular(torch.stack([c[0] for c in ctxs])[None]),
        hooks.SHOT_FRAMES_KEY: CONDRegular(torch.tensor([shots], dtype=torch.long))}}]]
    dense_model = apply_patch(core, patch_from_routers(routers, dense_warmup=1.0))
    with torch.inference_mode():
        same_run = comfy.sample.sample(dense_model, noise, 3, 1.0, "euler", "simple", shot_cond([ctx_padded] * 2),
                                       shot_cond([ctx_padded] * 2), latent, denoise=1.0, seed=0)
        two_run = comfy.sample.sample(dense_model, noise, 3, 1.0, "euler", "simple",
                                      shot_cond([ctx_padded, pad(shot_texts[1])]), shot_cond([ctx_padded] * 2),
                                      latent, denoise=1.0, seed=0)
    err["KSampler, per-shot conditioning all equal vs core"] = _rel(same_run, base_run)
    out["KSampler, two shot prompts vs one"] = _rel(two_run, base_run)
    patch = patch_from_routers(routers, groups=1, windowed=False, per_frame=False)
    err["KSampler 3 steps, 1 group static off vs core"] = _rel(ksample(apply_patch(core, patch)), base_run)
    patch = patch_from_routers(routers, fusion="lse", capacity=1.0, dense_warmup=0.3)
    moga_run = ksample(apply_patch(core, patch))
    out["KSampler MoGA finite"] = bool(torch.isfinite(moga_run).all())
    out["KSampler MoGA vs dense"] = _rel(moga_run, base_run)
    out["routers released after sampling"] = not patch._device_routers
    out["original model untouched"] = "dit" not in core.model_options["transformer_options"].get("patches_replace", {})

    class Other:  # a patcher whose diffusion model is not Wan's
        model = torch.nn.Identity()

        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)
    try:
        apply_patch(Other(), one)
        out["unsupported error"] = None
    except PatchError as e:
        out["unsupported error"] = str(e)
    out["max"] = max(err.values())
    out["fast block calls"] = dict(hooks.FAST_COUNTS)
    import comfy
    out["torch"] = torch.__version__
    out["comfyui"] = getattr(__import__("comfyui_version"), "__version__", "?")
    del comfy
    return out


def test_patched_core_model_matches_core_and_library():
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip("set COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its python) to test MoGA Patch Model "
                    "on core's own Wan model; CI builds them with comfy-host.sh")
    proc = subprocess.run([python, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max"] < TOLERANCE, report
    # MoGA really ran (it is not dense attention under another name) and a LoRA really changed the model
    assert min(report["moga vs dense"].values()) > 1e-3, report
    assert report["lora changes core"] > 1e-3, report
    assert report["warm-up ended: MoGA"] > 1e-3 and report["fp8 vs float32 core"] > 1e-4, report
    assert report["KSampler MoGA finite"] and report["KSampler MoGA vs dense"] > 1e-3, report
    assert report["override ok"], report
    fp = report["fingerprint"]
    assert (fp["own checkpoint"], fp["scaled fp8 of it"], fp["other weights"]) == ("same", "close", "different"), fp
    assert fp["with a LoRA merged"] in ("same", "close"), fp  # "same" while core holds the LoRA unmerged
    assert len(report["fingerprint warnings"]) == 1, report
    assert "tiny_moga.safetensors" in report["fingerprint warnings"][0], report
    assert "the TI2V model" in report["fingerprint warnings"][0], report
    assert report["ti2v model"] == "WAN22" and report["TI2V-5B layout, MoGA vs dense"] > 1e-3, report
    assert report["KSampler, two shot prompts vs one"] > 1e-3, report
    assert report["routers released after sampling"] and report["original model untouched"], report
    assert report["unsupported error"] and "cannot patch" in report["unsupported error"], report
    # the fused block ran wherever MoGA or per-shot prompts did, except TI2V's per-token timesteps
    calls = report["fast block calls"]
    assert calls.get("fast", 0) > 0 and all("per-frame modulation" in k for k in calls if k != "fast"), calls


def test_patch_path_benchmark_smoke(tmp_path):
    """benchmarks/patch_path.py --smoke: the library and both patch paths (the fused block, core's own block) on
    shared weights, the same output, every fused-block row's block calls fused, its JSON written."""
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip("set COMFYUI_PATH and COMFYUI_PYTHON (a ComfyUI host) to run the patch-path benchmark")
    out = tmp_path / "patch_path.json"
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "patch_path.py"), "--smoke", "--core-dense", "--sol",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["patch_vs_library_rel_err"] < TOLERANCE and info["patch_core_block_vs_library_rel_err"] < TOLERANCE, info
    fast, core_block = "core + MoGA Patch Model", "core + MoGA Patch Model, core's block"
    assert set(info["rows"]) == {"library (moga.model)", fast, core_block, "core, dense (no patch)"}, info
    assert set(info["fast_block_calls"][fast]) == {"fast"} and info["fast_block_calls"][core_block] == {}, info
    assert f"| {fast} |" in proc.stdout and f"| {core_block} |" in proc.stdout
    assert "sol_skipped" in info and "Sol-Attn row skipped" in proc.stdout  # no CUDA here: said, not faked


if pytest is not None:
    test_patched_core_model_matches_core_and_library = pytest.mark.integration(
        test_patched_core_model_matches_core_and_library)
    test_patch_path_benchmark_smoke = pytest.mark.integration(test_patch_path_benchmark_smoke)

if __name__ == "__main__":
    print(json.dumps(compare()))
