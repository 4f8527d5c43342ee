"""What crosses the pipes between a WorkerPool host and its workers: jobs and latents as plain data.

Tensors travel as raw bytes, never through torch's shared-memory handles: those need the sending
process alive until the receiver has opened them, and a worker may be killed at any time. A tensor
that appears several times in one message (the same text or CLIP embedding for several shots) is
sent once and arrives as one tensor again, so the worker embeds it once, as the host would.
A `moga.conditioning.ImageCondition` (start images: mask + image latent, CLIP tokens, fixed frames)
travels as its fields: the host encodes the images, the workers need no VAE or CLIP vision model.

`check_job` catches a job's mistakes in the host, where they cost nothing, rather than in every worker.
"""
from __future__ import annotations

import inspect
from dataclasses import fields

import torch

from moga.conditioning import ImageCondition

_TENSOR, _SAME, _IMAGE = "__tensor__", "__same__", "__image__"
# sample() arguments the pool supplies itself, or that cannot cross a process boundary (callables)
NOT_JOB_KEYS = {"model", "callback", "cancel", "device", "dtype", "parallel", "return_result",
                "block_callback", "on_step"}


def pack(obj):
    """obj with every tensor turned into bytes (see the module docstring)."""
    return _pack(obj, {})


def unpack(obj):
    return _unpack(obj, [])


def _pack(obj, seen: dict):
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return (_SAME, seen[id(obj)][0])
        seen[id(obj)] = (len(seen), obj)  # holding obj keeps its id unique while packing
        t = obj.detach().to("cpu").contiguous()
        return (_TENSOR, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, ImageCondition):
        return (_IMAGE, {f.name: _pack(getattr(obj, f.name), seen) for f in fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(o, seen) for o in obj)
    if isinstance(obj, dict):
        return {k: _pack(v, seen) for k, v in obj.items()}
    return obj


def _unpack(obj, seen: list):
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == _TENSOR:
        _, dtype, shape, data = obj
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        seen.append(flat.view(getattr(torch, dtype)).reshape(shape))
        return seen[-1]
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _SAME:
        return seen[obj[1]]
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _IMAGE:
        return ImageCondition(**_unpack(obj[1], seen))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(o, seen) for o in obj)
    if isinstance(obj, dict):
        return {k: _unpack(v, seen) for k, v in obj.items()}
    return obj


def check_job(job: dict) -> dict:
    """The job's keys are `moga.sampling.sample` keyword arguments, with the shots and latent size it needs."""
    from moga.sampling import sample

    if not isinstance(job, dict):
        raise ValueError(f"a job is a dict of moga.sampling.sample keyword arguments, got {type(job).__name__}")
    params = inspect.signature(sample).parameters
    allowed = {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY or k in ("positive", "negative")}
    allowed -= NOT_JOB_KEYS
    bad = set(job) - allowed
    if bad:
        raise ValueError(f"job keys {sorted(bad)} are not sample() options; allowed: {sorted(allowed)} "
                         f"(the pool supplies model, device, dtype, callback, cancel and parallel; "
                         f"per-step hooks go to WorkerPool.run: on_progress, on_step)")
    missing = {k for k in ("positive", "shot_frames", "latent_size") if k not in job}
    if missing:
        raise ValueError(f"the job lacks {sorted(missing)}")
    frames, shots = int(job["latent_size"][0]), tuple(int(f) for f in job["shot_frames"])
    if not shots or sum(shots) != frames or min(shots) < 1:
        raise ValueError(f"shot_frames {shots} must be positive and sum to the latent frame count {frames}")
    image = job.get("image")
    if image is not None and not isinstance(image, ImageCondition):
        raise ValueError(f"the job's image is a {type(image).__name__}: give a moga.conditioning.ImageCondition "
                         f"(moga.conditioning.image_condition builds one from encoded start images)")
    return job


__all__ = ["pack", "unpack", "check_job", "NOT_JOB_KEYS"]
