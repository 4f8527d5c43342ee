"""safetensors files without the safetensors writer: header reading (validated against the file size,
with a hint for pickles and GGUF), `TensorSource` (one file or a folder of shards, tensors read one
at a time through memory-mapped `safe_open`), and an atomic writer that can byte-copy tensors from a
source without loading them."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..model import FP8_DTYPES
from ..outputs import atomic_open, sniff
from .errors import CheckpointError

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
    held = sniff(path)  # by content: a pickle renamed to .safetensors gets the pickle hint too
    if held in ("pickle", "zip"):
        hint = (f"this is a pickle (.pt/.ckpt) file{' (a torch.save zip)' if held == 'zip' else ''}, whatever "
                f"its name; pickles are never loaded (they can run code): convert it to safetensors (e.g. "
                f"safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')) or use "
                f"the model's .safetensors release")

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
    with atomic_open(path, "wb") as out:  # an interrupted write leaves the old file as it was
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, _, _, nbytes, (kind, obj) in items:
            if kind == "copy":
                obj.read_bytes(name, out)
            elif nbytes:
                out.write(_tensor_bytes(obj))
    return path


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    if flat.dtype in FP8_DTYPES or flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    elif flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()
