"""Triton kernels built on first use, once, or None where Triton is not importable.

    @triton_kernels
    def _kernels(triton, tl):
        @triton.jit
        def row_kernel(...): ...
        return row_kernel          # or a namespace of several kernels

    k = _kernels()                 # the kernels, or None; `_kernels.problem()` says why None

Triton is imported at the first call, not at import time: importing it is slow, it is absent on most CPU
installs, and `triton.jit` reads TRITON_INTERPRET when a kernel is decorated (the CPU tests set it before
the first call). A failed import is remembered (no retry per call on the hot path); an error inside the
builder itself is not (it propagates, and the next call tries again). Imports nothing from moga.
"""
from __future__ import annotations

import functools
from typing import Any, Callable


class LazyKernels:
    """What `triton_kernels` returns: call it for the kernels (or None)."""

    def __init__(self, build: Callable[[Any, Any], Any]):
        self._build = build
        self._kernels = None
        self._problem: str | None = None
        self._done = False
        functools.update_wrapper(self, build)

    def __call__(self):
        if not self._done:
            try:
                import triton
                import triton.language as tl
            except Exception as e:  # not installed, or broken (no driver, wrong torch): both mean "no kernels"
                self._problem = f"Triton is not importable ({type(e).__name__}: {e})"
            else:
                self._kernels = self._build(triton, tl)
            self._done = True
        return self._kernels

    def problem(self) -> str | None:
        """Why there are no kernels (Triton's import error), or None when there are."""
        self()
        return self._problem

    def reset(self) -> None:
        """Forget the kernels or the failed import: the next call imports Triton and builds them again."""
        self._kernels, self._problem, self._done = None, None, False


def triton_kernels(build: Callable[[Any, Any], Any]) -> LazyKernels:
    """Decorator: `build(triton, triton.language)` returns the kernels; run once, at the first call."""
    return LazyKernels(build)


__all__ = ["triton_kernels", "LazyKernels"]
