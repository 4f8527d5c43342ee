"""moga.lazy_triton: Triton imported at the first call only, the kernels built once, a failed import remembered."""
import sys
import types

import pytest

from moga import fp8, fused
from moga.attention import kernels
from moga.lazy_triton import LazyKernels, triton_kernels


def fake_triton(monkeypatch):
    """Stand-in modules `triton` and `triton.language`, so the caching is tested with or without Triton."""
    triton, tl = types.ModuleType("triton"), types.ModuleType("triton.language")
    triton.language = tl
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", tl)
    return triton, tl


def no_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` then raises ImportError
    monkeypatch.delitem(sys.modules, "triton.language", raising=False)


def counting_builder():
    calls = []

    def build(triton, tl):
        """Builds the kernels."""
        calls.append((triton, tl))
        return object()
    return build, calls


def test_builds_once_at_the_first_call(monkeypatch):
    no_triton(monkeypatch)   # decorating must not import Triton: this would make any import fail
    build, calls = counting_builder()
    lazy = triton_kernels(build)
    assert calls == [] and lazy.__doc__ == "Builds the kernels."
    triton, tl = fake_triton(monkeypatch)
    first = lazy()
    assert calls == [(triton, tl)]
    assert lazy() is first and lazy.problem() is None
    assert len(calls) == 1


def test_a_failed_import_is_remembered_and_reported(monkeypatch):
    build, calls = counting_builder()
    lazy = triton_kernels(build)
    no_triton(monkeypatch)
    assert lazy() is None
    problem = lazy.problem()
    assert problem.startswith("Triton is not importable (") and "triton" in problem
    fake_triton(monkeypatch)
    assert lazy() is None and calls == []          # no retry on every call
    lazy.reset()
    assert lazy() is not None and len(calls) == 1 and lazy.problem() is None


def test_an_error_in_the_builder_propagates_and_is_retried(monkeypatch):
    fake_triton(monkeypatch)
    attempts = []

    def build(triton, tl):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("compile failed")
        return "kernels"
    lazy = triton_kernels(build)
    with pytest.raises(RuntimeError, match="compile failed"):
        lazy()
    assert lazy() == "kernels" and len(attempts) == 2


@pytest.mark.parametrize("lazy", [fused._kernels, fp8._kernel, kernels._triton_merge])
def test_the_modules_kernels_are_lazy(lazy):
    assert isinstance(lazy, LazyKernels)
    assert (lazy() is None) == (lazy.problem() is not None)


def test_fused_merge_without_triton_says_why(monkeypatch):
    import torch
    no_triton(monkeypatch)
    kernels._triton_merge.reset()
    try:
        with pytest.raises(RuntimeError, match=r"fused_merge needs Triton: Triton is not importable \("):
            kernels.fused_merge([torch.randn(3, 2, 4)], [None], 3)
    finally:
        monkeypatch.undo()
        kernels._triton_merge.reset()   # the real Triton (or its absence) again for later tests
