"""The embedded demo model: its size, how it is built, and its one safetensors file.

The file holds the DiT under Wan's own names (so `moga.checkpoint.load_model` reads it like any
Wan checkpoint: same loader, same `moga.model.WanModel`), plus the demo's own text encoder
(`text_encoder.*`) and codec (`vae.*`). Header metadata `moga.extras = demo` makes the loader call
`load_demo_extras` (registered in `moga.checkpoint.EXTRA_LOADERS` when `moga.demo` is imported),
which attaches them as `model.text_encoder` and `model.vae`. `moga.demo` (JSON) holds their
settings, the world's frame size and shot length, and the recommended sampling settings.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..attention import MoGAConfig
from ..checkpoint import TensorSource, load_model, moga_metadata, register_extras, write_safetensors
from ..model import WanConfig, WanModel
from .codec import ClipCodec, DemoCodec, make_codec
from .text import DemoTextEncoder
from .world import DEFAULT_SHOT_FRAMES, DEFAULT_SIZE, SIZES

DEMO_PATH = Path(__file__).with_name("moga-demo.safetensors")
EXTRAS_NAME = "demo"
MAX_FILE_BYTES = 25 * 2 ** 20

TEXT = dict(dim=128, layers=2, heads=4, max_len=16)
CODEC = dict(latent_channels=16, hidden=160, blocks=3)
DIT = dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=6, in_dim=16, out_dim=16, freq_dim=256)
NUM_GROUPS = 8
MOGA = MoGAConfig(num_groups=NUM_GROUPS, window=(0, 2, 2), context_frames=1, fusion="mean")
# Sampling settings the demo model was tuned with (moga demo / moga.eval demo use them).
SAMPLING = dict(steps=40, cfg=4.0, shift=3.0, solver="unipc", fps=8)


def demo_wan_config(dense: bool = False, **overrides) -> WanConfig:
    cfg = dict(DIT, text_dim=TEXT["dim"], text_len=TEXT["max_len"])
    if not dense:
        cfg.update(num_groups=NUM_GROUPS, moga_layers=tuple(range(DIT["num_layers"])))
    cfg.update(overrides)
    return WanConfig(**cfg)


def build_demo(dense: bool = False, seed: int = 0, router_std: float = 0.02, **overrides):
    """(WanModel, DemoTextEncoder) with fresh weights, deterministic in `seed` (router rows at router_std)."""
    from ..train.trainer import init_wan_weights

    torch.manual_seed(seed)
    model = WanModel(demo_wan_config(dense, **overrides))
    init_wan_weights(model, seed, router_std)
    if not dense:
        model.moga_config = MOGA.replace(num_groups=model.config.num_groups)
    text = DemoTextEncoder(**{k: overrides.get(f"text_{k}", v) for k, v in TEXT.items()})
    return model, text


def world_record() -> dict:
    """What a demo model's pictures depend on: frame size, shot length, object sizes."""
    return {"size": DEFAULT_SIZE, "shot_frames": DEFAULT_SHOT_FRAMES, "object_sizes": dict(SIZES)}


def check_world(info: dict, path) -> None:
    """Warn when a file was trained on another world than this code draws and scores (its objects'
    sizes then read wrong); files without the record predate it (objects 0.075 / 0.125)."""
    trained = (info.get("world") or {}).get("object_sizes", {"small": 0.075, "large": 0.125})
    if {k: round(float(v), 4) for k, v in trained.items()} != {k: round(v, 4) for k, v in SIZES.items()}:
        warnings.warn(f"{path} was trained on objects of half-size {trained}, but this world draws and "
                      f"scores {dict(SIZES)}: size scores will be off; use the demo model shipped with "
                      f"this code or retrain it (`python -m moga.train demo`)", stacklevel=3)


def demo_metadata(model: WanModel, text: DemoTextEncoder, codec: ClipCodec, extra: dict | None = None) -> dict:
    cfg = model.config
    meta = {
        "moga.extras": EXTRAS_NAME,
        "moga.num_heads": str(cfg.num_heads),
        "moga.text_len": str(cfg.text_len),
        "moga.demo": json.dumps({
            "text_encoder": text.config(), "vae": codec.config(),
            "world": world_record(),
            "sampling": SAMPLING, "text_len": cfg.text_len, **(extra or {}),
        }, sort_keys=True),
    }
    if cfg.moga_layers:
        meta.update(moga_metadata(model.moga_config.replace(num_groups=cfg.num_groups), cfg.moga_layers,
                                  getattr(model, "dense_warmup", 0.0)))
    return meta


def save_demo(path, model: WanModel, text: DemoTextEncoder, codec: ClipCodec, dtype=torch.float16,
              extra: dict | None = None, max_bytes: int | None = MAX_FILE_BYTES) -> Path:
    """One safetensors file: DiT (Wan names) + text_encoder.* + vae.*, floats stored as `dtype`
    (router rows, the codec's latent statistics and a linear codec stay float32)."""
    tensors = {}
    for prefix, module in (("", model), ("text_encoder.", text), ("vae.", codec)):
        sd = module.dit_state_dict() if module is model else module.state_dict()
        for k, v in sd.items():
            keep32 = k.endswith("router.weight") or (module is codec and not isinstance(codec, DemoCodec)) \
                or k.startswith("latent_")
            if v.is_floating_point() and not keep32:
                v = v.to(dtype)
            tensors[prefix + k] = v.detach().cpu().contiguous()
    path = write_safetensors(path, tensors, demo_metadata(model, text, codec, extra))
    size = Path(path).stat().st_size
    if max_bytes and size > max_bytes:
        raise ValueError(f"{path} is {size / 2 ** 20:.1f} MiB, over the demo model's "
                         f"{max_bytes / 2 ** 20:.0f} MiB limit: store fewer or smaller tensors")
    return Path(path)


def _sub(source: TensorSource, prefix: str, device) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: source.get(k, device) for k in source.keys() if k.startswith(prefix)}


def load_demo_extras(source: TensorSource, metadata: dict, device="cpu", dtype=None) -> dict:
    """`moga.checkpoint` extras loader for `moga.extras = demo`: the text encoder and the codec
    (float32 on `device`: both are small, and the codec's output is compared pixel by pixel)."""
    try:
        info = json.loads(metadata["moga.demo"])
        text = DemoTextEncoder(**{k: v if k != "vocab" else tuple(v) for k, v in info["text_encoder"].items()})
        codec = make_codec(info["vae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source.path}: its 'moga.demo' metadata is missing or invalid ({exc}); "
                         f"the file is not a complete demo model") from exc
    for module, prefix in ((text, "text_encoder."), (codec, "vae.")):
        sd = {k: v.float() for k, v in _sub(source, prefix, "cpu").items()}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source.path}: the {prefix[:-1]} tensors do not match (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        module.to(device).eval().requires_grad_(False)
    text.demo_info = codec.demo_info = info
    return {"text_encoder": text, "vae": codec}


register_extras(EXTRAS_NAME, load_demo_extras)


def demo_info(model: WanModel) -> dict:
    """The `moga.demo` settings of a loaded demo model (raises when it is not one)."""
    info = getattr(model.vae, "demo_info", None)
    if info is None or model.text_encoder is None:
        raise ValueError("this model is not the demo model (it brings no demo text encoder/codec); "
                         "load moga/demo/moga-demo.safetensors or pass --checkpoint to a demo file")
    return info


def load_demo(path=None, device="cpu") -> WanModel:
    """The demo model with `.text_encoder` and `.vae`, float32 on `device`."""
    path = Path(path or DEMO_PATH)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the demo model ships in the package as "
                                f"moga/demo/moga-demo.safetensors; reinstall, or train one with "
                                f"`python -m moga.train demo`")
    model = load_model(path, device=device, dtype=torch.float32)
    info = demo_info(model)
    check_world(info, path)
    _fix_text_len(model, int(info.get("text_len", model.config.text_len)))
    return model


def _fix_text_len(model: WanModel, text_len: int) -> None:
    """The DiT pads captions to `text_len` zeros; the demo model was trained with 16, not Wan's 512."""
    if model.config.text_len != text_len:
        model.config = model.config.replace(text_len=text_len)
