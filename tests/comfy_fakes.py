"""Minimal stand-ins for the few ComfyUI modules the MoGA nodes import, so the nodes run in tests without ComfyUI.

Each fake copies the behaviour of ComfyUI v0.3.64 that the nodes rely on, no more:
- comfy_api.latest.io: Schema, ComfyNode, NodeOutput and the input/output types the pack uses; `object_info(node)`
  builds a node's GET /object_info entry the way the real `Schema.get_v1_info` does. The integration test compares
  it with a real server's answer, which keeps this fake honest.
- folder_paths: model folder registry (add_model_folder_path, get_filename_list, get_full_path).
- comfy.utils.ProgressBar with ComfyUI's global hook (which checks for an interrupt, as main.py's hook does).
- comfy.model_management: the interrupt flag and the device/memory calls the sampler makes (recorded).
"""
from __future__ import annotations

import os
import sys
import threading
import types
from contextlib import contextmanager

import torch


def _prune(d):
    return {k: v for k, v in d.items() if v is not None}


# ---------------------------------------------------------------------------------------------- comfy_api.latest.io
def _make_io():
    io = types.ModuleType("comfy_api.latest.io")

    class Input:
        io_type = None

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **extra):
            self.id, self.optional = id, optional
            self.base = _prune({"display_name": display_name, "tooltip": tooltip, "lazy": lazy})
            self.extra = extra

        def as_dict(self):
            return dict(self.base) | _prune(self.extra)

    class Output:
        io_type = None

        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    def comfy_type(io_type, input_extra=None):
        """A ComfyUI type with Input/Output classes; input_extra maps keyword -> object_info key for widgets."""
        keys = input_extra or {}

        class T:
            pass

        class In(Input):
            def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **kw):
                unknown = set(kw) - set(keys)
                if unknown:
                    raise TypeError(f"{io_type}.Input got unexpected arguments {sorted(unknown)}")
                extra = {keys[k]: v for k, v in kw.items()}
                super().__init__(id, display_name, optional, tooltip, lazy, **extra)

        In.io_type = io_type

        class Out(Output):
            pass

        Out.io_type = io_type
        T.Input, T.Output, T.io_type = In, Out, io_type
        return T

    number = {"default": "default", "min": "min", "max": "max", "step": "step"}
    io.Int = comfy_type("INT", number | {"control_after_generate": "control_after_generate", "display_mode": "display"})
    io.Float = comfy_type("FLOAT", number | {"round": "round", "display_mode": "display"})
    io.Boolean = comfy_type("BOOLEAN", {"default": "default", "label_on": "label_on", "label_off": "label_off"})
    io.String = comfy_type("STRING", {"default": "default", "multiline": "multiline", "placeholder": "placeholder",
                                      "dynamic_prompts": "dynamicPrompts"})
    _StringIn = io.String.Input

    class StringIn(_StringIn):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, multiline=multiline, **kw)

    io.String.Input = StringIn
    io.Combo = comfy_type("COMBO")

    class ComboIn(Input):
        io_type = "COMBO"

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default=default, multiselect=False,
                             options=options)
            self.options = options

    io.Combo.Input = ComboIn
    for name, t in (("Image", "IMAGE"), ("Latent", "LATENT"), ("Clip", "CLIP"), ("Vae", "VAE"), ("Video", "VIDEO"),
                    ("Model", "MODEL"), ("Conditioning", "CONDITIONING"), ("ClipVisionOutput", "CLIP_VISION_OUTPUT")):
        setattr(io, name, comfy_type(t))
    io.Custom = lambda io_type: comfy_type(io_type)

    class Schema:
        def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                     description="", is_output_node=False, **_):
            self.node_id, self.display_name, self.category = node_id, display_name, category
            self.inputs, self.outputs = list(inputs or []), list(outputs or [])
            self.description, self.is_output_node = description, is_output_node
            ids = [i.id for i in self.inputs]
            if len(set(ids)) != len(ids):
                raise ValueError(f"Input ids must be unique: {ids}")

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui = args, ui

        @property
        def result(self):
            return self.args if self.args else None

    class ComfyNode:
        @classmethod
        def GET_SCHEMA(cls):
            return cls.define_schema()

    def object_info(node_cls):
        """The node's entry in GET /object_info, as Schema.get_v1_info builds it (python_module left out)."""
        s = node_cls.define_schema()
        inputs = {"required": {}}
        for i in s.inputs:
            d = i.as_dict()
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = [i.io_type, d]
        return {
            "input": inputs,
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": [o.io_type for o in s.outputs],
            "output_is_list": [o.is_output_list for o in s.outputs],
            "output_name": [o.display_name or o.io_type for o in s.outputs],
            "output_tooltips": [o.tooltip for o in s.outputs],
            "name": s.node_id,
            "display_name": s.display_name,
            "description": s.description,
            "category": s.category,
            "output_node": s.is_output_node,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }

    io.Schema, io.NodeOutput, io.ComfyNode, io.object_info = Schema, NodeOutput, ComfyNode, object_info
    return io


# ---------------------------------------------------------------------------------------------------- folder_paths
def _make_folder_paths(base_dir):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = os.path.join(base_dir, "models")
    fp.folder_names_and_paths = {
        "diffusion_models": ([os.path.join(fp.models_dir, "unet"), os.path.join(fp.models_dir, "diffusion_models")],
                             {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}),
        "loras": ([os.path.join(fp.models_dir, "loras")], {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}),
    }

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = set()
        for root in paths:
            if not os.path.isdir(root):
                continue
            for dirpath, _, files in os.walk(root, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(name, filename):
        for root in fp.folder_names_and_paths[name][0]:
            p = os.path.join(root, filename)
            if os.path.isfile(p):
                return p
        return None

    fp.add_model_folder_path, fp.get_filename_list, fp.get_full_path = (add_model_folder_path, get_filename_list,
                                                                        get_full_path)
    return fp


# --------------------------------------------------------------------------------- comfy.model_management / utils
def _make_comfy():
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")
    lock = threading.RLock()
    mm.state = {"interrupt": False}
    mm.calls = []

    class InterruptProcessingException(Exception):
        pass

    def interrupt_current_processing(value=True):
        with lock:
            mm.state["interrupt"] = value

    def processing_interrupted():
        with lock:
            return mm.state["interrupt"]

    def throw_exception_if_processing_interrupted():
        with lock:
            if mm.state["interrupt"]:
                mm.state["interrupt"] = False
                raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.unload_all_models = lambda: mm.calls.append("unload_all_models")
    mm.soft_empty_cache = lambda force=False: mm.calls.append("soft_empty_cache")

    utils = types.ModuleType("comfy.utils")
    utils.updates = []

    def hook(value, total, preview, node_id=None):
        # ComfyUI's main.py hook: an interrupt surfaces at the next progress update
        throw_exception_if_processing_interrupted()
        utils.updates.append((value, total, preview))

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.hook = total, 0, hook

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            self.hook(self.current, self.total, preview)

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar

    formats = types.ModuleType("comfy.latent_formats")

    class Wan21:
        """Core's Wan2.1 latent format: process_in normalises a VAE latent per channel (fake mean/std here)."""
        latents_mean = torch.linspace(-0.5, 0.4, 16).view(1, 16, 1, 1, 1)
        latents_std = torch.linspace(0.6, 2.0, 16).view(1, 16, 1, 1, 1)
        scale_factor = 1.0

        def process_in(self, latent):
            return (latent - self.latents_mean) * self.scale_factor / self.latents_std

        def process_out(self, latent):
            return latent * self.latents_std / self.scale_factor + self.latents_mean

    class Wan22(Wan21):
        latents_mean = torch.linspace(-0.3, 0.2, 48).view(1, 48, 1, 1, 1)
        latents_std = torch.linspace(0.5, 1.5, 48).view(1, 48, 1, 1, 1)

    formats.Wan21, formats.Wan22 = Wan21, Wan22
    comfy.model_management, comfy.utils, comfy.latent_formats = mm, utils, formats
    return comfy, mm, utils


# ----------------------------------------------------------------------------------------------- install / remove
FAKE_NAMES = ("comfy_api", "comfy_api.latest", "folder_paths", "comfy", "comfy.model_management", "comfy.utils",
              "comfy.latent_formats")


@contextmanager
def installed(base_dir, repo_root):
    """Install the fakes, import the node pack (as the package `nodes`), yield a namespace; undo everything after."""
    saved = {n: sys.modules.get(n) for n in FAKE_NAMES}
    for n in list(sys.modules):
        if n == "nodes" or n.startswith("nodes."):
            saved.setdefault(n, sys.modules.pop(n))
    io = _make_io()
    api, latest = types.ModuleType("comfy_api"), types.ModuleType("comfy_api.latest")
    api.__path__ = []

    class ComfyExtension:
        async def on_load(self):
            return None

    latest.io, latest.ComfyExtension = io, ComfyExtension
    api.latest = latest
    fp = _make_folder_paths(base_dir)
    comfy, mm, utils = _make_comfy()
    sys.modules.update({"comfy_api": api, "comfy_api.latest": latest, "folder_paths": fp, "comfy": comfy,
                        "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.latent_formats": comfy.latent_formats})
    added_path = False
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
        added_path = True
    try:
        import nodes
        yield types.SimpleNamespace(nodes=nodes, io=io, folder_paths=fp, mm=mm, utils=utils,
                                    ComfyExtension=ComfyExtension)
    finally:
        for n in list(sys.modules):
            if n == "nodes" or n.startswith("nodes."):
                del sys.modules[n]
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        if added_path:
            sys.path.remove(repo_root)


# ------------------------------------------------------------------------------------- host objects the nodes take
class FakeClip:
    """ComfyUI's CLIP as the nodes use it: tokenize(text) -> tokens, encode_from_tokens(tokens) -> [1, L, dim]."""

    def __init__(self, dim):
        self.dim, self.encoded = dim, []

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens(self, tokens):
        text = tokens["text"]
        self.encoded.append(text)
        g = torch.Generator().manual_seed(sum(map(ord, text)) % (2 ** 31) + len(text))
        return torch.randn(1, 3 + len(text.split()), self.dim, generator=g)


class FakeVAE:
    """ComfyUI's Wan VAE contract: decode(latent [B, 16, F, H, W]) -> images [B, 4(F-1)+1, 8H, 8W, 3] in 0..1;
    `latent_channels` as core's VAE object says it (16: the Wan2.1 VAE)."""
    latent_channels = 16
    ratio = 8   # pixels per latent pixel, each way

    def __init__(self):
        self.calls = []

    def encode(self, pixels):
        """[T, H, W, 3] in 0..1 -> [1, C, (T-1)//4+1, H/r, W/r]: a fixed random mix of r x r patches of each
        frame group (the first latent frame is the first pixel frame alone, as Wan's VAE does)."""
        self.calls.append(("encode", tuple(pixels.shape)))
        t, h, w, _ = pixels.shape
        x = pixels.permute(3, 0, 1, 2)[None].float()                  # [1, 3, T, H, W]
        groups = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, t, 4)]
        frames = torch.cat([g.mean(2, keepdim=True) for g in groups], dim=2)   # [1, 3, F, H, W]
        r = self.ratio
        patches = torch.nn.functional.avg_pool3d(frames, (1, r, r))          # [1, 3, F, H/r, W/r]
        mix = torch.randn(self.latent_channels, 3, generator=torch.Generator().manual_seed(11))
        return torch.einsum("oc,bcfhw->bofhw", mix, patches) + 0.25

    def decode(self, z):
        self.calls.append(tuple(z.shape))
        b, c, f, h, w = z.shape
        r = self.ratio
        x = z.mean(1, keepdim=True)                                   # [B, 1, F, H, W]
        x = torch.nn.functional.interpolate(x, size=(4 * (f - 1) + 1, r * h, r * w), mode="nearest")
        return torch.sigmoid(x)[:, 0, ..., None].expand(-1, -1, -1, -1, 3)


class FakeVAE22(FakeVAE):
    """The Wan2.2 VAE's contract (TI2V-5B): 48 latent channels, 16x16 pixels a latent pixel."""
    latent_channels = 48
    ratio = 16
