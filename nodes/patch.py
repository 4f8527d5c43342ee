"""MoGA on core's own MODEL: "MoGA Router Loader" (a router file -> MOGA_ROUTERS) and "MoGA Patch Model"
(MODEL + routers -> MODEL whose Wan blocks run MoGA self-attention). The hooks are in patch_hooks.py, the
maths in moga.host_patch."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .common import CATEGORY, input_error
from .loader import checkpoint_names, resolve

MogaRouters = io.Custom("MOGA_ROUTERS")
PATCH_NODE = "MoGA Patch Model"
LOADER_NODE = "MoGA Router Loader"
FUSIONS = ("routers", "mean", "lse")
_CACHE: dict = {}  # (path, size, mtime) -> RouterSet; router files are small, keep the last few
_CACHE_SIZE = 4


def load_router_set(path: str, name: str):
    from moga.checkpoint.router_file import read_routers
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = read_routers(path, name=name)
    return _CACHE[key]


class MoGARouterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGARouterLoader",
            display_name=LOADER_NODE,
            category=CATEGORY,
            description="Loads MoGA routers for MoGA Patch Model: a router file (models/moga/, made by `python -m "
                        "moga patch SRC --routers-out FILE`) or the routers inside a full MoGA checkpoint (pick the "
                        "same file core's Load Diffusion Model loaded: core drops its router tensors).",
            inputs=[io.Combo.Input("routers_name", options=checkpoint_names(),
                                   tooltip="A router file or MoGA checkpoint from models/moga/ or "
                                           "models/diffusion_models/.")],
            outputs=[MogaRouters.Output(display_name="routers")],
        )

    @classmethod
    def fingerprint_inputs(cls, routers_name):
        try:
            path = resolve(routers_name)
            return (path, os.path.getmtime(path))
        except (ValueError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, routers_name) -> io.NodeOutput:
        path = resolve(routers_name)
        try:
            return io.NodeOutput(load_router_set(path, routers_name))
        except ValueError as e:
            raise input_error(LOADER_NODE, "routers_name", str(e), "pick a MoGA router file or MoGA checkpoint") from e


def parse_layers(text: str, num_layers: int):
    """'all' -> None (every layer with a router); '0-9,20' -> the indices."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    from moga.checkpoint import parse_layers as parse
    try:
        picked = parse(text)
    except ValueError:
        picked = ()
    if not picked:
        raise input_error(PATCH_NODE, "routed_layers", f"{text!r} is not a list of layers",
                          "write 'all' or layer numbers and ranges like '0-9,20'")
    outside = [i for i in picked if not 0 <= i < num_layers]
    if outside:
        raise input_error(PATCH_NODE, "routed_layers", f"layer {outside[0]} does not exist",
                          f"use numbers from 0 to {num_layers - 1}")
    return picked


def parse_shots(text: str):
    text = (text or "").strip()
    if not text:
        return None
    try:
        shots = [int(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise input_error(PATCH_NODE, "shot_frames", f"{text!r} is not a list of latent frame counts",
                          "write latent frames per shot like '5,5,3' (they must add up to the latent's frames), or "
                          "leave it empty for one shot")
    return shots


class MoGAPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAPatchModel",
            display_name=PATCH_NODE,
            category=CATEGORY,
            description="Makes a Wan MODEL from core's loaders (any precision, LoRAs applied) run Mixture-of-Groups "
                        "Attention in its self-attention, with the model's own weights. Put it before the sampler "
                        "(KSampler, SamplerCustomAdvanced). Another attention patch stays in use for what MoGA does "
                        "not replace. For one GPU; MoGA Sampler spreads a model over several.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan model from core's Load Diffusion Model (after LoRA loaders and "
                                                "ModelSamplingSD3 if you use them)."),
                MogaRouters.Input("routers", tooltip="From MoGA Router Loader: routers made for this model."),
                io.Int.Input("groups", default=0, min=0, max=64,
                             tooltip="Routed groups M; 0 = the routers' own. Fewer merges router rows."),
                io.String.Input("window", default="",
                                tooltip="Window groups: 'frames,rows,cols' (e.g. '0,2,2': whole shot, 2x2 grid) or "
                                        "'2x2'; empty = the routers' own."),
                io.Boolean.Input("window_branch", default=True, tooltip="Run the spatial window branch."),
                io.Boolean.Input("frame_branch", default=True, tooltip="Run the per-frame branch."),
                io.String.Input("routed_layers", default="all",
                                tooltip="'all' (every layer with a router) or numbers and ranges like '0-9,20'; the "
                                        "other layers keep the model's own attention."),
                io.Combo.Input("fusion", options=list(FUSIONS), default="routers",
                               tooltip="routers: what the router file says; mean: the paper's (trained routers); "
                                       "lse: one softmax over all branches (calibrated routers)."),
                io.Float.Input("dense_warmup", default=-1.0, min=-1.0, max=1.0, step=0.05,
                               tooltip="Share of the sigma range, from the start, that keeps dense attention (like "
                                       "start_percent); -1 = the routers' own."),
                io.Float.Input("capacity", default=-1.0, min=-1.0, max=64.0, step=0.25,
                               tooltip="Largest routed group in units of tokens / groups (bigger ones are cut); "
                                       "0 = off, -1 = the routers' own."),
                io.String.Input("shot_frames", default="", optional=True,
                                tooltip="Latent frames per shot, e.g. '5,5,5' (the window branch never crosses a "
                                        "cut); empty = one shot."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, routers, groups=0, window="", window_branch=True, frame_branch=True,
                routed_layers="all", fusion="routers", dense_warmup=-1.0, capacity=-1.0,
                shot_frames="") -> io.NodeOutput:
        from moga.host_patch import HostPatchError, patch_from_routers
        from moga.checkpoint.router_file import RouterSet

        from .patch_hooks import PatchError, apply_patch, check_fingerprint, patchable_model

        if not isinstance(routers, RouterSet):
            raise input_error(PATCH_NODE, "routers", "is not a set of MoGA routers",
                              "connect the output of MoGA Router Loader")
        try:
            dm = patchable_model(model)
        except PatchError as e:
            raise input_error(PATCH_NODE, "model", str(e), "connect a Wan model") from e
        if fusion not in FUSIONS:
            raise input_error(PATCH_NODE, "fusion", f"unknown fusion {fusion!r}", f"pick one of {', '.join(FUSIONS)}")
        layers = parse_layers(routed_layers, len(dm.blocks))
        name = f"the loaded {type(model.model).__name__} model (width {dm.dim}, {len(dm.blocks)} blocks)"
        try:
            patch = patch_from_routers(routers, groups=groups, window=window, windowed=window_branch,
                                       per_frame=frame_branch, fusion="" if fusion == "routers" else fusion,
                                       capacity=capacity, dense_warmup=dense_warmup, layers=layers)
            patch.check_model(int(dm.dim), len(dm.blocks), name)
            check_fingerprint(routers, dm, name)
            patched = apply_patch(model, patch, parse_shots(shot_frames))
        except (HostPatchError, PatchError) as e:
            raise input_error(PATCH_NODE, "routers", str(e), "load routers made for this model") from e
        logging.info("MoGA Patch Model: %s", patch.describe())
        return io.NodeOutput(patched)
