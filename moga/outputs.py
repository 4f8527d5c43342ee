"""Every file the project writes goes through here: atomic replacement and checks before the work.

`atomic_path(target)` yields a hidden temporary path beside the target (same folder, so the final
`os.replace` is a rename on one file system); the writer writes there; only when the block finishes
is the file fsynced and renamed into place. On any exception, KeyboardInterrupt included, the
temporary file is removed and whatever was at the target before is left as it was.

`check_output(path, kind, overwrite)` runs before any model is loaded: known extension, not a folder,
the parent folder exists and is writable, and an existing file is replaced only with `--overwrite`
and only when it holds something of ours (a video or a safetensors file, by its magic bytes).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

# Containers ffmpeg picks from the extension, and the codec each gets (imageio-ffmpeg's ffmpeg has both).
VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".m4v": "libx264",
                ".webm": "libvpx-vp9"}
VIDEO_EXTENSIONS = tuple(VIDEO_CODECS)
SAFETENSORS_EXTENSIONS = (".safetensors",)
# a safetensors file may have any name (a latent as .st), but not one that says it is something else
NOT_SAFETENSORS = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".gguf", ".json", ".txt") + VIDEO_EXTENSIONS
JSON_EXTENSIONS = (".json",)


class OutputError(ValueError):
    """An output path that cannot (or must not) be written; the message says what to do instead."""


def _temp_beside(target: Path) -> Path:
    # keep the suffix last: ffmpeg picks the container from it, safetensors does not care
    return target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; on success fsync it and rename it onto `target`."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    tmp = _temp_beside(target)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


@contextmanager
def atomic_open(target, mode: str = "wb", **kwargs):
    """`open()` on a temporary file beside `target`, renamed into place when the block ends well."""
    with atomic_path(target) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()


def write_text(target, text: str) -> Path:
    with atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(target)


def write_json(target, obj, indent: int | None = 1, **kwargs) -> Path:
    """JSON to `target`, atomically (the text is built before the file is opened)."""
    return write_text(target, json.dumps(obj, indent=indent, **kwargs) + "\n")


def save_safetensors(tensors, target, metadata=None) -> Path:
    """`safetensors.torch.save_file`, atomically."""
    from safetensors.torch import save_file
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(target)


# ---- what a file holds, by its first bytes ----------------------------------------------------
def sniff(path) -> str:
    """'video', 'safetensors', 'pickle', 'zip', 'empty' or 'other', from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "video"  # ISO base media (mp4, mov, m4v)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video"  # Matroska / WebM
    if len(head) >= 9 and head[8:9] == b"{":  # before pickle: a header length may begin with 0x80
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"  # pickle protocol 2-5 (torch.save's legacy format)
    if head.startswith(b"PK\x03\x04"):
        return "zip"  # torch.save's default format is a zip of pickles
    return "other"


_OURS = {"video": ("video",), "safetensors": ("safetensors",), "json": ("json",)}


def _is_json(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


def check_output(path, kind: str, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check an output path before any work: `kind` is 'video', 'safetensors' or 'json'.
    Raises OutputError naming the problem and the fix."""
    allowed = {"video": VIDEO_EXTENSIONS, "safetensors": SAFETENSORS_EXTENSIONS, "json": JSON_EXTENSIONS}[kind]
    path = Path(path)
    shown = str(path)
    if path.is_dir() or shown.endswith(os.sep) or shown.endswith("/"):
        raise OutputError(f"{flag} {shown!r} is a folder: give a file name, e.g. "
                          f"{os.path.join(shown, 'out' + allowed[0])!r}")
    suffix = path.suffix.lower()
    if suffix not in allowed if kind != "safetensors" else suffix in NOT_SAFETENSORS:
        what = "no extension" if not path.suffix else f"the extension {path.suffix!r}"
        others = f" (or use one of {', '.join(allowed)})" if len(allowed) > 1 else ""
        raise OutputError(f"{flag} {shown!r} has {what}, not one of the {kind} formats moga writes: "
                          f"add {allowed[0]}{others}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{flag} {shown!r}: the folder {str(parent)!r} does not exist: create it first "
                          f"(mkdir -p {parent})")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{flag} {shown!r} exists and is not a regular file: choose another name")
        content = sniff(path)
        ours = content in _OURS[kind] or content == "empty" or (kind == "json" and _is_json(path))
        if not ours:
            held = {"pickle": "a pickle file", "zip": "a zip (or torch.save) file", "video": "a video",
                    "safetensors": "a safetensors file"}.get(content, "other data (text or an unknown format)")
            raise OutputError(f"{flag} {shown!r} already exists and holds {held}, not a {kind}: moga never "
                              f"replaces such a file, not even with --overwrite; choose another name")
        if not overwrite:
            raise OutputError(f"{flag} {shown!r} already exists: pass -y/--overwrite to replace it, or choose "
                              f"another name")
    _probe_writable(path, flag)
    return path


def _probe_writable(path: Path, flag: str) -> None:
    probe = _temp_beside(path).with_suffix(".probe")
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e}): choose a folder you "
                          f"can write to") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {str(path)!r} exists and is read-only: choose another name")


__all__ = ["OutputError", "atomic_path", "atomic_open", "write_text", "write_json", "save_safetensors",
           "check_output", "sniff", "VIDEO_EXTENSIONS"]
