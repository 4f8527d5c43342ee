"""Sequence parallelism over several GPUs (or CPU processes): the Ulysses exchange, the persistent
worker pool ComfyUI uses, and the process group of a torchrun launch (`moga.cli` is its entry). See docs/parallel.md.

Imports are lazy so `import moga.parallel` stays cheap.
"""
__all__ = ["UlyssesExchange", "WorkerPool", "WorkerError", "valid_world_sizes"]


def __getattr__(name):
    if name in ("UlyssesExchange", "valid_world_sizes"):
        from . import ulysses
        return getattr(ulysses, name)
    if name == "WorkerError":
        from .group import WorkerError
        return WorkerError
    if name == "WorkerPool":
        from .pool import WorkerPool
        return WorkerPool
    raise AttributeError(f"module 'moga.parallel' has no attribute {name!r}")
