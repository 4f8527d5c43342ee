"""Sequence parallelism over several GPUs (or CPU processes): the Ulysses exchange, the persistent
worker pool ComfyUI uses, and the torchrun entry point. See docs/parallel.md.

Imports are lazy so `import moga.parallel` stays cheap.
"""
__all__ = ["UlyssesExchange", "WorkerPool", "WorkerError", "valid_world_sizes", "run_distributed_generate"]


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
    if name == "run_distributed_generate":
        from .launch import run_distributed_generate
        return run_distributed_generate
    raise AttributeError(f"module 'moga.parallel' has no attribute {name!r}")
