"""How a `moga.host_patch.HostPatch` enters ComfyUI's own Wan model (protocol glue, no maths).

Why these hooks (the same in ComfyUI 0.3.64 and 0.33.0):
- `patches_replace["dit"][("double_block", i)]`: a per-clone block replacement. It still runs core's own block
  (`extra["original_block"]`), so modulation, norms, cross-attention, FFN, and the block's q/k/v/o and qk-norm
  modules with their casting (fp8, scaled fp8, GGUF), LoRA weight patches and offloading are all core's. Inside
  it the self-attention's input is caught (a forward pre-hook on `block.self_attn`, removed when the block
  returns) and an `optimized_attention_override` is put into that block's transformer_options: the first
  attention call after the hook fired is the self-attention (core calls it with the already projected,
  normed, RoPE'd q, k, v); MoGA answers it. Every other call (cross-attention) goes to the override that was
  there before, or core's own attention, so another attention patch (SageAttention, a sparse attention node)
  keeps working under it.
- an APPLY_MODEL wrapper: it sees the sigma and the latent before the model, maps the dense warm-up share to a
  sigma with the model's own (possibly ModelSamplingSD3-patched) `model_sampling.percent_to_sigma`, as core's
  start_percent, and puts this call's state (layout, dense or not, the blocks) into a copy of
  transformer_options. Core 0.3.64 has no `grid_sizes` / `block_index` in transformer_options; this works on both.
- per-shot prompts (MoGA Shot Conditioning puts each shot's text and latent frames into the CONDITIONING's
  model_conds; core hands them to apply_model as keyword arguments): the wrapper takes them out, embeds each
  shot's text with core's own `text_embedding`, and in every block the text cross-attention call is answered
  shot by shot (each shot's tokens against its own prompt, through the block's own k/v modules and the
  attention below), as moga.model does. The shot lengths also cut MoGA's window groups at the shots.
- an ON_CLEANUP callback drops the routers' device copies when sampling ends. Nothing else outlives a call:
  the override and the hook exist only while one block runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

STATE_KEY = "moga_patch"        # transformer_options: this call's _CallState
# model_conds keys the shot conditioning node adds (core hands them to apply_model as keyword arguments):
SHOT_CONTEXT_KEY = "moga_shot_context"  # [B, S, L, text_dim]: the text embedding of each shot
SHOT_FRAMES_KEY = "moga_shot_frames"    # [B, S] long: latent frames of each shot
WRAPPER_KEY = "moga_patch"
SUPPORTED = "comfy.ldm.wan.model.WanModel (Wan2.1 T2V/I2V/FLF/Fun 1.3B/14B, Wan2.2 A14B T2V/I2V experts, TI2V-5B)"


class PatchError(ValueError):
    pass


@dataclass
class _CallState:
    patch: Any
    layout: Any
    dense: bool
    blocks: Any
    shot_context: Any = None  # per shot: the embedded text [B, L, dim] (core's own text_embedding), or None


def patchable_model(model_patcher):
    """The diffusion model of `model_patcher` when MoGA can patch it, else PatchError naming the model."""
    import comfy.ldm.wan.model as wan

    dm = model_patcher.get_model_object("diffusion_model")
    kind = type(model_patcher.model).__name__
    if type(dm) is not wan.WanModel:
        why = ("its blocks see extra tokens beside the video's (reference, audio, pose or motion latents), which "
               "MoGA's groups and windows cannot place" if "wan" in type(dm).__module__ else
               "it is not a Wan video model")
        raise PatchError(f"MoGA Patch Model cannot patch this model ({kind}, diffusion model "
                         f"{type(dm).__module__}.{type(dm).__name__}): {why}. It patches {SUPPORTED}; remove the node "
                         f"for this model")
    return dm


def _weight_getter(dm):
    """name -> the model's float weight (fp8 scaled, core's quantised tensors dequantised where they can be)."""
    import torch

    def get(name):
        module_name, _, leaf = name.rpartition(".")
        try:
            module = dm.get_submodule(module_name)
        except AttributeError:
            raise KeyError(name) from None
        w = getattr(module, leaf, None)
        if w is None:
            raise KeyError(name)
        if type(w) not in (torch.Tensor, torch.nn.Parameter) and hasattr(w, "dequantize"):
            w = w.dequantize()  # core's quantised tensors (comfy-kitchen's QuantizedTensor in 0.33: scaled fp8)
        w = w.detach().float()
        scale = getattr(module, "scale_weight", None)
        return w * scale.float().to(w.device) if isinstance(scale, torch.Tensor) else w
    return get


def check_fingerprint(routers, dm, model_name: str) -> str:
    """Compare the routers' base with the model's weights; logs a warning naming both when they differ."""
    from moga.checkpoint.router_file import compare_fingerprint
    try:
        verdict, why = compare_fingerprint(routers.fingerprint, _weight_getter(dm))
    except Exception as e:  # a quantisation we cannot read back (e.g. GGUF): say so, do not block
        verdict, why = "unknown", f"the model's weights could not be read back ({type(e).__name__}: {e})"
    base = (routers.fingerprint or {}).get("source", "an unknown model")
    if verdict == "different":
        logging.warning("MoGA Patch Model: routers %s were made for %s, but they are applied to %s, whose weights "
                        "differ (%s). Calibrate routers for this model (`python -m moga patch MODEL --routers-out "
                        "FILE`) or load the routers made for it.", routers.name, base, model_name, why)
    elif verdict == "unknown":
        logging.info("MoGA Patch Model: could not check that %s fits %s: %s", routers.name, model_name, why)
    return verdict


def apply_patch(model_patcher, patch, shot_frames=None):
    """A clone of `model_patcher` whose Wan blocks in `patch.layers` run MoGA self-attention."""
    dm = patchable_model(model_patcher)
    patch.check_model(int(dm.dim), len(dm.blocks), type(model_patcher.model).__name__)
    m = model_patcher.clone()
    import comfy.patcher_extension as ext

    dit = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for i in range(len(dm.blocks)):  # every block: per-shot prompts reach the layers MoGA does not route too
        previous = dit.get(("double_block", i))
        previous = getattr(previous, "moga_previous", previous)  # a second MoGA patch replaces the first
        m.set_model_patch_replace(_block_replacement(i, previous), "dit", "double_block", i)
    m.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper(patch, shot_frames))
    m.remove_callbacks_with_key(ext.CallbacksMP.ON_CLEANUP, WRAPPER_KEY)
    m.add_callback_with_key(ext.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, lambda patcher: patch.release())
    return m


def _apply_model_wrapper(patch, shot_frames):
    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        base = executor.class_obj
        dm = base.diffusion_model
        if x.dim() != 5:
            raise PatchError(f"MoGA Patch Model: the latent is {tuple(x.shape)}, not a video [B, C, T, H, W]")
        shot_context = kwargs.pop(SHOT_CONTEXT_KEY, None)
        shots_given = kwargs.pop(SHOT_FRAMES_KEY, None)
        shots = [int(s) for s in shots_given[0].tolist()] if shots_given is not None else shot_frames
        if shots and dm.patch_size[0] != 1:
            shots = [s // dm.patch_size[0] for s in shots]
        warm_sigma = float(base.model_sampling.percent_to_sigma(patch.dense_warmup))
        grid = tuple(math.ceil(s / p) for s, p in zip(x.shape[2:], dm.patch_size))
        layout = patch.layout(grid, shots)
        embedded = None
        if shot_context is not None:
            if kwargs.get("clip_fea") is not None:
                raise PatchError("MoGA Patch Model: per-shot prompts with an image cross-attention (Wan2.1 I2V / FLF "
                                 "clip vision input) are not supported yet: use one prompt (core's text encode) for "
                                 "this model")
            if shot_context.shape[1] != layout.num_shots:
                raise PatchError(f"MoGA Patch Model: {shot_context.shape[1]} shot prompts for {layout.num_shots} shots")
            dtype = base.manual_cast_dtype or base.get_dtype()
            embedded = [dm.text_embedding(shot_context[:, s].to(x.device, dtype)) for s in range(layout.num_shots)]
        state = _CallState(patch, layout, patch.dense_at(float(t.max()), warm_sigma), dm.blocks, embedded)
        to = {**transformer_options, STATE_KEY: state}
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    return wrapper


def _block_replacement(i, previous):
    def replace(args, extra):
        inner = (lambda a: previous(a, extra)) if previous is not None else extra["original_block"]
        to = args["transformer_options"]
        state = to.get(STATE_KEY)
        moga = state is not None and not state.dense and state.patch.runs_layer(i)
        per_shot = state is not None and state.shot_context is not None
        if not (moga or per_shot):
            return inner(args)
        seen = {}
        below = to.get("optimized_attention_override")

        def attention(func, q, k, v, *a, **kw):
            return below(func, q, k, v, *a, **kw) if below is not None else func(q, k, v, *a, **kw)

        def capture(module, inputs):
            seen["x"] = inputs[0]

        def override(func, *a, **kw):
            x = seen.pop("x", None)  # set: this is the block's self-attention (the hook fired just before it)
            plain = kw.get("mask") is None and not kw.get("skip_reshape", False)
            if x is not None and moga and plain:
                heads = kw["heads"] if "heads" in kw else a[3]
                out = state.patch.attend(i, a[0], a[1], a[2], heads, x, state.layout)
                if kw.get("skip_output_reshape", False):
                    b, n, hd = out.shape
                    out = out.view(b, n, heads, hd // heads).transpose(1, 2)
                return out
            if x is None and per_shot and plain and a[0].shape[1] == state.layout.num_tokens:
                return _per_shot_cross(func, attention, state, state.blocks[i].cross_attn, a, kw)
            return attention(func, *a, **kw)

        handle = state.blocks[i].self_attn.register_forward_pre_hook(capture)
        try:
            return inner({**args, "transformer_options": {**to, "optimized_attention_override": override}})
        finally:
            handle.remove()

    replace.moga_previous = previous
    return replace


def _per_shot_cross(func, attention, state, cross, a, kw):
    """Text cross-attention with each shot's tokens against that shot's prompt only: the block's own k/v
    projections (core's modules) on each shot's embedded text."""
    import torch

    q, rest = a[0], a[3:]
    outs = []
    for s, (lo, hi) in enumerate(state.layout.shot_token_ranges):
        ctx = state.shot_context[s]
        k = cross.norm_k(cross.k(ctx))
        v = cross.v(ctx)
        outs.append(attention(func, q[:, lo:hi].contiguous(), k, v, *rest, **kw))
    return torch.cat(outs, dim=1)
