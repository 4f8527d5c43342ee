"""One DiT step through core's own Wan model patched by MoGA Patch Model vs the library's own model. Table + JSON.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/patch_path.py              # CUDA: 14B, 262,080 tokens
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/patch_path.py --core-dense # + core's own dense attention
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/patch_path.py --sol        # + core's model under Sol-Attn
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/patch_path.py --smoke      # tiny, on the CPU: every code path

Rows: the library; the patched core model as MoGA Patch Model runs it (its fused block, moga.host_block, on core's
modules); the same patch on core's own blocks (`apply_patch(fast_block=False)`: core's block with the attention
hooks, the path before the fused block; `--no-fast-block` times only this one). The JSON records, per patched row,
how many block calls took the fused block and why any did not (nodes/patch_hooks.FAST_COUNTS).

--sol: core's Model Sparse Attention node (comfy_extras/nodes_sparse_attention.py) is in neither vendored ComfyUI
(0.3.64, 0.33.0), and upstream's needs core modules newer than both; so this row puts on core's model what that
node's generic path installs, an `optimized_attention_override` that sends each self-attention call (q, k, v of
one shape, head_dim 128, CUDA) to comfy-kitchen's public `sol_attn` at the node's defaults (tau 1.3, 256 extra
tokens) and every other call to core's attention. The timed sigma (0.7) is past its dense first 20% of sigmas.

Both paths hold the same tensors: the library's random bf16 14B (moga.model.WanModel, routers calibrated as
`moga patch` does: k-means, fusion lse, capacity 1, M groups) and core's comfy.ldm.wan.model.WanModel built on the
meta device and assigned the library's weights (no second copy). The patched core model runs through core's
BaseModel.apply_model with the wrappers and block replacements nodes/patch_hooks.py installs (what KSampler runs),
with the same MoGAConfig and varlen backend as the library. 168 latent frames of 30 x 52 tokens (832x480) in 8
shots of 21 = 262,080 tokens, one umT5-shaped prompt, cfg 1 (one pass a step). Time: a warm-up call, then the
median of --repeats timed calls (torch.cuda.synchronize around each). Peak: torch.cuda.max_memory_allocated over a
call (weights included). The target (issue 23): the patch path within 10% of the library path.

Needs ComfyUI's `comfy` package importable (COMFYUI_PATH, a checkout or the vendored tarball unpacked) and, beyond
torch, the packages its model code imports: see docs/comfyui-patch.md ("GPU benchmark").
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

TINY = dict(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=4096, freq_dim=256)  # core reads heads = dim/128
LIBRARY_ROW = "library (moga.model)"
FAST_ROW = "core + MoGA Patch Model"                       # what the node runs: the fused block
CORE_BLOCK_ROW = "core + MoGA Patch Model, core's block"   # the same patch on core's own blocks (fast_block=False)


def import_comfy(path: str):
    if not path or not os.path.isfile(os.path.join(path, "comfy", "ldm", "wan", "model.py")):
        sys.exit(f"COMFYUI_PATH={path!r} holds no ComfyUI (comfy/ldm/wan/model.py): pass --comfyui PATH")
    sys.path.insert(0, path)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("moga_patch_hooks", os.path.join(ROOT, "nodes", "patch_hooks.py"))
    hooks = sys.modules["moga_patch_hooks"] = importlib.util.module_from_spec(spec)  # ComfyUI has its own `nodes`
    spec.loader.exec_module(hooks)
    return hooks


def core_model_sharing(lib, device):
    """core's WAN21 BaseModel + ModelPatcher whose diffusion model holds the library model's tensors."""
    import comfy.model_patcher
    import comfy.supported_models

    c = lib.config
    unet_config = dict(image_model="wan2.1", model_type="t2v", dim=c.dim, ffn_dim=c.ffn_dim, num_heads=c.num_heads,
                       num_layers=c.num_layers, in_dim=c.in_dim, out_dim=c.out_dim, patch_size=c.patch_size,
                       freq_dim=c.freq_dim, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=c.eps)
    mc = comfy.supported_models.WAN21_T2V(unet_config)
    mc.set_inference_dtype(lib.dtype, None)
    base = mc.get_model({}, device="meta")
    sd = {k: v for k, v in lib.state_dict().items() if ".router." not in k}
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].float()  # core keeps its patch embedding float32
    sd["patch_embedding.bias"] = sd["patch_embedding.bias"].float()
    missing, unexpected = base.diffusion_model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"core's Wan and the library's disagree on tensors: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


SOL_TAU, SOL_EXTRA = 1.3, 256  # core's Model Sparse Attention defaults


def sol_patched(core):
    """A clone of core's patcher under Sol-Attn as core's node installs it on generic models (see --sol), or
    (None, why) when comfy-kitchen's kernel cannot run here."""
    try:
        import comfy_kitchen as ck
    except Exception as e:  # noqa: BLE001 - any import failure: not usable here
        return None, f"comfy-kitchen is not importable ({type(e).__name__}: {e})"
    dev = core.load_device
    if dev.type != "cuda" or not ck.sol_attn_is_available(dev):
        return None, "comfy-kitchen's sol_attn kernel does not run on this device"

    def override(func, q, k, v, heads, *a, **kw):
        plain = not kw.get("skip_reshape", False) and kw.get("mask") is None
        if not (plain and q.shape == k.shape == v.shape and q.shape[-1] // heads == 128):
            return func(q, k, v, heads, *a, **kw)
        b, n, hd = q.shape
        qs, ks, vs = (t.view(b, n, heads, hd // heads) for t in (q, k, v))
        out = ck.sol_attn(qs, ks, vs, tau=SOL_TAU, token_aug=SOL_EXTRA).to(q.dtype)
        if kw.get("skip_output_reshape", False):
            return out.transpose(1, 2)
        return out.reshape(b, n, hd)

    m = core.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m, ""


def timed(fn, device, repeats):
    fn()  # warm-up: kernels, index caches, rope
    times, peak = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), peak / 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--model", choices=("14B", "1.3B"), default="14B")
    ap.add_argument("--frames", type=int, default=168, help="latent frames (168 x 30 x 52 = 262,080 tokens)")
    ap.add_argument("--shot-frames", type=int, default=21)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--capacity", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--core-dense", action="store_true", help="also time core's own (unpatched) dense attention")
    ap.add_argument("--sol", action="store_true", help="also time core's model under Sol-Attn (see above)")
    ap.add_argument("--no-fast-block", action="store_true",
                    help="patch path on core's own blocks only (no fused-block row)")
    ap.add_argument("--json", default="benchmarks/results/patch_path.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    args = ap.parse_args(argv)
    hooks = import_comfy(args.comfyui)

    from common import FRAME, WAN_CONFIGS, build_random_model
    from dit import calibrate

    from moga.attention import MoGAConfig
    from moga.attention.kernels import resolve_backend
    from moga.checkpoint.router_file import RouterSet
    from moga.host_patch import patch_from_routers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec, frame, frames, shot = (TINY, (4, 6), 6, 3) if args.smoke else \
        (WAN_CONFIGS[args.model], FRAME, args.frames, args.shot_frames)
    shots = [shot] * (frames // shot) + ([frames % shot] if frames % shot else [])
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype), varlen_backend=resolve_backend("auto", device, dtype),
                model="tiny" if args.smoke else args.model, tokens=frames * frame[0] * frame[1], shots=shots,
                groups=args.groups, capacity=args.capacity, command=" ".join(sys.argv),
                comfyui=getattr(__import__("comfyui_version"), "__version__", "?"))
    print(f"# {info['device']}, torch {torch.__version__}, ComfyUI {info['comfyui']}, varlen {info['varlen_backend']}, "
          f"{info['tokens']:,} tokens", flush=True)

    lib = build_random_model(spec, args.groups, device, dtype)
    calibrate(lib, args.groups, frame)
    moga = MoGAConfig(num_groups=args.groups, window=(0, 2, 2), fusion="lse", capacity=args.capacity)
    routers = RouterSet({i: b.self_attn.router.weight for i, b in enumerate(lib.blocks)}, moga, 0.0, None, "calibrated")
    core = core_model_sharing(lib, device)
    patch = patch_from_routers(routers)
    variants = [(CORE_BLOCK_ROW, False)] if args.no_fast_block else [(FAST_ROW, True), (CORE_BLOCK_ROW, False)]
    patched = {name: hooks.apply_patch(core, patch, shot_frames=shots, fast_block=fast) for name, fast in variants}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.get("in_dim", 16), frames, frame[0] * 2, frame[1] * 2, generator=g).to(device, dtype)
    ctx = (torch.randn(1, 512, spec.get("text_dim", 4096), generator=g) * 0.1).to(device, dtype)
    sigma = torch.tensor([0.7], device=device)

    def core_call(m):
        to = dict(m.model_options["transformer_options"], wrappers=m.wrappers)
        return lambda: m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)

    def lib_call():
        v = lib(x, sigma * 1000, ctx, shot_frames=shots, moga=moga)
        return x.float() - sigma.view(1, 1, 1, 1, 1) * v.float()  # core's denoised, to compare outputs

    rows, calls = {}, {}
    with torch.inference_mode():
        runs = [(LIBRARY_ROW, lib_call)] + [(name, core_call(m)) for name, m in patched.items()]
        if args.core_dense:
            runs.append(("core, dense (no patch)", core_call(core)))
        if args.sol:
            sol, why = sol_patched(core)
            if sol is None:
                info["sol_skipped"] = why
                print(f"# Sol-Attn row skipped: {why}", flush=True)
            else:
                runs.append((f"core + Sol-Attn (tau {SOL_TAU}, +{SOL_EXTRA} tokens)", core_call(sol)))
        outs = {}
        for name, fn in runs:
            hooks.FAST_COUNTS.clear()
            out, seconds, peak = timed(fn, device, args.repeats)
            outs[name] = out.float()
            rows[name] = dict(seconds=seconds, peak_gib=peak)
            if name in patched:
                calls[name] = dict(hooks.FAST_COUNTS)
            print(f"{name}: {seconds:.2f} s, peak {peak:.1f} GiB", flush=True)
    info["rows"] = rows
    info["fast_block_calls"] = calls
    lib_out, lib_s = outs[LIBRARY_ROW], rows[LIBRARY_ROW]["seconds"]
    for name, key in ((FAST_ROW, "patch"), (CORE_BLOCK_ROW, "patch_core_block")):
        if name in outs:
            info[f"{key}_vs_library_rel_err"] = float((outs[name] - lib_out).abs().max() / lib_out.abs().max())
            info[f"{key}_over_library"] = rows[name]["seconds"] / lib_s
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"\n| path | step (s) | peak (GiB) |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_gib']:.1f} |")
    for name, key in ((FAST_ROW, "patch"), (CORE_BLOCK_ROW, "patch_core_block")):
        if name in outs:
            print(f"\n{name} / library: {info[key + '_over_library']:.3f} (target <= 1.10); outputs differ by "
                  f"{info[key + '_vs_library_rel_err']:.2e} (max rel, {dtype})")
    stepped_aside = {k: v for k, v in calls.get(FAST_ROW, {}).items() if k != "fast"}
    if stepped_aside:
        print(f"WARNING: the fused block stepped aside in some blocks: {stepped_aside}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
