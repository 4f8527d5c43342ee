"""Wan checkpoints (safetensors only: Wan2.1 T2V / I2V, Wan2.2 A14B expert pairs, TI2V-5B): reading every published key layout, the MoGA format,
and `patch` (add routers to a plain checkpoint). The format is documented in
docs/checkpoint-format.md.

    model = load_model("wan2.1_t2v_1.3B_bf16.safetensors", device="cuda")
    print(inspect_checkpoint(path))                       # header only, no tensor is read
    patch_checkpoint(src, dst, num_groups=8, window="0,2,2")   # calibrated routers

Reading is memory-mapped (`safe_open`): the model is built on the meta device and each tensor is
read straight into its parameter, so no second full copy exists in RAM. Writing a patched file
copies the source tensors' bytes unchanged.

Models that bring their own text encoder / VAE (the demo model) carry header metadata
`moga.extras = NAME`; `load_model` then calls `EXTRA_LOADERS[NAME]` (see `register_extras`).

The parts: `safetensors_io` (headers, TensorSource, writing), `layouts` (key maps), `inspection`
(what a file is; CheckpointInfo), `moga_format` (metadata, save), `loader` (load_model, extras),
`calibrate` (patch, router calibration), `lora` (LoRA files: read in every layout, merged at load, written
in ComfyUI's), `router_file` (router-only files: routers + settings + a fingerprint of their base weights,
for MoGA Patch Model).
"""
from __future__ import annotations

from .calibrate import (CALIBRATED_CAPACITY, CALIBRATED_DENSE_WARMUP, calibrate_routers, patch_checkpoint,
                        spherical_kmeans)
from .errors import CheckpointError
from .experts import find_experts, load_experts
from .inspection import CheckpointInfo, Plan, inspect_checkpoint, plan_checkpoint
from .layouts import (EXTRA_PREFIXES, LAYOUTS, PREFIX_COMFYUI, canonical_key, detect_layout, diffusers_to_wan,
                      router_key, to_layout, wan_to_diffusers)
from .loader import EXTRA_LOADERS, load_model, register_extras
from .lora import (LORA_PREFIX, check_loras, lora_specs, lora_tensors, merge_loras, parse_lora_spec, read_lora,
                   write_lora)
from .moga_format import (FORMAT_VERSION, format_layers, moga_metadata, parse_layers, sampler_defaults,
                          sampler_metadata, save_checkpoint)
from .router_file import RouterSet, compare_fingerprint, make_fingerprint, read_routers, write_routers
from .safetensors_io import Entry, TensorSource, read_header, write_safetensors

__all__ = ["load_model", "inspect_checkpoint", "save_checkpoint", "patch_checkpoint", "CheckpointInfo",
           "CheckpointError", "EXTRA_LOADERS", "register_extras", "TensorSource", "to_layout",
           "detect_layout", "canonical_key", "moga_metadata", "calibrate_routers", "spherical_kmeans",
           "write_safetensors", "read_header", "plan_checkpoint", "FORMAT_VERSION", "CALIBRATED_DENSE_WARMUP",
           "CALIBRATED_CAPACITY", "parse_layers", "format_layers", "router_key", "wan_to_diffusers",
           "diffusers_to_wan", "Plan", "Entry", "PREFIX_COMFYUI", "LAYOUTS", "EXTRA_PREFIXES", "check_loras",
           "merge_loras", "parse_lora_spec", "read_lora", "lora_specs", "write_lora", "lora_tensors", "LORA_PREFIX",
           "RouterSet", "read_routers", "write_routers",
           "make_fingerprint", "compare_fingerprint", "load_experts", "find_experts", "sampler_metadata",
           "sampler_defaults"]
