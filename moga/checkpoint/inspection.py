"""What a file is, from its header alone: the key layout, the Wan config, the MoGA settings, and a clear
error for anything that is not a supported Wan DiT (a VAE, a text encoder, a LoRA, another variant)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

from ..attention import MoGAConfig
from ..model import WanConfig
from .errors import CheckpointError
from .layouts import EXTRA_PREFIXES, canonical_key, detect_layout
from .moga_format import _moga_settings, _num_heads, format_layers, sampler_defaults
from .safetensors_io import TensorSource

def _what_else(keys: list[str]) -> str | None:
    """Name the kind of file when it is clearly not a diffusion model."""
    ks = [k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k for k in keys]
    has = lambda *parts: any(any(p in k for p in parts) for k in ks)  # noqa: E731
    if has("lora_A", "lora_B", "lora_up", "lora_down", ".lora.", "lora_unet") or any(k.endswith(".diff_b") for k in ks):
        return ("a LoRA, not a model: load the model and give the LoRA with it (load_model(model, "
                "loras=[(file, 1.0)]), --lora FILE in the CLI, the MoGA LoRA node in ComfyUI)")
    if has("encoder.block.", "shared.weight", "SelfAttention.relative_attention_bias", "token_embd"):
        return "a text encoder (T5 / umT5): choose the diffusion model file; the text encoder is a separate input"
    if (has("decoder.") and has("encoder.")) or has("quant_conv", "post_quant_conv", "decoder.conv_in", "decoder.conv1"):
        return "a VAE: choose the diffusion model file; the VAE is loaded separately"
    if has("visual.", "vision_model.", "log_scale", "text_projection"):
        return "a CLIP image/text encoder: choose the diffusion model file"
    return None


def _variant(canon: Mapping[str, tuple]) -> str | None:
    """Name an unsupported Wan variant found in canonical keys/shapes, or None for the supported ones
    (Wan2.1 T2V / I2V, Wan2.2 A14B T2V / I2V experts, Wan2.2 TI2V-5B: `WanConfig.conditioning`)."""
    keys = set(canon)
    tag = lambda what: f"{what}; supported: Wan2.1 T2V and I2V, Wan2.2 A14B T2V and I2V experts, Wan2.2 TI2V-5B"  # noqa: E731
    if any(k.startswith("vace_") for k in keys):
        return tag("a Wan VACE model (vace_blocks)")
    if any(k.startswith("control_adapter.") for k in keys):
        return tag("a Wan camera-control model")
    if any(k.startswith(("casual_audio_encoder.", "audio_proj.")) for k in keys):
        return tag("a Wan audio-driven model (S2V / HuMo)")
    if any(k.startswith("face_adapter.") for k in keys):
        return tag("a Wan Animate model")
    if "img_emb.emb_pos" in keys:
        return tag("a Wan2.1 first-last-frame-to-video (FLF2V) model (img_emb.emb_pos)")
    if any(k.startswith("img_emb.") for k in keys) != any(".k_img." in k for k in keys):
        return tag("an incomplete Wan2.1 I2V model (img_emb and cross_attn.k_img come together)")
    pe, hh = canon.get("patch_embedding.weight"), canon.get("head.head.weight")
    if pe is not None and hh is not None and len(pe) == 5:
        in_dim, out_dim = pe[1], hh[0] // max(1, math.prod(pe[2:]))
        if in_dim != out_dim and in_dim != 2 * out_dim + 4:
            return tag(f"an image/control-conditioned Wan model (input channels {in_dim}, output {out_dim}: "
                       f"not the noise + 4 mask + {out_dim} image-latent channels of Wan's I2V)")
    if any(k.startswith("ref_conv.") for k in keys):
        return tag("a Wan Fun reference-image model (ref_conv)")
    return None


@dataclass
class Plan:
    """What a file holds, decided from its header: everything load/inspect/patch need."""

    source: TensorSource
    layout: str
    names: dict[str, str]        # canonical -> key in the file (DiT tensors, scale_weight, routers)
    config: WanConfig
    moga: MoGAConfig | None
    dense_warmup: float
    scaled_fp8: bool
    extras: str | None
    ignored: list[str] = field(default_factory=list)
    sampler: dict = field(default_factory=dict)   # the file's sampler defaults (moga.sampler.*)


def plan_checkpoint(path, num_heads: int | None = None) -> Plan:
    if not isinstance(path, TensorSource):
        from .experts import find_experts  # here, not at import: experts.py imports the loader
        pair = find_experts(path)
        if pair is not None:
            raise CheckpointError(f"{path} holds a Wan2.2 A14B expert pair ({pair[0].name} + {pair[1].name}), "
                                  f"not one model: load it with moga.checkpoint.load_experts (moga generate "
                                  f"--model FOLDER does), or name one expert's file")
    src = path if isinstance(path, TensorSource) else TensorSource(path)
    keys = src.keys()
    if not keys:
        raise CheckpointError(f"{src.path} holds no tensors")
    meta = src.metadata
    extras = meta.get("moga.extras") or None
    dit_keys = [k for k in keys if not k.startswith(EXTRA_PREFIXES)]
    layout = detect_layout(dit_keys)
    if layout is None:
        other = _what_else(keys)
        sample = ", ".join(keys[:3])
        raise CheckpointError(f"{src.path} is {other}" if other else
                              f"{src.path} is not a Wan2.1 diffusion model: none of its {len(keys)} "
                              f"tensors ({sample}, ...) has Wan's names")
    names, ignored = {}, []
    for k in dit_keys:
        c = canonical_key(k, layout)
        if c is None:
            ignored.append(k)
        else:
            names[c] = k
    shapes = {c: src.shape(k) for c, k in names.items()}
    variant = _variant(shapes)
    if variant:
        raise CheckpointError(f"{src.path} is {variant}")
    if "head.modulation" not in shapes or "patch_embedding.weight" not in shapes:
        other = _what_else(keys)
        raise CheckpointError(f"{src.path} is {other}" if other else
                              f"{src.path} lacks Wan's head/patch embedding: it is not a complete Wan2.1 DiT")
    if num_heads is None:
        num_heads = _num_heads(meta, src.folder_config)
    try:
        cfg = WanConfig.from_state_dict(shapes, num_heads=num_heads)
        if meta.get("moga.text_len"):  # a model trained with another text padding length (the demo: 16)
            cfg = cfg.replace(text_len=int(meta["moga.text_len"]))
    except ValueError as exc:
        raise CheckpointError(f"{src.path}: {exc}") from exc
    moga, warmup = _moga_settings(meta, cfg, src.path)
    scaled = "scaled_fp8" in names
    names.pop("scaled_fp8", None)
    for c in [c for c in names if c.endswith(".scale_input")]:  # only for fp8 matmuls; unused
        ignored.append(names.pop(c))
    return Plan(src, layout, names, cfg, moga, warmup, scaled, extras, ignored, sampler_defaults(meta, src.path))


@dataclass
class CheckpointInfo:
    path: str
    architecture: str
    layout: str
    size_bytes: int
    num_params: int
    dtypes: dict            # dtype name -> parameter count
    scaled_fp8: bool
    config: dict
    moga: dict | None       # num_groups, window, context_frames, layers, fusion, dense_warmup, capacity(_split)
    extras: str | None
    metadata: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        c = self.config
        gib = self.size_bytes / 2**30
        dt = ", ".join(f"{k} {v / 1e9:.2f}B" if v >= 1e8 else f"{k} {v:,}" for k, v in self.dtypes.items())
        lines = [
            f"{self.path}",
            f"  model:      {self.architecture}  ({self.num_params / 1e9:.2f}B parameters, {gib:.2f} GiB)",
            f"  shape:      dim {c['dim']}, {c['num_layers']} layers, {c['num_heads']} heads, FFN {c['ffn_dim']}, "
            f"text {c['text_dim']}, latent channels {c['in_dim']}",
            f"  key layout: {self.layout}",
            f"  dtypes:     {dt}" + ("  (scaled fp8)" if self.scaled_fp8 else ""),
        ]
        if self.moga:
            m = self.moga
            lines.append(f"  MoGA:       {m['num_groups']} groups, window {m['window']}, context frames "
                         f"{m['context_frames']}, fusion {m['fusion']}, routers in layers {m['layers']}, "
                         f"dense warm-up {m['dense_warmup']}, group capacity {m.get('capacity') or 'off'}"
                         + (f" ({m.get('capacity_split', 'runs')})" if m.get('capacity') else ""))
        else:
            lines.append("  MoGA:       no routers (runs dense; `moga patch` adds them)")
        if self.extras:
            lines.append(f"  extras:     {self.extras} (own text encoder / VAE)")
        if self.metadata.get("moga.train"):  # written by `moga train wan` (moga/train/wan/export.py)
            try:
                t = json.loads(self.metadata["moga.train"])
                lines.append(f"  trained:    {t.get('mode')} fine-tune, {t.get('steps')} steps, lr {t.get('lr')}, "
                             f"routers from {t.get('routers_init')}, base {t.get('base')}, {t.get('date')}")
            except (ValueError, AttributeError):
                lines.append("  trained:    (unreadable moga.train record)")
        return "\n".join(lines)


def inspect_checkpoint(path, num_heads: int | None = None) -> CheckpointInfo:
    """What a checkpoint is, from its header alone (no tensor is read)."""
    plan = plan_checkpoint(path, num_heads=num_heads)
    src = plan.source
    dtypes: dict[str, int] = {}
    for canon, key in plan.names.items():
        if canon.endswith(".scale_weight"):
            continue
        e = src.entries[key]
        dtypes[e.dtype] = dtypes.get(e.dtype, 0) + math.prod(e.shape)
    cfg = plan.config
    moga = None
    if plan.moga is not None:
        moga = dict(num_groups=plan.moga.num_groups, window=",".join(map(str, plan.moga.window)),
                    context_frames=plan.moga.context_frames, layers=format_layers(cfg.moga_layers),
                    fusion=plan.moga.fusion, dense_warmup=plan.dense_warmup, capacity=plan.moga.capacity,
                    capacity_split=plan.moga.capacity_split)
    conf = asdict(cfg)
    conf["patch_size"] = list(cfg.patch_size)
    conf["moga_layers"] = list(cfg.moga_layers)
    return CheckpointInfo(
        path=str(src.path), architecture=cfg.name, layout=plan.layout, size_bytes=src.size_bytes,
        num_params=sum(dtypes.values()), dtypes=dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        scaled_fp8=plan.scaled_fp8, config=conf, moga=moga, extras=plan.extras, metadata=dict(src.metadata))
