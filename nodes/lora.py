"""MoGA LoRA: a LoRA file from ComfyUI's models/loras/, its strength and the expert(s) it is for -> MOGA_LORAS,
which the MoGA Model Loader merges into the weights as it loads (moga.checkpoint.lora). Chain several: each adds
its LoRA to the list it is given. Merging at load (not patching a loaded model) keeps one copy of the weights in
memory and lets the multi-GPU workers load the very same merged model. Wan2.2 A14B LoRAs often come as a high-
and a low-noise file: chain two nodes, one with experts high_noise, the other low_noise."""
from __future__ import annotations

import math
import os

import folder_paths
from comfy_api.latest import io

from .common import CATEGORY, LORA_EXPERTS, MogaLoras, input_error

NODE = "MoGA LoRA"
LORA_FOLDER = "loras"  # ComfyUI's own LoRA folder
EXTENSIONS = {".safetensors", ".sft"}  # pickles can run code when loaded


def lora_names() -> list[str]:
    return sorted(n for n in folder_paths.get_filename_list(LORA_FOLDER) if os.path.splitext(n)[1].lower() in EXTENSIONS)


def resolve(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise input_error(NODE, "lora_name", "no LoRA chosen",
                          "put a .safetensors LoRA in ComfyUI/models/loras/, then press R to refresh the list")
    if os.path.splitext(name)[1].lower() not in EXTENSIONS:
        raise input_error(NODE, "lora_name", f"{name!r} is not a .safetensors file (pickle files can run code and "
                          "are not loaded)", "convert it to safetensors or pick a .safetensors LoRA")
    path = folder_paths.get_full_path(LORA_FOLDER, name)
    if path is None:
        raise input_error(NODE, "lora_name", f"{name!r} is not in models/loras/",
                          "put the file there and press R to refresh, or pick one from the list")
    return path


class MoGALora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGALora",
            display_name=NODE,
            category=CATEGORY,
            description="Adds a Wan LoRA (kohya/ComfyUI, diffusers/PEFT or .diff files) to the list the MoGA Model "
                        "Loader merges into the weights when it loads. Chain MoGA LoRA nodes for several LoRAs; a "
                        "Wan2.2 A14B LoRA that comes as a high- and a low-noise file: one node per file, each "
                        "with its 'experts'.",
            inputs=[
                io.Combo.Input("lora_name", options=lora_names(),
                               tooltip="A .safetensors LoRA from ComfyUI/models/loras/, made for the model you load."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, round=0.01,
                               tooltip="How much of the LoRA is added: 1 as trained, 0 off, negative subtracts."),
                MogaLoras.Input("loras", optional=True, tooltip="LoRAs from an earlier MoGA LoRA node (a chain)."),
                io.Combo.Input("experts", options=list(LORA_EXPERTS), default="both", optional=True,
                               tooltip="Wan2.2 A14B pairs: which expert this LoRA is merged into. both: the two "
                                       "(or the one model); high_noise / low_noise: that expert only, for LoRAs "
                                       "that come as a high- and a low-noise file. One model: only both."),
            ],
            outputs=[MogaLoras.Output(display_name="loras")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, strength, loras=None, experts="both"):
        try:
            path = resolve(lora_name)
            return (path, os.path.getmtime(path), strength, tuple(loras or ()), experts)
        except (ValueError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, lora_name, strength=1.0, loras=None, experts="both") -> io.NodeOutput:
        path = resolve(lora_name)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise input_error(NODE, "strength", f"{strength!r} is not a number", "give a number such as 1.0")
        experts = experts or "both"
        if experts not in LORA_EXPERTS:
            raise input_error(NODE, "experts", f"unknown choice {experts!r}", f"pick one of {', '.join(LORA_EXPERTS)}")
        return io.NodeOutput(tuple(loras or ()) + ((path, float(strength), experts),))
