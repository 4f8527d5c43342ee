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

The fast block (the default; `apply_patch(..., fast_block=False)` keeps the path above for every block): where
MoGA or the per-shot prompts run, the replacement runs core's block itself as `moga.host_block.forward`, which
fuses the elementwise work around core's modules (modulation + norm + cast, q/k RMSNorm + RoPE, each residual
update with the next norm). Everything that holds weights is still core's module, called as core calls it: the
q/k/v/o projections, the whole cross-attention (with the attention override below, per-shot prompts through
their override as above), the FFN; the modulation is cast with core's cast_to, as core does. A norm's weights
are read (cast_to) only when core itself would use them as they are: a plain tensor on the device, no pending
weight_function / bias_function (LoRA patches in low-VRAM mode), no dynamic-VRAM streaming; any other norm runs
as core's module. Anything it does not recognise runs core's own block through the hooks above, counted in
FAST_COUNTS with the reason: a block or attention class or forward signature this pack was not checked against,
a forward replaced on the instance, attn1/attn2 patches, another block replacement below MoGA's, per-frame
modulation (TI2V-5B's per-token timesteps), qk-norm off, a residual dtype or a RoPE layout it does not know, or
tokens besides the latent's.
"""
from __future__ import annotations

import collections
import inspect
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
# block calls by path: "fast" (moga.host_block) or "core block: <why>" (tests and benchmarks read it)
FAST_COUNTS: collections.Counter = collections.Counter()
# the forward signatures of the core code the fast block was checked against (ComfyUI 0.3.64 and 0.33.0)
KNOWN_SIGNATURES = {
    "WanAttentionBlock": ("self", "x", "e", "freqs", "context", "context_img_len", "transformer_options"),
    "WanSelfAttention": ("self", "x", "freqs", "transformer_options")}


class PatchError(ValueError):
    pass


@dataclass
class _CallState:
    patch: Any
    layout: Any
    dense: bool
    blocks: Any
    shot_context: Any = None  # per shot: the embedded text [B, L, dim] (core's own text_embedding), or None
    context_img_len: Any = None  # what core's forward hands its blocks: the CLIP tokens' count, or None
    rope: Any = None  # (core's freqs, its complex form) for the fast block, made once per call


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


def apply_patch(model_patcher, patch, shot_frames=None, fast_block=True):
    """A clone of `model_patcher` whose Wan blocks in `patch.layers` run MoGA self-attention (`fast_block`: through
    moga.host_block where it applies, else core's own block with the attention hooks)."""
    dm = patchable_model(model_patcher)
    patch.check_model(int(dm.dim), len(dm.blocks), type(model_patcher.model).__name__)
    m = model_patcher.clone()
    import comfy.patcher_extension as ext

    dit = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for i in range(len(dm.blocks)):  # every block: per-shot prompts reach the layers MoGA does not route too
        previous = dit.get(("double_block", i))
        previous = getattr(previous, "moga_previous", previous)  # a second MoGA patch replaces the first
        m.set_model_patch_replace(_block_replacement(i, previous, fast_block), "dit", "double_block", i)
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
            if shot_context.shape[1] != layout.num_shots:
                raise PatchError(f"MoGA Patch Model: {shot_context.shape[1]} shot prompts for {layout.num_shots} shots")
            dtype = base.manual_cast_dtype or base.get_dtype()
            embedded = [dm.text_embedding(shot_context[:, s].to(x.device, dtype)) for s in range(layout.num_shots)]
        clip = kwargs.get("clip_fea")
        state = _CallState(patch, layout, patch.dense_at(float(t.max()), warm_sigma), dm.blocks, embedded,
                           context_img_len=clip.shape[-2] if clip is not None else None)
        to = {**transformer_options, STATE_KEY: state}
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    return wrapper


def _block_replacement(i, previous, fast_block=True):
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

        if fast_block:
            why = "another block replacement below MoGA's" if previous is not None else None
            out = why or _fast_block(i, args, state, to, moga, per_shot, attention)
            if not isinstance(out, str):
                return {"img": out}
            _count_core_block(out)

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
                return shot_cross(func, attention, a, kw)
            return attention(func, *a, **kw)

        shot_cross = _ShotCross(state, state.blocks[i].cross_attn) if per_shot else None
        handle = state.blocks[i].self_attn.register_forward_pre_hook(capture)
        try:
            return inner({**args, "transformer_options": {**to, "optimized_attention_override": override}})
        finally:
            handle.remove()

    replace.moga_previous = previous
    return replace


class _ShotCross:
    """One block call's cross-attention, answered shot by shot for the text. Wan2.1 I2V / FLF's cross-attention
    (core's WanI2VCrossAttention, 0.3.64 and 0.33.0) calls attention twice: the CLIP image tokens first, shared by
    every shot (the library's per-shot image embedding is one tensor here), then the text, per shot."""

    def __init__(self, state, cross):
        import comfy.ldm.wan.model as wan

        self.state, self.cross = state, cross
        self.image_pending = isinstance(cross, wan.WanI2VCrossAttention) and state.context_img_len is not None

    def __call__(self, func, attention, a, kw):
        if self.image_pending:
            self.image_pending = False
            if a[1].shape[1] != self.state.context_img_len:
                raise PatchError(
                    f"MoGA Patch Model: this ComfyUI's image cross-attention first attends {a[1].shape[1]} keys, not "
                    f"the {self.state.context_img_len} CLIP image tokens (ComfyUI 0.3.64 and 0.33.0 attend the image "
                    "first): per-shot prompts cannot be placed here; use one prompt (core's text encode)")
            return attention(func, *a, **kw)
        return _per_shot_cross(func, attention, self.state, self.cross, a, kw)


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


_LOGGED: set = set()
_SIGNATURES_CHECKED: list = []  # [None] when core's forwards are the known ones, else [the reason]


def _count_core_block(why):
    FAST_COUNTS[f"core block: {why}"] += 1
    if why not in _LOGGED:
        _LOGGED.add(why)
        logging.info("MoGA Patch Model: core's own block runs (without the fused elementwise work) where %s", why)


def _unknown_signatures(wan):
    if not _SIGNATURES_CHECKED:
        why = None
        for name, want in KNOWN_SIGNATURES.items():
            got = tuple(inspect.signature(getattr(wan, name).forward).parameters)
            if got != want:
                why = f"core's {name}.forward{got} is not one this pack was checked against"
        _SIGNATURES_CHECKED.append(why)
    return _SIGNATURES_CHECKED[0]


def _read_norm(module, kind, x):
    """moga.host_block.NormWeights of a norm core would apply with its weights as they are (plain tensors on x's
    device, nothing pending, no dynamic-VRAM streaming), cast as core casts them; None: run core's module."""
    import torch
    from comfy.model_management import cast_to
    from moga.host_block import NormWeights

    if (not isinstance(module, kind) or getattr(module, "weight_function", None)
            or getattr(module, "bias_function", None) or hasattr(module, "_v")
            or not isinstance(module.eps, float) or tuple(module.normalized_shape) != (x.shape[-1],)):
        return None
    tensors = (module.weight, module.bias) if kind is torch.nn.LayerNorm else (module.weight,)
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == x.device for t in tensors):
        return None
    cast = [cast_to(t, dtype=x.dtype, device=x.device) for t in tensors]
    return NormWeights(cast[0], cast[1] if len(cast) > 1 else None, module.eps)


def _fast_block(i, args, state, to, moga, per_shot, attention):
    """Run core's block i as moga.host_block.forward and return its output, or return why it does not apply
    (a str; nothing has run then)."""
    import torch
    import comfy.ldm.wan.model as wan
    from comfy.model_management import cast_to
    from moga import fused, host_block

    why = _unknown_signatures(wan)
    if why:
        return why
    block = state.blocks[i]
    sa, ca = block.self_attn, block.cross_attn
    if type(block) is not wan.WanAttentionBlock or type(sa) is not wan.WanSelfAttention or type(ca) not in (
            wan.WanT2VCrossAttention, wan.WanI2VCrossAttention):
        return f"the block is a {type(block).__name__} with {type(sa).__name__} / {type(ca).__name__}"
    if any("forward" in vars(m) for m in (block, sa, ca)):
        return "a block's forward is replaced on the instance"
    patches = to.get("patches") or {}
    if patches.get("attn1_patch") or patches.get("attn2_patch"):
        return "attn1_patch / attn2_patch patches are set"
    x, e, freqs, context = args.get("img"), args.get("vec"), args.get("pe"), args.get("txt")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in fused.RESIDUAL_DTYPES:
        return f"the residual is {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
    b, n, dim = x.shape
    if n != state.layout.num_tokens:
        return "the blocks see tokens besides the latent's"
    if isinstance(e, torch.Tensor) and e.dim() == 4 and e.shape[1] == 1:
        e = e[:, 0]
    if not isinstance(e, torch.Tensor) or tuple(e.shape) != (b, 6, dim) or e.dtype != x.dtype:
        shape = tuple(getattr(e, "shape", ()))
        kind = "per-frame modulation" if len(shape) == 4 else "modulation"
        return f"{kind} e {shape} {getattr(e, 'dtype', '')} (the fast block takes one [batch, 6, dim] in x's dtype)"
    if tuple(block.modulation.shape) != (1, 6, dim) or sa.dim != dim or dim % sa.num_heads:
        return "the block's shapes are not Wan's"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not isinstance(norm, torch.nn.LayerNorm) or norm.weight is not None or norm.bias is not None:
            return f"{name} is not a LayerNorm without weights"
    if isinstance(sa.norm_q, torch.nn.Identity) or isinstance(sa.norm_k, torch.nn.Identity):
        return "the self-attention has no qk-norm"
    if state.rope is None or state.rope[0] is not freqs:
        state.rope = (freqs, host_block.rope_from_rotations(freqs, n, dim // sa.num_heads))
    rope = state.rope[1]
    if rope is None:
        return f"RoPE freqs {tuple(getattr(freqs, 'shape', ()))} are not core's rotations of every token"

    def read_or_module(norm, kind):
        return _read_norm(norm, kind, x) or norm

    norm3 = None if isinstance(block.norm3, torch.nn.Identity) else read_or_module(block.norm3, torch.nn.LayerNorm)
    cross_to = to
    if per_shot:
        shot_cross = _ShotCross(state, ca)

        def cross_override(func, *a, **kw):  # every shot's tokens against its own prompt, as in the hook path
            plain = kw.get("mask") is None and not kw.get("skip_reshape", False)
            if plain and a[0].shape[1] == state.layout.num_tokens:
                return shot_cross(func, attention, a, kw)
            return attention(func, *a, **kw)
        cross_to = {**to, "optimized_attention_override": cross_override}
    heads = sa.num_heads
    if moga:
        def attend(q, k, v, inp):
            return state.patch.attend(i, q, k, v, heads, inp, state.layout)
    else:
        def attend(q, k, v, inp):
            return wan.optimized_attention(q, k, v, heads=heads, transformer_options=to)
    parts = host_block.HostBlock(
        q=sa.q, k=sa.k, v=sa.v, o=sa.o, heads=heads,
        norm_q=read_or_module(sa.norm_q, torch.nn.RMSNorm), norm_k=read_or_module(sa.norm_k, torch.nn.RMSNorm),
        norm1_eps=block.norm1.eps, norm2_eps=block.norm2.eps, norm3=norm3,
        modulation=cast_to(block.modulation, dtype=x.dtype, device=x.device),
        cross=lambda c_in: ca(c_in, context, context_img_len=state.context_img_len, transformer_options=cross_to),
        ffn=block.ffn)
    FAST_COUNTS["fast"] += 1
    return host_block.forward(parts, x, e, rope, attend)
