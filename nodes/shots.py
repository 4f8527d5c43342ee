"""MoGA Shot Prompts: shot list text + story + negative -> MOGA_SHOTS (a shot plan and its per-shot conditioning)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .common import CATEGORY, MoGAModelHandle, MoGAShotsValue, MogaModel, MogaShots, input_error

NODE = "MoGA Shot Prompts"

EXAMPLE_SHOTS = """\
# one shot per line; an optional length in frames [41] or seconds [2.5s] at the start or end of the line
a red fox trots across a snowy meadow at sunrise, wide shot [3s]
close-up of the fox's face, breath steaming in the cold air [2s]
the fox leaps into deep snow after a mouse, slow motion [3s]"""

# Wan2.1's own negative prompt (what its text-to-video models were tuned with)
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                "杂乱的背景，三条腿，背景人很多，倒着走")


def clip_encoder(clip):
    """ComfyUI's CLIP object as an encode(list[str]) -> list[Tensor [1, L, dim]] function."""
    def encode(texts):
        return [clip.encode_from_tokens(clip.tokenize(t)) for t in texts]
    return encode


def encode_distinct(encode, texts):
    """Encode each distinct text once; return one embedding per text, in order."""
    distinct = list(dict.fromkeys(texts))
    table = dict(zip(distinct, encode(distinct)))
    return [table[t] for t in texts]


class MoGAShotPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAShotPrompts",
            display_name=NODE,
            category=CATEGORY,
            description="The shots of one video, one per line, each with its own prompt and length, plus a story "
                        "prompt shared by all shots. Encodes each distinct prompt once with the connected text "
                        "encoder (CLIP Loader, type wan) or the model's own one.",
            inputs=[
                io.String.Input("shots", multiline=True, default=EXAMPLE_SHOTS,
                                tooltip="One shot per line. A length tag [41] (frames, 4n+1) or [2.5s] (seconds) at "
                                        "the start or end of a line; untagged lines get default_seconds. Lines "
                                        "starting with # are ignored. 'story: ...' / 'negative: ...' lines override "
                                        "the boxes below."),
                io.String.Input("story", multiline=True, default="",
                                tooltip="Put in front of every shot's prompt: who and where, so that the shots "
                                        "tell one story."),
                io.String.Input("negative", multiline=True, default=WAN_NEGATIVE,
                                tooltip="What to steer away from (used when cfg > 1). The default is Wan2.1's own."),
                io.Float.Input("default_seconds", default=3.0, min=0.1, max=120.0, step=0.1,
                               tooltip="Length of a shot without a length tag. Each shot is rounded to 4n+1 frames."),
                io.Int.Input("fps", default=16, min=1, max=120,
                             tooltip="Frames per second of the video (Wan2.1: 16). Sets how seconds become frames."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder: CLIP Loader with type 'wan' and umt5_xxl. Leave it "
                                      "unconnected for a model that brings its own (the demo model)."),
                MogaModel.Input("model", optional=True,
                                tooltip="Connect the MoGA model when it brings its own text encoder (the demo "
                                        "model) or to check the embeddings fit it."),
            ],
            outputs=[MogaShots.Output(display_name="shots")],
        )

    @classmethod
    def execute(cls, shots, story="", negative="", default_seconds=3.0, fps=16, clip=None,
                model=None) -> io.NodeOutput:
        from moga.shots import ShotPlan

        if model is not None and not isinstance(model, MoGAModelHandle):
            raise input_error(NODE, "model", "is not a MoGA model", "connect the output of MoGA Model Loader")
        if not isinstance(shots, str) or not shots.strip():
            raise input_error(NODE, "shots", "the shot list is empty", "write one shot prompt per line")
        if not default_seconds > 0:
            raise input_error(NODE, "default_seconds", f"{default_seconds} is not a length",
                              "use a positive number of seconds")
        if not fps > 0:
            raise input_error(NODE, "fps", f"{fps} is not a frame rate", "use a positive frame rate, e.g. 16")
        try:
            plan = ShotPlan.parse_text(shots, default_seconds=float(default_seconds), fps=fps, story=story,
                                       negative=negative)
        except ValueError as e:
            raise input_error(NODE, "shots", str(e), "fix that line (one prompt per line, [41] or [2.5s] "
                              "for its length)") from e

        own = model.text_encoder if model is not None else None
        if own is not None:
            if clip is not None:
                logging.warning("%s: the model brings its own text encoder; the connected CLIP is not used.", NODE)
            encode, source = own.encode, "model"
        elif clip is not None:
            encode, source = clip_encoder(clip), "clip"
        else:
            raise input_error(NODE, "clip", "no text encoder: nothing is connected to 'clip' and the model brings "
                              "none", "connect a CLIP Loader (type 'wan', umt5_xxl) to 'clip'")

        texts = plan.prompts() + [plan.negative]
        embeddings = encode_distinct(encode, texts)
        positive, negative_emb = embeddings[:-1], embeddings[-1]

        want = getattr(getattr(model.model, "config", None), "text_dim", None) if model is not None else None
        if want is not None and positive[0].shape[-1] != want:
            raise input_error(NODE, "clip", f"the text encoder gives {positive[0].shape[-1]}-wide embeddings but "
                              f"the model expects {want}", "use the text encoder made for this model (Wan2.1: "
                              "umt5_xxl in a CLIP Loader of type 'wan')")
        return io.NodeOutput(MoGAShotsValue(plan=plan, positive=positive, negative=negative_emb, encoder=source))
