"""What the fused-kernel tests share: the Triton-interpreter marker, the fixture that lets the kernels run on a CPU,
and the relative error they are held to."""
import os

import pytest

from moga import fused

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="set TRITON_INTERPRET=1 (and install triton) to run the kernels on a CPU")


@pytest.fixture
def on_cpu():
    pytest.importorskip("triton")
    fused.FUSE_ON_CPU = True
    try:
        yield
    finally:
        fused.FUSE_ON_CPU = False


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
