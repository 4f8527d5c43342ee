"""The fused block of MoGA Patch Model (moga.host_block run on core's own Wan blocks) in core's own model, on
tiny random checkpoints core's loader reads (float32, CPU: the fused passes' plain torch path, so this checks
the plumbing; tests/test_host_block.py checks the kernels):
  - Wan2.1 T2V and Wan2.1 I2V (CLIP image tokens + concatenated image latent), each as loaded and with a LoRA
    applied by core's LoRA loading (linear layers, the I2V image keys, `diff` patches on a qk-norm and on norm3's
    weight and bias): in the dense-equivalent setting (1 group, static branches off) the fused block and core's
    own block path both equal core; with MoGA on both equal moga.model.WanModel with the same routers (the LoRA
    merged by hand);
  - where it steps aside (FAST_COUNTS names why) and the output is still core's: TI2V-5B's per-token timesteps
    (per-frame modulation), another block replacement below MoGA's, an attn1_patch;
  - norms with pending weight patches (low-VRAM LoRA: weight_function / bias_function) or dynamic-VRAM state
    are not read but run as core's modules, so the patches apply: equal to core with the same patches.
With TRITON_INTERPRET=1 (and Triton in the host's python) a second test runs the fused block's Triton kernels
through the interpreter on core's own modules: float32 and a bf16 model (a GPU run's residual dtype).
Runs under a ComfyUI host's python (COMFYUI_PATH, COMFYUI_PYTHON), like tests/test_patch_model.py, whose helpers
it uses. Executed as a script it prints the measurements as JSON (the last line; `--kernels`: the second test's).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_patch_model import ROOT, TINY, TOLERANCE, _rel, denoised, load_host  # noqa: E402

LAYERS = TINY["num_layers"]


def _lora(kind, g, torch):
    """A LoRA in the generic layout core reads: low-rank deltas on linear layers, `diff` on norm weights and a bias."""
    lora = {}
    linears = ["self_attn.q", "self_attn.v", "cross_attn.q", "ffn.0"] + (["cross_attn.k_img"] if kind == "I2V" else [])
    for i in range(LAYERS):
        for name in linears:
            key = f"diffusion_model.blocks.{i}.{name}"
            rows = TINY["ffn_dim"] if name == "ffn.0" else TINY["dim"]
            lora[key + ".lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.05
            lora[key + ".lora_down.weight"] = torch.randn(4, TINY["dim"], generator=g) * 0.05
    dim = TINY["dim"]
    lora["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.randn(dim, generator=g) * 0.2
    lora["diffusion_model.blocks.1.norm3.diff"] = torch.randn(dim, generator=g) * 0.2
    lora["diffusion_model.blocks.1.norm3.diff_b"] = torch.randn(dim, generator=g) * 0.2
    return lora


def _merge(model, lora, strength, torch):
    """The library model with `lora` added by hand, as core's LoRA loading adds it."""
    prefix = "diffusion_model."
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in lora.items():
            name = key[len(prefix):]
            if name.endswith(".lora_up.weight"):
                base = name[:-len(".lora_up.weight")]
                down = lora[key.replace("lora_up", "lora_down")]
                params[base + ".weight"] += strength * value @ down
            elif name.endswith(".diff"):
                params[name[:-len(".diff")] + ".weight"] += strength * value
            elif name.endswith(".diff_b"):
                params[name[:-len(".diff_b")] + ".bias"] += strength * value
    return model


def compare() -> dict:
    import torch

    hooks = load_host()
    import comfy.sd

    from moga.attention import MoGAConfig
    from moga.checkpoint import load_model
    from moga.checkpoint.router_file import read_routers
    from moga.host_patch import patch_from_routers
    from moga.testing import write_tiny_checkpoint

    apply_patch, counts = hooks.apply_patch, hooks.FAST_COUNTS
    g = torch.Generator().manual_seed(11)
    tmp = Path(tempfile.mkdtemp())
    out: dict = {"errors": {}, "counts": {}, "changes": {}}
    err = out["errors"]
    x = torch.randn(1, 16, 4, 8, 12, generator=g)       # 4 latent frames of 4 x 6 tokens
    ctx = torch.randn(1, 9, 4096, generator=g)
    ctx_padded = torch.cat([ctx, ctx.new_zeros(1, 512 - 9, 4096)], dim=1)
    sigma = torch.tensor([0.55])

    def run(patcher, x=x, **conds):
        return denoised(patcher, x, sigma, ctx_padded, **conds)

    def counted(name, fn):
        counts.clear()
        result = fn()
        out["counts"][name] = dict(counts)
        return result

    one = dict(groups=1, windowed=False, per_frame=False)
    moga_on = dict(fusion="mean", capacity=0.0)
    for kind, conf, seed in (("T2V", {}, 3), ("I2V", dict(in_dim=36, image_dim=1280), 4)):
        path = write_tiny_checkpoint(tmp / f"tiny_{kind}.safetensors", layout="comfyui", num_groups=4, seed=seed,
                                     **TINY, **conf)
        core = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
        out.setdefault("models", {})[kind] = f"{type(core.model).__name__} {core.model.diffusion_model.model_type}"
        routers = read_routers(path)
        conds, lib_kw = {}, {}
        if kind == "I2V":
            y = torch.randn(1, 20, 4, 8, 12, generator=g)            # 4 mask + 16 image-latent channels
            clip = torch.randn(1, 257, 1280, generator=g)
            conds, lib_kw = dict(c_concat=y, clip_fea=clip), dict(y=y, clip=clip)
        lora = _lora(kind, g, torch)
        lora_model, _ = comfy.sd.load_lora_for_models(core, None, lora, 0.8, 0.0)
        libs = {"": load_model(path, dtype=torch.float32).eval(),
                ", LoRA": _merge(load_model(path, dtype=torch.float32).eval(), lora, 0.8, torch)}
        plain_ref = None
        for tag, model in (("", core), (", LoRA", lora_model)):
            name = f"{kind}{tag}"
            ref = run(model, **conds)
            plain_ref = ref if plain_ref is None else plain_ref
            for fast in (True, False):
                path_name = "fused block" if fast else "core's block"
                got = counted(f"{name}, 1 group, {path_name}", lambda: run(apply_patch(
                    model, patch_from_routers(routers, **one), fast_block=fast), **conds))
                err[f"{name}, 1 group static off, {path_name} vs core"] = _rel(got, ref)
            patch = patch_from_routers(routers, **moga_on)
            with torch.inference_mode():
                v = libs[tag](x, sigma * 1000, ctx, moga=patch.config, **lib_kw)
            expect = x - sigma.view(1, 1, 1, 1, 1) * v          # core's CONST denoised: x - sigma * v
            fast_out = counted(f"{name}, MoGA, fused block", lambda: run(apply_patch(model, patch), **conds))
            core_out = run(apply_patch(model, patch, fast_block=False), **conds)
            err[f"{name}, MoGA on, fused block vs library"] = _rel(fast_out, expect)
            err[f"{name}, MoGA on, core's block vs library"] = _rel(core_out, expect)
            err[f"{name}, MoGA on, fused block vs core's block"] = _rel(fast_out, core_out)
            out["changes"][f"{name}: MoGA vs dense"] = _rel(fast_out, ref)
        out["changes"][f"{kind}: LoRA vs none"] = _rel(run(lora_model, **conds), plain_ref)
        # per-shot prompts (MoGA Shot Conditioning's model_conds): each shot's tokens see only their own text, and
        # on I2V every shot also sees the one CLIP image, as the library's per-shot cross-attention does
        shot_texts = [ctx, torch.randn(1, 5, 4096, generator=g)]
        pad = lambda c: torch.cat([c, c.new_zeros(1, 512 - c.shape[1], 4096)], dim=1)  # noqa: E731
        per_shot = {hooks.SHOT_CONTEXT_KEY: torch.stack([pad(c)[0] for c in shot_texts])[None],
                    hooks.SHOT_FRAMES_KEY: torch.tensor([[3, 1]], dtype=torch.long)}
        for setting, kw in (("dense", dict(dense_warmup=1.0)), ("MoGA", moga_on)):
            patch = patch_from_routers(routers, **kw)
            cfg = MoGAConfig(dense=True) if setting == "dense" else patch.config
            with torch.inference_mode():
                v = libs[""](x, sigma * 1000, shot_texts, shot_frames=[3, 1], moga=cfg, **lib_kw)
            expect = x - sigma.view(1, 1, 1, 1, 1) * v
            for fast in (True, False):
                got = run(apply_patch(core, patch, fast_block=fast), **conds, **per_shot)
                err[f"{kind}, per-shot prompts, {setting}, {'fused' if fast else 'core'} block vs library"] = \
                    _rel(got, expect)
        one_text = run(apply_patch(core, patch_from_routers(routers, dense_warmup=1.0)), **conds)
        out["changes"][f"{kind}: two shot prompts vs one"] = _rel(
            run(apply_patch(core, patch_from_routers(routers, dense_warmup=1.0)), **conds, **per_shot), one_text)
        if kind == "T2V":
            t2v, t2v_routers, t2v_ref = core, routers, plain_ref

    # a batch of two samples with their own prompts (a CFG batch: cond and uncond in one call)
    x2 = torch.randn(2, 16, 4, 8, 12, generator=g)
    ctx2 = torch.cat([ctx_padded, torch.cat([torch.randn(1, 5, 4096, generator=g), torch.zeros(1, 507, 4096)], 1)])
    sigma2 = torch.tensor([0.55, 0.55])
    got = counted("batch of 2", lambda: denoised(apply_patch(t2v, patch_from_routers(t2v_routers, **one)), x2, sigma2,
                                                  ctx2))
    err["batch of 2, own prompts, 1 group vs core"] = _rel(got, denoised(t2v, x2, sigma2, ctx2))

    # where the fused block steps aside: core's own block runs, counted with the reason, and the output is core's
    patch_one = patch_from_routers(t2v_routers, **one)
    ti2v_path = write_tiny_checkpoint(tmp / "tiny_ti2v.safetensors", layout="comfyui", num_groups=4, seed=5,
                                      in_dim=48, out_dim=48, **TINY)
    ti2v = comfy.sd.load_diffusion_model(str(ti2v_path), model_options={"dtype": torch.float32})
    x48 = torch.randn(1, 48, 4, 8, 12, generator=g)
    mask = torch.ones(1, 1, 4, 8, 12)
    mask[:, :, 0] = 0.0  # the first latent frame is given: timestep 0 there, one timestep per token
    ti2v_one = patch_from_routers(read_routers(ti2v_path), **one)
    for tag, kw in (("per-token timesteps", dict(denoise_mask=mask)), ("one timestep", {})):
        got = counted(f"TI2V-5B, {tag}", lambda: run(apply_patch(ti2v, ti2v_one), x=x48, **kw))
        err[f"TI2V-5B, {tag}, 1 group vs core"] = _rel(got, run(ti2v, x=x48, **kw))

    below_calls = []

    def passthrough(args, extra):
        below_calls.append(1)
        return extra["original_block"](args)
    below = t2v.clone()
    below.set_model_patch_replace(passthrough, "dit", "double_block", 1)
    got = counted("block replacement below", lambda: run(apply_patch(below, patch_one)))
    err["a block replacement below, 1 group vs core"] = _rel(got, t2v_ref)
    out["replacement below called"] = len(below_calls)

    attn1 = t2v.clone()
    attn1.set_model_attn1_patch(lambda d: d["x"] * 0.9)      # core 0.33 applies it, 0.3.64 has no such hook
    attn1_ref = run(attn1)
    got = counted("attn1_patch", lambda: run(apply_patch(attn1, patch_one)))
    err["attn1_patch, 1 group vs core with it"] = _rel(got, attn1_ref)
    out["changes"]["attn1_patch vs none"] = _rel(attn1_ref, t2v_ref)

    # norms with pending patches (what core's low-VRAM mode leaves on a module) run as core's modules
    dm = t2v.model.diffusion_model
    pending = [(dm.blocks[0].self_attn.norm_q, "weight_function", lambda w: w * 1.25),
               (dm.blocks[1].self_attn.norm_k, "weight_function", lambda w: w.flip(0)),
               (dm.blocks[1].norm3, "weight_function", lambda w: w * 0.5),
               (dm.blocks[2].norm3, "bias_function", lambda b: b + 0.3)]
    try:
        for module, attr, fn in pending:
            setattr(module, attr, [fn])
        patched_ref = run(t2v)
        got = counted("norms with weight patches", lambda: run(apply_patch(t2v, patch_one)))
        err["norms with pending weight patches, 1 group vs core with them"] = _rel(got, patched_ref)
        out["changes"]["norm weight patches vs none"] = _rel(patched_ref, t2v_ref)
        x_like = torch.zeros(1, 2, TINY["dim"])
        norm = dm.blocks[0].self_attn.norm_k
        plain = hooks._read_norm(norm, torch.nn.RMSNorm, x_like)
        norm._v = object()                                    # dynamic VRAM: core streams the weights itself
        out["norm reads"] = {"plain": plain is not None and torch.equal(plain.weight, norm.weight),
                             "with a weight_function": hooks._read_norm(dm.blocks[0].self_attn.norm_q,
                                                                        torch.nn.RMSNorm, x_like) is None,
                             "dynamic VRAM": hooks._read_norm(norm, torch.nn.RMSNorm, x_like) is None}
        del norm._v
    finally:
        for module, attr, _ in pending:
            module.__dict__.pop(attr, None)
    out["max"] = max(err.values())
    out["torch"] = torch.__version__
    out["comfyui"] = getattr(__import__("comfyui_version"), "__version__", "?")
    return out


def compare_kernels() -> dict:
    """The fused block with its Triton kernels (interpreted) against core's own block path, float32 and bf16."""
    import torch

    hooks = load_host()
    import comfy.sd

    from moga import fused
    from moga.checkpoint.router_file import read_routers
    from moga.host_patch import patch_from_routers
    from moga.testing import write_tiny_checkpoint

    fused.FUSE_ON_CPU = True
    g = torch.Generator().manual_seed(12)
    tmp = Path(tempfile.mkdtemp())
    out: dict = {"errors": {}, "bf16": {}, "counts": {}}
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    ctx = torch.cat([torch.randn(1, 7, 4096, generator=g), torch.zeros(1, 505, 4096)], dim=1)
    sigma = torch.tensor([0.6])
    for kind, conf in (("T2V", {}), ("I2V", dict(in_dim=36, image_dim=1280))):
        path = write_tiny_checkpoint(tmp / f"{kind}.safetensors", layout="comfyui", num_groups=4, seed=6, **TINY,
                                     **conf)
        routers = read_routers(path)
        conds = {}
        if kind == "I2V":
            conds = dict(c_concat=torch.randn(1, 20, 3, 4, 6, generator=g),
                         clip_fea=torch.randn(1, 257, 1280, generator=g))
        exact = {}
        for dtype in (torch.float32, torch.bfloat16):
            core = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
            if dtype == torch.bfloat16:  # on a CPU core computes a bf16 file in float32: make it compute in bf16, as
                core.model.manual_cast_dtype = None  # a GPU does (the residual, e and every activation in bf16)
            for setting, kw in (("1 group", dict(groups=1, windowed=False, per_frame=False)),
                                ("MoGA", dict(fusion="lse", capacity=1.0))):
                patch = patch_from_routers(routers, **kw)
                hooks.FAST_COUNTS.clear()
                got = denoised(hooks.apply_patch(core, patch), x, sigma, ctx, **conds)
                out["counts"][f"{kind} {dtype} {setting}"] = dict(hooks.FAST_COUNTS)
                want = denoised(hooks.apply_patch(core, patch, fast_block=False), x, sigma, ctx, **conds)
                name = f"{kind}, {setting}"
                if dtype == torch.float32:
                    out["errors"][f"{name}, fused kernels vs core's block"] = _rel(got, want)
                    exact[setting] = want
                else:  # each bf16 path against float32 (Triton's interpreter truncates to bf16 where a GPU rounds)
                    out["bf16"][f"{name}: fused kernels vs core's block"] = _rel(got, want)
                    out["bf16"][f"{name}: fused kernels vs float32"] = _rel(got, exact[setting])
                    out["bf16"][f"{name}: core's block vs float32"] = _rel(want, exact[setting])
    out["max"] = max(out["errors"].values())
    return out


def test_fused_block_matches_core_and_steps_aside_where_it_must():
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip("set COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its python) to test the fused block on "
                    "core's own Wan model; CI builds them with comfy-host.sh")
    proc = subprocess.run([python, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max"] < TOLERANCE, report
    assert report["models"] == {"T2V": "WAN21 t2v", "I2V": "WAN21 i2v"}, report
    counts, every = report["counts"], {"fast": LAYERS}
    for kind in ("T2V", "I2V"):
        for tag in ("", ", LoRA"):
            assert counts[f"{kind}{tag}, 1 group, fused block"] == every, counts
            assert counts[f"{kind}{tag}, 1 group, core's block"] == {}, counts
            assert counts[f"{kind}{tag}, MoGA, fused block"] == every, counts
    # what is compared really differs: MoGA from dense, a LoRA from none, the patches from none
    assert all(v > 1e-3 for k, v in report["changes"].items() if k != "attn1_patch vs none"), report
    old_core = tuple(int(p) for p in report["comfyui"].split(".")[:2]) < (0, 4)  # 0.3.x has no attn1_patch hook
    assert (report["changes"]["attn1_patch vs none"] == 0.0) if old_core else (
        report["changes"]["attn1_patch vs none"] > 1e-3), report
    per_frame = counts["TI2V-5B, per-token timesteps"]
    assert list(per_frame) == [next(iter(per_frame))] and "per-frame modulation" in next(iter(per_frame)), counts
    assert sum(per_frame.values()) == LAYERS and counts["TI2V-5B, one timestep"] == every, counts
    assert counts["block replacement below"] == {"fast": LAYERS - 1,
                                                 "core block: another block replacement below MoGA's": 1}, counts
    assert report["replacement below called"] == 1, report
    assert counts["attn1_patch"] == {"core block: attn1_patch / attn2_patch patches are set": LAYERS}, counts
    assert counts["norms with weight patches"] == every and counts["batch of 2"] == every, counts
    assert report["norm reads"] == {"plain": True, "with a weight_function": True, "dynamic VRAM": True}, report


def test_fused_block_kernels_on_core_model():
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set COMFYUI_PATH, COMFYUI_PYTHON (a ComfyUI host whose python has Triton) and TRITON_INTERPRET=1 "
                    "to run the fused block's kernels on core's own model on a CPU")
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--kernels"], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": ""}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max"] < TOLERANCE, report
    bf16 = report["bf16"]
    assert max(bf16.values()) < 2e-2 and min(bf16.values()) > 0, report   # bf16: they round differently, no more
    for name in {k.split(":")[0] for k in bf16}:  # as close to float32 as core's own bf16 block, give or take
        assert bf16[f"{name}: fused kernels vs float32"] <= 2 * bf16[f"{name}: core's block vs float32"], report
    assert all(c == {"fast": LAYERS} for c in report["counts"].values()), report


if pytest is not None:
    test_fused_block_matches_core_and_steps_aside_where_it_must = pytest.mark.integration(
        test_fused_block_matches_core_and_steps_aside_where_it_must)
    test_fused_block_kernels_on_core_model = pytest.mark.integration(test_fused_block_kernels_on_core_model)

if __name__ == "__main__":
    print(json.dumps(compare_kernels() if "--kernels" in sys.argv else compare()))
