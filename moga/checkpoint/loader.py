"""`load_model`: a Wan checkpoint (any layout, file or folder) as a WanModel, built on the meta device
and filled tensor by tensor from the memory map; plus the extras registry for models that bring their
own text encoder / VAE (the demo model)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..model import FP8_DTYPES, WanModel
from .errors import CheckpointError
from .inspection import plan_checkpoint

# ---- extras registration point -----------------------------------------------------------------
# EXTRA_LOADERS[name](source, metadata, device, dtype) -> {"text_encoder": obj | None, "vae": obj | None}
#   name: the value of the file's `moga.extras` metadata; source: the file's TensorSource (read
#   the extras' tensors with source.get(key); keys under EXTRA_PREFIXES are left to you).
# Register with `register_extras(name, fn)` from the module that defines the extras (moga.demo).
EXTRA_LOADERS: dict[str, Callable] = {}


def register_extras(name: str, loader: Callable) -> None:
    EXTRA_LOADERS[name] = loader


def load_model(path, device="cpu", dtype: torch.dtype | None = None, num_heads: int | None = None,
               loras=None, lora_fp8: str = "compute") -> WanModel:
    """Load a Wan checkpoint (file or diffusers/Wan folder; any key layout) as a WanModel: Wan2.1
    T2V / I2V, one Wan2.2 A14B expert (a pair: `moga.checkpoint.load_experts`), Wan2.2 TI2V-5B.

    dtype: the dtype floating weights are stored in on `device` (None: as in the file). fp8 weights
    stay fp8 and are upcast per layer at compute time, to `dtype` if given (else bfloat16). Router
    weights keep their stored dtype. The model is in eval mode with requires_grad off.
    loras: [(file, strength), ...] merged into the weights (moga.checkpoint.lora; `model.loras` records
    them); lora_fp8: what an fp8 weight a LoRA changes becomes: "compute" (the compute dtype, exact) or
    "fp8" (requantised, the file's memory).
    """
    from .lora import FP8_MODES, check_loras, merge_loras

    loras = check_loras(loras)
    if lora_fp8 not in FP8_MODES:
        raise ValueError(f"lora_fp8 must be one of {FP8_MODES}, got {lora_fp8!r}")
    if dtype is not None and dtype in FP8_DTYPES:
        raise ValueError("dtype must be a compute dtype (bfloat16, float16, float32); fp8 files keep "
                         "their fp8 weights by themselves")
    plan = plan_checkpoint(path, num_heads=num_heads)
    src, cfg = plan.source, plan.config
    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in plan.names]
    if missing:
        raise CheckpointError(f"{src.path} lacks {len(missing)} tensors of the Wan2.1 DiT "
                              f"({', '.join(missing[:4])}...): the file is incomplete or another model")
    for canon, key in plan.names.items():
        if canon.endswith(".scale_weight"):
            continue
        if canon not in expected:
            plan.ignored.append(key)
            continue
        t = src.get(key, device)
        if tuple(t.shape) != tuple(expected[canon].shape):
            raise CheckpointError(f"{src.path}: {key} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[canon].shape)}")
        read = t
        if dtype is not None and t.is_floating_point() and t.dtype not in FP8_DTYPES \
                and not canon.endswith("router.weight"):
            t = t.to(dtype)
        if t is read and t.device.type == "cpu":
            # safetensors hands out views of the memory map: own the tensor (writable, and aligned,
            # so the kernels, hence the outputs, do not depend on where the tensor sat in the file)
            t = t.clone()
        _assign(model, canon, t)
    for canon, key in plan.names.items():
        if canon.endswith(".scale_weight"):
            owner = canon[: -len(".scale_weight")]
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                raise CheckpointError(f"{src.path}: {key} scales a weight the model does not have") from None
            module.register_buffer("scale_weight", _weight_scale(src, key, device, module))
    if plan.ignored:
        unknown = [k for k in plan.ignored if not k.endswith(".scale_input")]
        if unknown and not plan.extras:
            warnings.warn(f"{src.path}: ignored {len(unknown)} tensors that are not part of the Wan2.1 "
                          f"T2V DiT ({', '.join(unknown[:4])}...)", stacklevel=2)
    if plan.moga is not None:
        model.moga_config = plan.moga
    model.dense_warmup = plan.dense_warmup
    model.sampler_defaults = dict(plan.sampler)
    if dtype is not None:
        model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    model.loras = merge_loras(model, loras, fp8=lora_fp8) if loras else []
    model.source_path = str(src.path)
    if plan.extras:
        loader = EXTRA_LOADERS.get(plan.extras)
        if loader is None:
            raise CheckpointError(
                f"{src.path} brings its own text encoder/VAE ('moga.extras' = {plan.extras!r}) but no "
                f"loader is registered for it (registered: {sorted(EXTRA_LOADERS) or 'none'}): import "
                f"the module that defines it (e.g. moga.demo) before loading")
        parts = loader(src, dict(src.metadata), device, dtype) or {}
        model.text_encoder = parts.get("text_encoder")
        model.vae = parts.get("vae")
    src.close()
    return model


def _weight_scale(src, key: str, device, module) -> torch.Tensor:
    """A `scale_weight` as the layers use it: () per tensor (Comfy-Org's scaled fp8), [out, 1] per row."""
    s = src.get(key, device).float()
    rows = module.weight.shape[0] if getattr(module, "weight", None) is not None else None
    if s.numel() == 1:
        return s.reshape(()).clone()
    if rows is not None and s.numel() == rows:
        return s.reshape(rows, 1).clone()
    raise CheckpointError(f"{src.path}: {key} has {s.numel()} values for a weight of {rows} rows: one scale "
                          f"per tensor or one per output row is supported; re-export the file")


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = t
    else:
        raise CheckpointError(f"the model has no tensor {name}")
