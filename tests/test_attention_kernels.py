"""The varlen dispatcher: CPU backends against a per-segment float64 softmax, lse merging."""
import math

import pytest
import torch

from moga.attention import kernels
from moga.attention.kernels import length_class, resolve_backend, varlen_attention


def _segment_softmax(q, k, v, lq, lk):
    """Straightforward per-segment attention in float64: (out, lse)."""
    outs, lses, a, b = [], [], 0, 0
    for nq, nk in zip(lq, lk):
        qs, ks, vs = q[a:a + nq].double(), k[b:b + nk].double(), v[b:b + nk].double()
        s = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        lse = torch.logsumexp(s, -1) if nk else torch.full(s.shape[:2], float("-inf"), dtype=s.dtype)
        p = torch.softmax(s, -1) if nk else s.new_zeros(s.shape)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
        lses.append(lse.T)
        a, b = a + nq, b + nk
    return torch.cat(outs), torch.cat(lses)


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


CASES = {
    "equal": ([5, 5, 5], [5, 5, 5]),
    "uneven": ([1, 7, 3, 9], [1, 7, 3, 9]),
    "q_ne_k": ([4, 6, 2], [9, 6, 5]),
    "empty_q_segment": ([3, 0, 4], [3, 2, 4]),
    "no_keys": ([3, 2], [4, 0]),
    "one": ([11], [11]),
}


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backends_match_segment_softmax(backend, case, dtype):
    lq, lk = CASES[case]
    _check_against_segment_softmax(lq, lk, backend, dtype, heads=3, seed=len(case) * 7 + len(backend))


def _check_against_segment_softmax(lq, lk, backend, dtype, heads, seed):
    """varlen_attention (with and without lse) on fresh random q, k, v against the float64 per-segment softmax."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), heads, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), heads, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ref_out, ref_lse = _segment_softmax(q, k, v, lq, lk)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), _cu(lq), _cu(lk), max(lq), max(lk), backend)
    out, lse = varlen_attention(*args, return_lse=True)
    plain = varlen_attention(*args)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.shape == q.shape and lse.shape == q.shape[:2] and out.dtype == dtype
    assert torch.allclose(out.double(), ref_out, atol=tol)
    assert torch.allclose(plain.double(), ref_out, atol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=tol)


def _many_lengths(seed):
    """Segments of many distinct (query, key) lengths, with an empty query set and keyless ones."""
    gen = torch.Generator().manual_seed(seed)
    lq = torch.randint(1, 40, (14,), generator=gen).tolist() + [0, 3, 5]
    lk = torch.randint(1, 40, (14,), generator=gen).tolist() + [4, 0, 0]
    return lq, lk


@pytest.mark.parametrize("pad_buckets", [0, 4, 10_000])  # always padded, the default, never padded
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_padded_length_classes_match_segment_softmax(monkeypatch, pad_buckets, dtype):
    monkeypatch.setattr(kernels, "PAD_BUCKETS", pad_buckets)
    lq, lk = _many_lengths(pad_buckets + 3)
    _check_against_segment_softmax(lq, lk, "sdpa", dtype, heads=2, seed=11)


def test_sdpa_padded_gradients(monkeypatch):
    """Padded rows must give no gradient (they repeat real rows, which would otherwise collect it)."""
    monkeypatch.setattr(kernels, "PAD_BUCKETS", 0)
    lq, lk = [1, 3, 10, 2, 0], [2, 9, 4, 5, 3]  # (a keyless segment's lse is -inf: no finite gradient)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lq), 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lk), 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda a, b, c: varlen_attention(a, b, c, _cu(lq), _cu(lk), 10, 9, "sdpa", True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: varlen_attention(a, b, c, _cu(lq), _cu(lk), 10, 9, "sdpa"), (q, k, v))


def test_length_classes_pad_at_most_a_quarter():
    classes = [length_class(n) for n in range(0, 5000)]
    assert classes[:9] == list(range(9))
    assert all(n <= c <= max(n, 1.25 * n) for n, c in enumerate(classes))
    assert len(set(c for c in classes if 1024 < c <= 2048)) == 4  # four sizes per octave
    assert all(length_class(c) == c for c in classes)  # a class is its own class


def test_lse_merge_of_disjoint_key_sets_is_attention_over_the_union():
    """Split each segment's keys in two disjoint halves: merging the halves' outputs by their
    log-sum-exps gives attention over all keys (what fusion 'lse' relies on)."""
    gen = torch.Generator().manual_seed(9)
    lq, lk = [6, 4], [10, 8]
    q = torch.randn(10, 2, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(18, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    full, _ = _segment_softmax(q, k, v, lq, lk)
    first = torch.cat([torch.arange(0, 3), torch.arange(10, 15)])
    second = torch.cat([torch.arange(3, 10), torch.arange(15, 18)])
    o1, l1 = varlen_attention(q, k[first], v[first], _cu(lq), _cu([3, 5]), 6, 5, "sdpa", True)
    o2, l2 = varlen_attention(q, k[second], v[second], _cu(lq), _cu([7, 3]), 6, 7, "sdpa", True)
    total = torch.logsumexp(torch.stack([l1, l2]), 0)
    merged = o1 * torch.exp(l1 - total)[..., None] + o2 * torch.exp(l2 - total)[..., None]
    assert torch.allclose(merged, full, atol=1e-12)


def test_lse_gradcheck_sdpa():
    gen = torch.Generator().manual_seed(5)
    lq, lk = [2, 3], [3, 2]
    q = torch.randn(5, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(5, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))

    def f(a, b, c):
        out, lse = varlen_attention(a, b, c, _cu(lq), _cu(lk), 3, 3, "sdpa", True)
        return out, lse
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_backend_choice_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_backend("torch", cpu, torch.bfloat16)
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        with pytest.raises(ValueError, match="flash-attn-4"):
            resolve_backend("fa4", cpu, torch.bfloat16)
    try:
        import flash_attn  # noqa: F401
    except Exception:
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_backend("flash_attn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", cpu, torch.float32)
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, q, q, _cu([3, 2]), _cu([3, 2]), 3, 3, "sdpa")
    with pytest.raises(ValueError, match="packed"):
        varlen_attention(q[None], q[None], q[None], _cu([6]), _cu([6]), 6, 6, "sdpa")
    with pytest.raises(ValueError, match="do not match"):
        varlen_attention(q, q[:, :1], q[:, :1], _cu([6]), _cu([6]), 6, 6, "sdpa")


def test_fused_merge_matches_torch_merge():
    """The Triton merge (CUDA inference path) against the torch merge, through Triton's CPU
    interpreter; skipped where Triton or its interpreter is absent (it must be on at import)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (and install triton) to run the Triton merge on a CPU")
    pytest.importorskip("triton")
    from moga.attention import MoGAConfig, TokenLayout, mixture
    from moga.attention.router import Routing
    gen = torch.Generator().manual_seed(12)
    lay = TokenLayout(5, 3, 4, (2, 3))
    q, k, v = (torch.randn(2, lay.num_tokens, 2, 8, generator=gen) for _ in range(3))
    ids = torch.randint(0, 4, (2, lay.num_tokens), generator=gen)
    probs = torch.softmax(torch.randn(2, lay.num_tokens, 4, generator=gen), -1)
    routing = Routing(ids, probs.gather(-1, ids[..., None])[..., 0], probs)
    for fusion in ("mean", "lse"):
        for branches in ((1, 1, 1), (1, 0, 0), (0, 1, 1), (1, 0, 1)):
            cfg = MoGAConfig(num_groups=4, fusion=fusion, routed=bool(branches[0]),
                             windowed=bool(branches[1]), per_frame=bool(branches[2]), backend="sdpa")
            plain = mixture.moga_attention(q, k, v, routing, lay, cfg)
            try:
                mixture.FUSE_ON_CPU = True
                fused = mixture.moga_attention(q, k, v, routing, lay, cfg)
            finally:
                mixture.FUSE_ON_CPU = False
            assert torch.allclose(fused, plain, atol=1e-6), (fusion, branches)
