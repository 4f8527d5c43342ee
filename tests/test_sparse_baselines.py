"""The long-story comparison's sparse baselines against float64 references (fresh random inputs, odd lengths)."""
import pytest
import torch

from moga.demo.sparse_baselines import (keep_count, override_attention, sol_attention, sol_available, sol_pairs,
                                        sol_reference, topk_block_attention, topk_blocks, topk_reference)


def _qkv(b=2, t=300, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("keep,block", [(0.25, 64), (0.5, 32), (1.0, 64), (0.01, 50)])
def test_topk_block_attention_matches_masked_dense(keep, block):
    q, k, v = _qkv()
    out, pairs = topk_block_attention(q, k, v, keep, block=block, chunk=3)
    ref = topk_reference(q, k, v, keep, block=block)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    masks = [topk_blocks(q[i], k[i], keep, block) for i in range(2)]
    n = masks[0].shape[-1]
    assert all(bool(m.diagonal(dim1=1, dim2=2).all()) for m in masks)  # its own block always
    assert all(int(m.sum(-1).unique().numel()) == 1 and int(m.sum(-1)[0, 0]) == keep_count(n, keep) for m in masks)
    if keep == 1.0:  # everything kept: dense attention, t^2 pairs per head
        dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)
        assert pairs == 2 * 2 * 300 * 300
    else:
        assert pairs < 2 * 2 * 300 * 300


def test_topk_keeps_the_best_scoring_blocks():
    q, k, v = _qkv(b=1, t=256, h=1, d=8, seed=3)
    k[0, 192:] += 5 * q[0, :64].mean(0)  # the last key block scores high for the first query block
    mask = topk_blocks(q[0], k[0], 0.5, 64)
    assert bool(mask[0, 0, 3]) and bool(mask[0, 0, 0])


def test_sol_pairs_count_exact_blocks_and_pooled_terms():
    q, k, _ = _qkv(b=1, t=640, h=1, d=16, seed=1)
    everything = sol_pairs(q, k, tau=-1e9)          # every block exact: t^2 pairs, no pooled terms, + proxy
    assert everything == 640 * 640 + 10 * 10
    least = sol_pairs(q, k, tau=1e9)                # the diagonal +-1 only
    exact = 640 * 64 * 3 - 2 * 64 * 64              # 3 blocks a row, 2 at the ends
    assert least == exact + (640 * 10 - (3 * 10 - 2) * 64) + 100
    assert least < sol_pairs(q, k, tau=0.5) < everything


def test_sol_reference_is_dense_when_every_block_is_exact():
    q, k, v = _qkv(b=1, t=200, h=2, d=16, seed=2)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, k, v)))
    torch.testing.assert_close(sol_reference(q, k, v, tau=-1e9), dense.transpose(1, 2))


@pytest.mark.skipif(sol_available()[0] is None, reason=sol_available()[1] or "comfy-kitchen not importable")
@pytest.mark.parametrize("tau", [0.0, 1.3, 1e9])
def test_sol_attention_is_the_package_and_our_reading_of_it(tau):
    q, k, v = _qkv(b=1, t=448, h=2, d=64, seed=4)
    out = sol_attention(q, k, v, tau=tau)
    torch.testing.assert_close(out.double(), sol_reference(q, k, v, tau), atol=2e-5, rtol=1e-4)


def test_override_runs_dense_first_then_the_sparse_kind():
    from moga.attention import layer
    q, k, v = _qkv(b=1, t=256, h=2, d=16, seed=5)
    with override_attention("topk", dense_steps=1, keep=0.5) as count:
        first = layer.dense_attention(q, k, v)
        count.step = 1
        second = layer.dense_attention(q, k, v)
    assert layer.dense_attention is not None and count.dense_pairs == 2 * 2 * 256 * 256
    torch.testing.assert_close(first, torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2))
    torch.testing.assert_close(second.double(), topk_reference(q, k, v, 0.5), atol=2e-5, rtol=1e-4)
    assert count.pairs == 2 * 256 * 256 + 2 * 4 * 2 * 64 * 64
    assert layer.dense_attention.__name__ == "dense_attention"  # restored
