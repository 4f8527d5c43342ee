"""Wan2.1 T2V checkpoints (safetensors only): reading every published key layout, the MoGA format,
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
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .attention import MoGAConfig
from .model import FP8_DTYPES, WanConfig, WanModel

FORMAT_VERSION = "1"
PREFIX_COMFYUI = "model.diffusion_model."
LAYOUTS = ("wan", "comfyui", "diffusers")
EXTRA_PREFIXES = ("text_encoder.", "vae.", "extras.")  # never DiT keys: they belong to the extras

# ---- extras registration point -----------------------------------------------------------------
# EXTRA_LOADERS[name](source, metadata, device, dtype) -> {"text_encoder": obj | None, "vae": obj | None}
#   name: the value of the file's `moga.extras` metadata; source: the file's TensorSource (read
#   the extras' tensors with source.get(key); keys under EXTRA_PREFIXES are left to you).
# Register with `register_extras(name, fn)` from the module that defines the extras (moga.demo).
EXTRA_LOADERS: dict[str, Callable] = {}


def register_extras(name: str, loader: Callable) -> None:
    EXTRA_LOADERS[name] = loader


class CheckpointError(ValueError):
    """A file that cannot be loaded as a Wan2.1 T2V checkpoint; the message says why and what to do."""


# ---- safetensors files ----------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items() if v is not None}
_NOT_SAFETENSORS_HINTS = {
    (".pt", ".pth", ".ckpt", ".bin", ".pkl"): "it looks like a pickle checkpoint; pickles are never "
    "loaded (they can run code): use the .safetensors release of the model",
    (".gguf",): "GGUF-quantised files are not supported: use a .safetensors file (bf16, fp16 or fp8)",
}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str
    shape: tuple
    begin: int  # absolute byte offsets in `file`
    end: int


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of one safetensors file, validated against its size."""
    path = Path(path)
    size = path.stat().st_size
    hint = next((h for exts, h in _NOT_SAFETENSORS_HINTS.items() if path.suffix.lower() in exts), None)

    def not_st(why):
        raise CheckpointError(f"{path} is not a safetensors file ({why})"
                              + (f": {hint}" if hint else ": choose a .safetensors model file"))

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            not_st(f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        first = fh.read(1)
        if first != b"{":
            not_st("no JSON header at its start")
        if n > 100_000_000:
            not_st("its header length is implausible")
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated: its header alone needs {8 + n} bytes but the file has {size}; "
                f"the download or copy was cut short: fetch the file again")
        raw = first + fh.read(n - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        not_st("its header is not valid JSON")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries, data_end = {}, 0
    for name, e in header.items():
        try:
            b, e_ = (int(x) for x in e["data_offsets"])
            entries[name] = Entry(path, str(e["dtype"]), tuple(int(s) for s in e["shape"]), start + b, start + e_)
            data_end = max(data_end, e_)
        except (KeyError, TypeError, ValueError):
            not_st(f"entry {name!r} of its header is malformed")
    if start + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {start + data_end} bytes but the file has "
            f"{size} ({start + data_end - size} missing); the download or copy was cut short: fetch "
            f"the file again")
    return entries, {str(k): str(v) for k, v in metadata.items()}, start


class TensorSource:
    """One .safetensors file, or a folder of shards (diffusers / Wan releases): the header is read
    up front; tensors are read one at a time through memory-mapped `safe_open` handles."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist")
        self.files = self._files(self.path)
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            entries, meta, _ = read_header(f)
            self.entries.update(entries)
            self.metadata = {**meta, **self.metadata}
        self.folder_config = self._folder_config()
        self._handles: dict = {}

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        for folder in (path, path / "transformer"):
            index = sorted(folder.glob("*.safetensors.index.json"))
            if index:
                names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
                missing = [n for n in names if not (folder / n).is_file()]
                if missing:
                    raise CheckpointError(f"{folder} lacks shards listed in {index[0].name}: {missing}")
                return [folder / n for n in names]
            files = sorted(folder.glob("*.safetensors"))
            if files:
                return files
        raise CheckpointError(f"{path} holds no .safetensors file (nor a transformer/ folder with one)")

    def _folder_config(self) -> dict:
        folder = self.files[0].parent
        cfg = folder / "config.json"
        if self.path.is_dir() and cfg.is_file():
            try:
                return json.loads(cfg.read_text())
            except ValueError:
                return {}
        return {}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype | None:
        return _DTYPES.get(self.entries[key].dtype)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, key: str, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        entry = self.entries[key]
        dev = str(torch.device(device))
        handle = self._handles.get((entry.file, dev))
        if handle is None:
            try:
                handle = safe_open(str(entry.file), framework="pt", device=dev)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{entry.file} could not be opened as safetensors: {exc}") from exc
            self._handles[(entry.file, dev)] = handle
        return handle.get_tensor(key)

    def read_bytes(self, key: str, out, chunk: int = 1 << 26) -> None:
        """Copy one tensor's stored bytes, unchanged, into the open binary file `out`."""
        entry = self.entries[key]
        with open(entry.file, "rb") as fh:
            fh.seek(entry.begin)
            left = entry.end - entry.begin
            while left:
                buf = fh.read(min(chunk, left))
                if not buf:
                    raise CheckpointError(f"{entry.file} ended early while copying {key}")
                out.write(buf)
                left -= len(buf)

    def close(self) -> None:
        self._handles.clear()


def write_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      copy_from: Mapping[str, TensorSource] | None = None) -> Path:
    """Write a safetensors file; tensors in `copy_from` (name -> TensorSource holding that name) are
    byte-copied from their source without being loaded. Atomic: written beside, then renamed."""
    path = Path(path)
    copy_from = dict(copy_from or {})
    items = []  # (name, dtype name, shape, nbytes, writer)
    for name, src in copy_from.items():
        e = src.entries[name]
        items.append((name, e.dtype, e.shape, e.end - e.begin, ("copy", src)))
    for name, t in tensors.items():
        if name in copy_from:
            raise ValueError(f"{name} is both copied and given")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        t = t.detach().contiguous().cpu()
        items.append((name, _DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size(), ("tensor", t)))
    # as the safetensors library: larger elements first (keeps data aligned), then by name
    size_of = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    items.sort(key=lambda it: (-size_of.get(it[1], 1), it[0]))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dt, shape, nbytes, _ in items:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, _, _, nbytes, (kind, obj) in items:
            if kind == "copy":
                obj.read_bytes(name, out)
            elif nbytes:
                out.write(_tensor_bytes(obj))
    os.replace(tmp, path)
    return path


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    if flat.dtype in FP8_DTYPES or flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    elif flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


# ---- key layouts --------------------------------------------------------------------------------

# Wan original -> diffusers (WanTransformer3DModel), prefixes of the part after `blocks.N.` / of the
# whole key; an entry without a trailing dot matches the whole remainder exactly.
_DIFFUSERS_BLOCK = [
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."), ("self_attn.router.", "attn1.router."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."), ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."), ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."), ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_DIFFUSERS_TOP = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"), ("head.head.", "proj_out."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(rest: str, table, reverse: bool) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if src.endswith("."):
            if rest.startswith(src):
                return dst + rest[len(src):]
        elif rest == src:
            return dst
    return None


def wan_to_diffusers(key: str) -> str:
    m = _BLOCK_RE.match(key)
    if m:
        new = _rename(m.group(2), _DIFFUSERS_BLOCK, False)
        return f"blocks.{m.group(1)}.{new}" if new else key
    return _rename(key, _DIFFUSERS_TOP, False) or key


def diffusers_to_wan(key: str) -> str | None:
    m = _BLOCK_RE.match(key)
    if m:
        new = _rename(m.group(2), _DIFFUSERS_BLOCK, True)
        return f"blocks.{m.group(1)}.{new}" if new else None
    return _rename(key, _DIFFUSERS_TOP, True)


def detect_layout(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith(PREFIX_COMFYUI) for k in keys):
        return "comfyui"
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in keys):
        return "diffusers"
    if any(k in ("head.modulation", "patch_embedding.weight") or k.startswith("blocks.") for k in keys):
        return "wan"
    return None


def canonical_key(key: str, layout: str) -> str | None:
    """The Wan-original name of `key` in `layout`, or None when it is no DiT key."""
    if key.startswith(EXTRA_PREFIXES):
        return None
    if layout == "comfyui":
        if key.startswith(PREFIX_COMFYUI):
            return key[len(PREFIX_COMFYUI):]
        return key if key == "scaled_fp8" else None
    if layout == "diffusers":
        if key == "scaled_fp8":
            return key
        for suffix in ("scale_weight", "scale_input"):
            if key.endswith("." + suffix):
                base = diffusers_to_wan(key[: -len(suffix)] + "weight")
                return base[: -len("weight")] + suffix if base else None
        return diffusers_to_wan(key)
    return key


def to_layout(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a Wan-original state dict into `layout` ("wan", "comfyui", "diffusers")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "wan":
        return dict(sd)
    if layout == "comfyui":
        return {PREFIX_COMFYUI + k: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        suffix = k.rsplit(".", 1)[-1]
        if suffix in ("scale_weight", "scale_input"):
            out[wan_to_diffusers(k[: -len(suffix)] + "weight")[: -len("weight")] + suffix] = v
        else:
            out[wan_to_diffusers(k)] = v
    return out


def router_key(layer: int, layout: str) -> str:
    """Where a router lives in a file of `layout` (canonical: blocks.{i}.self_attn.router.weight)."""
    return to_layout({f"blocks.{layer}.self_attn.router.weight": None}, layout).popitem()[0]


# ---- recognising what a file is -----------------------------------------------------------------


def _what_else(keys: list[str]) -> str | None:
    """Name the kind of file when it is clearly not a diffusion model."""
    ks = [k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k for k in keys]
    has = lambda *parts: any(any(p in k for p in parts) for k in ks)  # noqa: E731
    if has("lora_A", "lora_B", "lora_up", "lora_down", ".lora.", "lora_unet") or any(k.endswith(".diff_b") for k in ks):
        return "a LoRA (load it on top of a model; LoRAs are not supported by this loader yet)"
    if has("encoder.block.", "shared.weight", "SelfAttention.relative_attention_bias", "token_embd"):
        return "a text encoder (T5 / umT5): choose the diffusion model file; the text encoder is a separate input"
    if (has("decoder.") and has("encoder.")) or has("quant_conv", "post_quant_conv", "decoder.conv_in", "decoder.conv1"):
        return "a VAE: choose the diffusion model file; the VAE is loaded separately"
    if has("visual.", "vision_model.", "log_scale", "text_projection"):
        return "a CLIP image/text encoder: choose the diffusion model file"
    return None


def _variant(canon: Mapping[str, tuple]) -> str | None:
    """Name an unsupported Wan variant found in canonical keys/shapes, or None for Wan2.1 T2V."""
    keys = set(canon)
    tag = lambda what: f"{what}; only Wan2.1-architecture text-to-video models are supported yet"  # noqa: E731
    if any(k.startswith("vace_") for k in keys):
        return tag("a Wan VACE model (vace_blocks)")
    if any(k.startswith("control_adapter.") for k in keys):
        return tag("a Wan camera-control model")
    if any(k.startswith(("casual_audio_encoder.", "audio_proj.")) for k in keys):
        return tag("a Wan audio-driven model (S2V / HuMo)")
    if any(k.startswith("face_adapter.") for k in keys):
        return tag("a Wan Animate model")
    if any(k.startswith("img_emb.") for k in keys) or any(".k_img." in k for k in keys):
        kind = "first-last-frame-to-video (FLF2V)" if "img_emb.emb_pos" in keys else "image-to-video (I2V)"
        return tag(f"a Wan2.1 {kind} model (it has the CLIP image embedding img_emb / k_img)")
    pe, hh = canon.get("patch_embedding.weight"), canon.get("head.head.weight")
    if pe is not None and hh is not None and len(pe) == 5:
        in_dim, out_dim = pe[1], hh[0] // max(1, math.prod(pe[2:]))
        if out_dim == 48:
            return tag(f"a Wan2.2 TI2V-5B model (48-channel Wan2.2 VAE latents, dim {pe[0]})")
        if in_dim != out_dim:
            what = "a Wan2.2 I2V-A14B model" if in_dim == 36 else "an image/control-conditioned Wan model"
            return tag(f"{what} (input channels {in_dim} != output channels {out_dim}: the latent is "
                       f"concatenated with a conditioning image)")
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


def plan_checkpoint(path, num_heads: int | None = None) -> Plan:
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
    return Plan(src, layout, names, cfg, moga, warmup, scaled, extras, ignored)


def _num_heads(meta: Mapping[str, str], folder_cfg: Mapping) -> int | None:
    for value in (meta.get("moga.num_heads"), folder_cfg.get("num_attention_heads"), folder_cfg.get("num_heads")):
        if value not in (None, ""):
            return int(value)
    return None


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-29' or '0-9,20-29' -> sorted layer indices."""
    out = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-"))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CheckpointError(f"moga.layers {text!r} is not a list of layer indices like '0-29' or '0,2,4'") from None
    return tuple(sorted(out))


def format_layers(layers: Iterable[int]) -> str:
    """Sorted indices as ranges: (0, 1, 2, 5) -> '0-2,5'."""
    layers = sorted(set(int(i) for i in layers))
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


def moga_metadata(cfg: MoGAConfig, layers: Iterable[int], dense_warmup: float = 0.0) -> dict[str, str]:
    """The header metadata of a MoGA checkpoint (docs/checkpoint-format.md)."""
    return {
        "moga.format_version": FORMAT_VERSION,
        "moga.num_groups": str(cfg.num_groups),
        "moga.window": ",".join(str(w) for w in cfg.window),
        "moga.context_frames": str(cfg.context_frames),
        "moga.layers": format_layers(layers),
        "moga.fusion": cfg.fusion,
        "moga.dense_warmup": repr(float(dense_warmup)),
        "moga.capacity": repr(float(cfg.capacity or 0.0)),
        "moga.capacity_split": cfg.capacity_split,
    }


def _moga_settings(meta: Mapping[str, str], cfg: WanConfig, path) -> tuple[MoGAConfig | None, float]:
    has_meta = any(k.startswith("moga.") and k not in ("moga.num_heads", "moga.extras") for k in meta)
    if not cfg.moga_layers:
        if has_meta and meta.get("moga.layers", "").strip():
            raise CheckpointError(f"{path}: its metadata names MoGA layers {meta['moga.layers']} but the "
                                  f"file has no router tensors (blocks.N.self_attn.router.weight): "
                                  f"re-run `moga patch` on the plain checkpoint")
        return None, 0.0
    version = meta.get("moga.format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: MoGA format version {version} is newer than this moga "
                              f"(reads {FORMAT_VERSION}): update the package")
    try:
        capacity = float(meta.get("moga.capacity", 0.0))
    except ValueError:
        raise CheckpointError(f"{path}: invalid MoGA metadata: moga.capacity {meta['moga.capacity']!r} is not a "
                              f"number (0 = off, 1.0 = the balanced group size)") from None
    try:
        m = int(meta.get("moga.num_groups", cfg.num_groups))
        window = MoGAConfig.parse_window(meta.get("moga.window", "0,2,2"))
        settings = MoGAConfig(num_groups=m, window=window,
                              context_frames=int(meta.get("moga.context_frames", 1)),
                              fusion=meta.get("moga.fusion", "mean"),
                              capacity=capacity, capacity_split=meta.get("moga.capacity_split", "runs"))
        warmup = float(meta.get("moga.dense_warmup", 0.0))
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid MoGA metadata: {exc}") from exc
    if m != cfg.num_groups:
        raise CheckpointError(f"{path}: metadata says moga.num_groups={m} but the routers have "
                              f"{cfg.num_groups} rows: the routers and the metadata disagree; re-run "
                              f"`moga patch`")
    if "moga.layers" in meta:
        layers = parse_layers(meta["moga.layers"])
        if layers != cfg.moga_layers:
            raise CheckpointError(f"{path}: metadata moga.layers={meta['moga.layers']} but routers exist for "
                                  f"layers {format_layers(cfg.moga_layers)}: the routers and the metadata "
                                  f"disagree; re-run `moga patch`")
    return settings, warmup


# ---- loading ------------------------------------------------------------------------------------


def load_model(path, device="cpu", dtype: torch.dtype | None = None, num_heads: int | None = None) -> WanModel:
    """Load a Wan2.1 T2V checkpoint (file or diffusers/Wan folder; any key layout) as a WanModel.

    dtype: the dtype floating weights are stored in on `device` (None: as in the file). fp8 weights
    stay fp8 and are upcast per layer at compute time, to `dtype` if given (else bfloat16). Router
    weights keep their stored dtype. The model is in eval mode with requires_grad off.
    """
    if dtype is not None and dtype in FP8_DTYPES:
        raise ValueError("dtype must be a compute dtype (bfloat16, float16, float32); fp8 files keep "
                         "their fp8 weights by themselves")
    plan = plan_checkpoint(path, num_heads=num_heads)
    src, cfg = plan.source, plan.config
    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in plan.names]
    if missing:
        raise CheckpointError(f"{src.path} lacks {len(missing)} tensors of the Wan2.1 DiT "
                              f"({', '.join(missing[:4])}...): the file is incomplete or another model")
    for canon, key in plan.names.items():
        if canon.endswith(".scale_weight"):
            continue
        if canon not in expected:
            plan.ignored.append(key)
            continue
        t = src.get(key, device)
        if tuple(t.shape) != tuple(expected[canon].shape):
            raise CheckpointError(f"{src.path}: {key} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[canon].shape)}")
        read = t
        if dtype is not None and t.is_floating_point() and t.dtype not in FP8_DTYPES \
                and not canon.endswith("router.weight"):
            t = t.to(dtype)
        if t is read and t.device.type == "cpu":
            # safetensors hands out views of the memory map: own the tensor (writable, and aligned,
            # so the kernels, hence the outputs, do not depend on where the tensor sat in the file)
            t = t.clone()
        _assign(model, canon, t)
    for canon, key in plan.names.items():
        if canon.endswith(".scale_weight"):
            owner = canon[: -len(".scale_weight")]
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                raise CheckpointError(f"{src.path}: {key} scales a weight the model does not have") from None
            module.register_buffer("scale_weight", src.get(key, device).float().reshape(()).clone())
    if plan.ignored:
        unknown = [k for k in plan.ignored if not k.endswith(".scale_input")]
        if unknown and not plan.extras:
            warnings.warn(f"{src.path}: ignored {len(unknown)} tensors that are not part of the Wan2.1 "
                          f"T2V DiT ({', '.join(unknown[:4])}...)", stacklevel=2)
    if plan.moga is not None:
        model.moga_config = plan.moga
    model.dense_warmup = plan.dense_warmup
    if dtype is not None:
        model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    model.source_path = str(src.path)
    if plan.extras:
        loader = EXTRA_LOADERS.get(plan.extras)
        if loader is None:
            raise CheckpointError(
                f"{src.path} brings its own text encoder/VAE ('moga.extras' = {plan.extras!r}) but no "
                f"loader is registered for it (registered: {sorted(EXTRA_LOADERS) or 'none'}): import "
                f"the module that defines it (e.g. moga.demo) before loading")
        parts = loader(src, dict(src.metadata), device, dtype) or {}
        model.text_encoder = parts.get("text_encoder")
        model.vae = parts.get("vae")
    src.close()
    return model


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = t
    else:
        raise CheckpointError(f"the model has no tensor {name}")


# ---- inspecting ---------------------------------------------------------------------------------


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
        if self.metadata.get("moga.train"):  # written by `moga train wan` (moga/train/wan.py)
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


# ---- saving -------------------------------------------------------------------------------------


def save_checkpoint(model_or_state, path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors checkpoint. A WanModel is written under Wan's original names with its
    routers and MoGA metadata (from `model.moga_config`); a dict is written as given."""
    meta: dict[str, str] = {}
    if isinstance(model_or_state, WanModel):
        model = model_or_state
        sd = model.dit_state_dict()
        cfg = model.config
        if cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
            meta["moga.num_heads"] = str(cfg.num_heads)
        if cfg.moga_layers:
            mc = model.moga_config.replace(num_groups=cfg.num_groups)
            meta.update(moga_metadata(mc, cfg.moga_layers, model.dense_warmup))
    else:
        sd = dict(model_or_state)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return write_safetensors(path, sd, meta)


# ---- patching: adding routers ---------------------------------------------------------------------

# Dense warm-up written into calibrated checkpoints (fraction of the first sampling steps that run dense
# attention); chosen from the measurements in docs/training-free.md. Trained routers get 0.
CALIBRATED_DENSE_WARMUP = 0.25
# Group capacity written into calibrated checkpoints (MoGAConfig.capacity: routed groups over
# ceil(capacity * N / M) tokens are cut into runs); k-means groups are very unbalanced, so uncapped
# they leave most of dense attention's FLOPs (docs/training-free.md). Trained routers get None (off).
CALIBRATED_CAPACITY = 1.0


def patch_checkpoint(src, dst, num_groups: int | None, window="0,2,2", routers=None, calibrate: bool = True,
                     *, layers=None, context_frames: int = 1, fusion: str | None = None,
                     dense_warmup: float | None = None, capacity: float | None = None,
                     calibration_size=(9, 30, 52),
                     calibration_steps: int = 3, calibration_context: torch.Tensor | None = None,
                     calibration_tokens: int = 8192, seed: int = 0, device="cpu",
                     dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None,
                     num_heads: int | None = None) -> CheckpointInfo:
    """Turn a Wan2.1 T2V checkpoint into a MoGA checkpoint at `dst` (a new file).

    Routers come from `routers` (a router file: safetensors with blocks.{i}.self_attn.router.weight in
    any key layout, or a dict {layer: tensor [M, dim]}), else, with `calibrate`, from training-free
    calibration: a short seeded denoising pass (`calibration_steps` Euler steps of the model itself
    on a seeded latent of `calibration_size` = latent (frames, height, width), and
    `calibration_context` or a seeded random text embedding), then per layer k-means (cosine) of
    the self-attention input tokens into M groups; the unit centroids are the router rows.
    Every other tensor of `src` is written with the same name, dtype and bytes; existing routers
    are replaced. fusion defaults to "mean" for a router file (trained) and "lse" for calibration;
    dense_warmup (the fraction of early sampling steps to run dense) to 0.0 and CALIBRATED_DENSE_WARMUP;
    capacity (MoGAConfig.capacity, 0 = off) to off and CALIBRATED_CAPACITY.
    """
    say = progress or (lambda msg: None)
    dst = Path(dst)
    plan = plan_checkpoint(src, num_heads=num_heads)
    source, cfg = plan.source, plan.config
    if dst.resolve() == source.path.resolve() or dst.resolve() in [f.resolve() for f in source.files]:
        raise ValueError(f"dst {dst} is the source: write the patched checkpoint to a new file")
    if isinstance(window, str):
        window = MoGAConfig.parse_window(window)
    chosen = tuple(range(cfg.num_layers)) if layers is None else tuple(sorted(int(i) for i in layers))
    if not chosen or any(not 0 <= i < cfg.num_layers for i in chosen):
        raise ValueError(f"layers {chosen} must be indices in 0..{cfg.num_layers - 1}")
    if routers is not None:
        weights = _router_weights(routers, cfg)
        if layers is not None:
            weights = {i: w for i, w in weights.items() if i in chosen}
        m = {w.shape[0] for w in weights.values()}.pop()
        if num_groups not in (None, m):
            raise ValueError(f"the router file has {m} groups but num_groups={num_groups}: pass "
                             f"num_groups={m} (or None), or calibrate new routers")
        num_groups = m
        fusion = fusion or "mean"
        warmup = 0.0 if dense_warmup is None else dense_warmup
        cap = capacity
    elif calibrate:
        if not num_groups or num_groups < 1:
            raise ValueError("calibration needs num_groups >= 1 (the router's group count M)")
        say(f"calibrating {num_groups} groups in {len(chosen)} layers")
        weights = calibrate_routers(source.path if not isinstance(src, TensorSource) else src,
                                    num_groups, chosen, size=calibration_size, steps=calibration_steps,
                                    context=calibration_context, max_tokens=calibration_tokens, seed=seed,
                                    device=device, dtype=dtype, num_heads=num_heads)
        fusion = fusion or "lse"
        warmup = CALIBRATED_DENSE_WARMUP if dense_warmup is None else dense_warmup
        cap = CALIBRATED_CAPACITY if capacity is None else capacity
    else:
        raise ValueError("give routers (a router file from training) or calibrate=True")
    settings = MoGAConfig(num_groups=int(num_groups), window=window, context_frames=context_frames, fusion=fusion,
                          capacity=cap)

    old_routers = {k for c, k in plan.names.items() if c.endswith(".self_attn.router.weight")}
    copy = {k: source for k in source.keys() if k not in old_routers}
    new = {router_key(i, plan.layout): w.detach().float().cpu().contiguous() for i, w in sorted(weights.items())}
    # keep every other metadata key (a demo model's `moga.demo`, `moga.text_len`...); the MoGA settings are rewritten
    written = set(moga_metadata(settings, ()))
    meta = {k: v for k, v in source.metadata.items() if k not in written}
    if num_heads is not None:
        meta["moga.num_heads"] = str(num_heads)
    elif cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
        meta["moga.num_heads"] = str(cfg.num_heads)
    meta.update(moga_metadata(settings, sorted(weights), warmup))
    say(f"writing {dst}")
    write_safetensors(dst, new, meta, copy_from=copy)
    source.close()
    return inspect_checkpoint(dst)


def _router_weights(routers, cfg: WanConfig) -> dict[int, torch.Tensor]:
    if isinstance(routers, Mapping):
        weights = {int(i): torch.as_tensor(w) for i, w in routers.items()}
    else:
        rs = TensorSource(routers)
        layout = detect_layout(rs.keys()) or "wan"
        weights = {}
        for k in rs.keys():
            c = canonical_key(k, layout)
            m = re.match(r"^blocks\.(\d+)\.self_attn\.router\.weight$", c or "")
            if m:
                weights[int(m.group(1))] = rs.get(k)
        rs.close()
        if not weights:
            raise CheckpointError(f"{routers} holds no router tensors (blocks.N.self_attn.router.weight)")
    rows = {tuple(w.shape) for w in weights.values()}
    if len({r[0] for r in rows}) != 1:
        raise CheckpointError(f"the routers disagree on the group count: shapes {sorted(rows)}")
    bad = [i for i, w in weights.items() if w.dim() != 2 or w.shape[1] != cfg.dim or not 0 <= i < cfg.num_layers]
    if bad:
        i = bad[0]
        raise CheckpointError(f"router for layer {i} has shape {tuple(weights[i].shape)} but the model has "
                              f"{cfg.num_layers} layers of width {cfg.dim}: the router file belongs to "
                              f"another model")
    return weights


# ---- calibration ------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_routers(path, num_groups: int, layers: Iterable[int], size=(9, 30, 52), steps: int = 3,
                      context: torch.Tensor | None = None, max_tokens: int = 8192, seed: int = 0,
                      device="cpu", dtype=None, shift: float = 5.0, num_heads: int | None = None,
                      model: WanModel | None = None) -> dict[int, torch.Tensor]:
    """Training-free routers: {layer: unit centroids [M, dim] float32} from k-means (cosine) of each
    layer's self-attention input tokens during a short, seeded, dense Euler pass of the model."""
    model = model or load_model(path, device=device, dtype=dtype, num_heads=num_heads)
    cfg = model.config
    layers = sorted(set(int(i) for i in layers))
    f, h, w = (int(s) for s in size)
    tokens = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    if tokens < num_groups:
        raise ValueError(f"the calibration latent {size} has {tokens} tokens, fewer than {num_groups} groups")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, f, h, w, generator=g)
    if context is None:
        context = torch.randn(1, 64, cfg.text_dim, generator=g)
    per_step = max(1, -(-max_tokens // steps))
    feats: dict[int, list] = {i: [] for i in layers}
    pick_gen = torch.Generator().manual_seed(seed + 1)

    def hook(index):
        def grab(module, args, kwargs):
            xs = args[0] if args else kwargs["x"]
            rows = xs[0].float()
            if rows.shape[0] > per_step:
                sel = torch.randperm(rows.shape[0], generator=pick_gen)[:per_step].to(rows.device)
                rows = rows[sel]
            feats[index].append(torch.nn.functional.normalize(rows, dim=-1))
        return grab

    handles = [model.blocks[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        dense = model.moga_config.replace(dense=True)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        dev = model.device
        lat = x.to(dev)
        for i in range(steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v = model(lat, torch.tensor([s * 1000.0], device=dev), context.to(dev), moga=dense).float()
            lat = lat + (s_next - s) * v
    finally:
        for hd in handles:
            hd.remove()
    return {i: spherical_kmeans(torch.cat(feats.pop(i)), num_groups, seed=seed + i).cpu() for i in layers}


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """k-means on unit vectors by cosine similarity; k-means++ seeding; returns unit centroids [k, d].
    Deterministic for a seed; an emptied cluster is re-seeded with the worst-served point."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} tokens cannot form {k} groups")
    g = torch.Generator().manual_seed(seed)   # seeding draws on the CPU: same picks on any device
    cent = [x[int(torch.randint(n, (1,), generator=g))]]
    best = (x @ cent[0]).clamp(max=1.0)
    for _ in range(1, k):
        dist = (1.0 - best).clamp(min=0).double().cpu()
        if float(dist.sum()) <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(dist, 1, generator=g))
        cent.append(x[idx])
        best = torch.maximum(best, x @ x[idx])
    c = torch.stack(cent)
    for _ in range(iters):
        sim = x @ c.T
        assign = sim.argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        served = sim.gather(1, assign[:, None]).squeeze(1)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            worst = int(served.argmin())
            new[j] = x[worst]
            served[worst] = 2.0
        new = torch.nn.functional.normalize(new, dim=-1)
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c


__all__ = ["load_model", "inspect_checkpoint", "save_checkpoint", "patch_checkpoint", "CheckpointInfo",
           "CheckpointError", "EXTRA_LOADERS", "register_extras", "TensorSource", "to_layout",
           "detect_layout", "canonical_key", "moga_metadata", "calibrate_routers", "spherical_kmeans",
           "write_safetensors", "read_header", "plan_checkpoint", "FORMAT_VERSION", "CALIBRATED_DENSE_WARMUP",
           "CALIBRATED_CAPACITY"]
