"""MoGA Decode: LATENT (with shot boundaries) -> IMAGE frames + fps, decoded shot by shot so that cuts stay clean."""
from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, LATENT_FPS, LATENT_SHOT_FRAMES, MoGAModelHandle, MogaModel, input_error

NODE = "MoGA Decode"
DEFAULT_FPS = 16.0


def shot_slices(latent, shot_frames):
    """The latent [B, C, F, H, W] cut into one piece per shot along F (each shot is its own clip)."""
    if latent.ndim != 5:
        raise input_error(NODE, "samples", f"a latent of shape {tuple(latent.shape)} is not a video latent "
                          "[batch, channels, frames, height, width]", "connect the LATENT of MoGA Sampler")
    frames = [int(f) for f in (shot_frames or [latent.shape[2]])]
    if any(f < 1 for f in frames) or sum(frames) != latent.shape[2]:
        raise input_error(NODE, "samples", f"its shot lengths {frames} do not add up to its {latent.shape[2]} "
                          "latent frames", "connect the LATENT of MoGA Sampler unchanged")
    return list(latent.split(frames, dim=2))


def host_vae_decoder(vae):
    """ComfyUI's VAE: decode() gives [B, T, H, W, 3] in 0..1 (and tiles by itself when memory runs short)."""
    def decode(z):
        images = vae.decode(z)
        return images.reshape(-1, *images.shape[-3:])
    return decode


def model_vae_decoder(own):
    """The model's own decoder: [B, 3, T, H, W] in -1..1 -> [T, H, W, 3] in 0..1."""
    def decode(z):
        video = own.decode(z)
        return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[-2:], 3)
    return decode


class MoGADecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGADecode",
            display_name=NODE,
            category=CATEGORY,
            description="Decodes a MoGA latent to frames shot by shot (each shot is its own clip, so a cut stays a "
                        "clean cut) with the connected VAE (Wan 2.1 VAE) or the model's own decoder. The frames go "
                        "into Create Video -> Save Video.",
            inputs=[
                io.Latent.Input("samples", tooltip="The LATENT from MoGA Sampler."),
                io.Vae.Input("vae", optional=True,
                             tooltip="VAE Loader with wan_2.1_vae. Leave unconnected for a model that brings its "
                                     "own decoder (the demo model) and connect the model instead."),
                MogaModel.Input("model", optional=True,
                                tooltip="The MoGA model, when it brings its own decoder (the demo model)."),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     io.Float.Output(display_name="fps", tooltip="The frame rate of the shot plan.")],
        )

    @classmethod
    def execute(cls, samples, vae=None, model=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils
        import torch

        if not isinstance(samples, dict) or "samples" not in samples:
            raise input_error(NODE, "samples", "is not a LATENT", "connect the LATENT of MoGA Sampler")
        if model is not None and not isinstance(model, MoGAModelHandle):
            raise input_error(NODE, "model", "is not a MoGA model", "connect MoGA Model Loader")
        pieces = shot_slices(samples["samples"], samples.get(LATENT_SHOT_FRAMES))
        if vae is not None:
            decode = host_vae_decoder(vae)
        elif model is not None and model.vae is not None:
            decode = model_vae_decoder(model.vae)
        else:
            raise input_error(NODE, "vae", "no decoder: nothing is connected to 'vae' and no model with its own "
                              "decoder is connected", "connect a VAE Loader with wan_2.1_vae.safetensors to 'vae'")

        pbar = comfy.utils.ProgressBar(len(pieces))
        frames = []
        for i, z in enumerate(pieces):
            mm.throw_exception_if_processing_interrupted()
            with torch.inference_mode():
                frames.append(decode(z).float().cpu())
            pbar.update_absolute(i + 1, len(pieces))
        images = torch.cat(frames, dim=0).clamp(0, 1)
        return io.NodeOutput(images, float(samples.get(LATENT_FPS, DEFAULT_FPS)))
