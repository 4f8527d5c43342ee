"""Shots for core's samplers: "MoGA Shot Conditioning" (MOGA_SHOTS -> positive / negative CONDITIONING that carry
each shot's prompt and length to a model patched by MoGA Patch Model) and "Empty Multi-Shot Latent" (the latent
of the right length: 4n+1 frames per shot, so each shot decodes on its own)."""
from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, LATENT_FPS, LATENT_SHOT_FRAMES, MoGAShotsValue, MogaShots, input_error
from .patch_hooks import SHOT_CONTEXT_KEY, SHOT_FRAMES_KEY

COND_NODE = "MoGA Shot Conditioning"
LATENT_NODE = "Empty Multi-Shot Latent"
TEXT_LEN = 512  # Wan pads every prompt to 512 tokens (core's umT5 already does)
# latent channels and pixels per latent pixel of the Wan VAEs
LATENT_FORMATS = {"wan2.1 (16 ch, /8)": (16, 8), "wan2.2 TI2V-5B (48 ch, /16)": (48, 16)}


def _padded(embeddings, length):
    import torch
    out = []
    for e in embeddings:
        e = e if e.dim() == 3 else e[None]
        pad = length - e.shape[1]
        out.append(torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], dim=1) if pad > 0 else e)
    return out


def shot_conditioning(per_shot, shot_frames):
    """[[first shot's text, {model_conds: every shot's text + latent frames}]] (core's CONDITIONING). One shot is
    one prompt: plain [[text, {}]], as core's CLIP Text Encode gives, so MoGA Patch Model's own shot_frames still
    say where the cuts are (a one-shot length in the conditioning would override them)."""
    import torch

    length = max(TEXT_LEN, *(e.shape[-2] for e in per_shot))
    padded = _padded(per_shot, length)
    if len(padded) == 1:
        return [[padded[0], {}]]
    from comfy.conds import CONDRegular
    stacked = torch.stack([p[0] for p in padded])[None]            # [1, S, L, D]
    frames = torch.tensor([list(shot_frames)], dtype=torch.long)     # [1, S]
    conds = {SHOT_CONTEXT_KEY: CONDRegular(stacked), SHOT_FRAMES_KEY: CONDRegular(frames)}
    return [[padded[0], {"model_conds": conds}]]


class MoGAShotConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAShotConditioning",
            display_name=COND_NODE,
            category=CATEGORY,
            description="Turns MoGA Shot Prompts into core CONDITIONING for KSampler / SamplerCustomAdvanced on a "
                        "model patched by MoGA Patch Model: each shot's video tokens attend only to that shot's "
                        "prompt, and MoGA's window groups stop at the cuts. Without the patch the model sees the "
                        "first shot's prompt only.",
            inputs=[MogaShots.Input("shots", tooltip="From MoGA Shot Prompts (encoded with core's CLIP Loader, "
                                                       "type wan).")],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, shots) -> io.NodeOutput:
        if not isinstance(shots, MoGAShotsValue):
            raise input_error(COND_NODE, "shots", "is not a shot list", "connect the output of MoGA Shot Prompts")
        frames = shots.plan.latent_shot_frames()
        positive = shot_conditioning(shots.positive, frames)
        negative = shot_conditioning([shots.negative] * len(frames), frames)
        return io.NodeOutput(positive, negative)


class EmptyMultiShotLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAEmptyMultiShotLatent",
            display_name=LATENT_NODE,
            category=CATEGORY,
            description="An empty video latent as long as the shots (each shot 4n+1 frames: n+1 latent frames), "
                        "for KSampler. MoGA Decode decodes it shot by shot, so every cut stays clean.",
            inputs=[
                MogaShots.Input("shots", tooltip="From MoGA Shot Prompts: the shots and their lengths."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Video width in pixels."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Video height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Videos drawn at once."),
                io.Combo.Input("latent_format", options=list(LATENT_FORMATS), default=next(iter(LATENT_FORMATS)),
                               tooltip="The VAE's latent: Wan2.1 and Wan2.2 A14B use the 16-channel one; Wan2.2 "
                                       "TI2V-5B the 48-channel one."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, shots, width=832, height=480, batch_size=1, latent_format=None) -> io.NodeOutput:
        import torch
        import comfy.model_management as mm

        if not isinstance(shots, MoGAShotsValue):
            raise input_error(LATENT_NODE, "shots", "is not a shot list", "connect the output of MoGA Shot Prompts")
        channels, ratio = LATENT_FORMATS.get(latent_format or next(iter(LATENT_FORMATS)), (None, None))
        if channels is None:
            raise input_error(LATENT_NODE, "latent_format", f"unknown format {latent_format!r}",
                              f"pick one of {', '.join(LATENT_FORMATS)}")
        if width % ratio or height % ratio:
            raise input_error(LATENT_NODE, "width", f"{width}x{height} is not a multiple of {ratio}",
                              f"use a size divisible by {ratio}, e.g. 832x480")
        frames = shots.plan.latent_shot_frames()
        samples = torch.zeros(batch_size, channels, sum(frames), height // ratio, width // ratio,
                              device=mm.intermediate_device())
        return io.NodeOutput({"samples": samples, LATENT_SHOT_FRAMES: list(frames), LATENT_FPS: float(shots.plan.fps)})
