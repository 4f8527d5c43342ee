"""MoGA Attention Settings: MOGA_MODEL -> a copy of it with other MoGA settings (the cached model is untouched)."""
from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, MoGAModelHandle, MogaModel, input_error

NODE = "MoGA Attention Settings"
FUSIONS = ("checkpoint", "mean", "lse")


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """'all' | 'none' | '0-9,20,25-29' -> sorted layer indices (what a person types into the route_layers box)."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return tuple(range(num_layers))
    if text == "none":
        return ()
    from moga.checkpoint import parse_layers as parse
    try:
        picked = parse(text)
    except ValueError:
        raise input_error(NODE, "route_layers", f"{text!r} is not a list of layers",
                          "write 'all', 'none' or layer numbers and ranges like '0-9,20'") from None
    if not picked:
        raise input_error(NODE, "route_layers", f"{text!r} names no layer", "write 'none' for no MoGA layers, "
                          "or layer numbers and ranges like '0-9,20'")
    outside = [i for i in picked if not 0 <= i < num_layers]
    if outside:
        raise input_error(NODE, "route_layers", f"layer {outside[0]} does not exist (the model has layers "
                          f"0-{num_layers - 1})", f"use numbers from 0 to {num_layers - 1}")
    return picked


class MoGAAttentionSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAAttentionSettings",
            display_name=NODE,
            category=CATEGORY,
            description="Changes how MoGA attention runs for this model: group count, window grid, which layers "
                        "route, fusion, dense warm-up and group capacity. Returns a changed copy; the loaded model is not modified.",
            inputs=[
                MogaModel.Input("model", tooltip="The MoGA model from MoGA Model Loader."),
                io.Int.Input("num_groups", default=0, min=0, max=64,
                             tooltip="M, the routed groups; 0 = the checkpoint's own M. Each token attends only to its group, so more groups "
                                     "cost less (routed attention ~ tokens^2 / M) but each token sees less of the "
                                     "video. The paper: 5 for Wan2.1 up to 30 s, 20 at ~580k tokens; quality "
                                     "peaked at 4-8. Fewer than the checkpoint's groups merges router rows; more "
                                     "needs `moga patch --groups M`."),
                io.Int.Input("window_frames", default=0, min=0, max=1024,
                             tooltip="Latent frames a window group spans in time. 0 = the whole shot (the paper). "
                                     "Fewer frames cost less but link distant frames of a shot only through the "
                                     "routed groups."),
                io.Int.Input("window_rows", default=2, min=1, max=16,
                             tooltip="Rows of the spatial grid cut into every latent frame for the window groups "
                                     "(the paper: 2 for Wan, 4 for its largest model). More rows = smaller windows: "
                                     "cheaper, more local."),
                io.Int.Input("window_cols", default=2, min=1, max=16,
                             tooltip="Columns of the spatial grid (see window_rows)."),
                io.Int.Input("context_frames", default=1, min=0, max=8,
                             tooltip="Latent frames of the neighbouring shots added to each window's keys. 1 "
                                     "(default) keeps the frame after a cut from flickering at a small cost; 0 "
                                     "isolates shots completely."),
                io.String.Input("route_layers", default="all",
                                tooltip="Layers that use MoGA: 'all', 'none' (dense attention everywhere, the "
                                        "baseline; slowest) or numbers and ranges like '0-9,20'. The rest run dense "
                                        "attention: closer to the original model, slower."),
                io.Combo.Input("fusion", options=list(FUSIONS), default="checkpoint",
                               tooltip="How the routed, window and per-frame branches merge. checkpoint: what the "
                                       "checkpoint says. mean: the paper's average (for trained routers). lse: one "
                                       "softmax over all branches' keys (for calibrated routers on a plain Wan "
                                       "checkpoint; closer to dense attention)."),
                io.Float.Input("dense_warmup", default=-1.0, min=-1.0, max=1.0, step=0.05,
                               tooltip="Fraction of the sampling steps that run dense attention first, while the "
                                       "layout of the video forms. Those steps cost what dense attention costs; "
                                       "useful with calibrated (untrained) routers, 0 for trained ones. -1 = the "
                                       "checkpoint's own (docs/training-free.md)."),
                io.Float.Input("capacity", default=-1.0, min=-1.0, max=64.0, step=0.25,
                               tooltip="Largest routed group, in units of the balanced size (tokens / groups): "
                                       "a bigger group is cut into runs of consecutive tokens. Calibrated "
                                       "routers make very unbalanced groups, so 1 cuts attention cost a lot at "
                                       "little loss; trained routers are balanced already. 0 = off (the "
                                       "paper), -1 = the checkpoint's own (docs/training-free.md)."),
            ],
            outputs=[MogaModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model: MoGAModelHandle, num_groups=0, window_frames=0, window_rows=2, window_cols=2,
                context_frames=1, route_layers="all", fusion="checkpoint", dense_warmup=-1.0,
                capacity=-1.0) -> io.NodeOutput:
        if not isinstance(model, MoGAModelHandle):
            raise input_error(NODE, "model", "is not a MoGA model", "connect the output of MoGA Model Loader")
        config = getattr(model.model, "config", None)
        num_layers = int(getattr(config, "num_layers", 0))
        if float(dense_warmup) == -1.0:  # the checkpoint's (the loader put it on the handle)
            dense_warmup = model.dense_warmup
        if not 0.0 <= float(dense_warmup) <= 1.0:
            raise input_error(NODE, "dense_warmup", f"{dense_warmup} is not a fraction",
                              "use -1 (the checkpoint's), or a value from 0 (no dense steps) to 1 (all steps dense)")
        routed = parse_layers(route_layers, num_layers)
        dense_layers = tuple(i for i in range(num_layers) if i not in routed)
        changes = dict(window=(int(window_frames), int(window_rows), int(window_cols)),
                       context_frames=int(context_frames))
        if fusion != "checkpoint":
            if fusion not in FUSIONS:
                raise input_error(NODE, "fusion", f"unknown fusion {fusion!r}", f"pick one of {', '.join(FUSIONS)}")
            changes["fusion"] = fusion
        if float(capacity) != -1.0:  # -1: the checkpoint's (already in base)
            if not float(capacity) >= 0.0:
                raise input_error(NODE, "capacity", f"{capacity} is not a capacity",
                                  "use -1 (the checkpoint's), 0 (off) or a positive number (1 = the balanced "
                                  "group size)")
            changes["capacity"] = float(capacity)
        # a Wan2.2 A14B pair: each expert has its own routers, so its own base settings and group limit; what is
        # set here applies to both, checked against each
        experts = model.experts()
        configs = [_expert_config(label, net, base, int(num_groups), changes, len(experts) > 1)
                   for label, net, base in experts]
        moga = configs[0]
        settings = dict(model.settings, num_groups=moga.num_groups, window=moga.window,
                        context_frames=moga.context_frames, fusion=moga.fusion, route_layers=route_layers,
                        dense_warmup=float(dense_warmup), capacity=moga.capacity)
        if len(configs) > 1:
            settings.update(num_groups_low=configs[1].num_groups, fusion_low=configs[1].fusion,
                            capacity_low=configs[1].capacity)
        return io.NodeOutput(model.with_settings(moga=moga, moga_low=configs[1] if len(configs) > 1 else None,
                                                 dense_warmup=float(dense_warmup), dense_layers=dense_layers,
                                                 settings=settings))


def _expert_config(label: str, net, base, num_groups: int, changes: dict, pair: bool):
    """One expert's (or the one model's) run config: its own `base` with the node's changes; num_groups 0 keeps
    its own group count, more than its routers have is an error naming it."""
    available = int(getattr(getattr(net, "config", None), "num_groups", 0) or 0)
    groups = num_groups or base.num_groups
    if available and groups > available:
        fix = (f"use 0 (each expert's own group count) or at most {available}, or re-patch "
               f"{label.split(' (')[0]}'s file with more" if pair else
               f"use at most {available}, or make a checkpoint with more")
        raise input_error(NODE, "num_groups", f"{groups} groups but the routers of {label} have {available}",
                          f"{fix}: `python -m moga patch --groups {groups}`")
    try:
        return base.replace(num_groups=groups, **changes)
    except ValueError as e:
        raise input_error(NODE, "window", f"{label}: {e}", "frames >= 0 (0 = whole shot), rows and cols >= 1") from e
