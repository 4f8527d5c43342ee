"""Router (top-1, ties, run-time merging), balance loss, and gradients into the router."""
import pytest
import torch

from moga.attention import MoGAConfig, TokenLayout, balance_loss, moga_attention
from moga.attention.router import Router, merge_rows


def test_router_probs_ids_gate():
    torch.manual_seed(0)
    r = Router(16, 5)
    assert tuple(r.weight.shape) == (5, 16) and r.bias is None
    assert list(dict(r.named_parameters())) == ["weight"]  # checkpoint key: ...router.weight
    x = torch.randn(2, 9, 16)
    out = r(x)
    ref = torch.softmax((x.double() @ r.weight.double().T), -1)
    assert out.probs.dtype == torch.float32
    assert torch.allclose(out.probs.double(), ref, atol=1e-6)
    assert torch.equal(out.group_ids, ref.argmax(-1))
    assert torch.equal(out.gate, out.probs.max(-1).values)


def test_router_bf16_input_softmax_in_float32():
    torch.manual_seed(1)
    r = Router(16, 4).to(torch.bfloat16)
    out = r(torch.randn(1, 7, 16).to(torch.bfloat16))
    assert out.probs.dtype == torch.float32 and out.group_ids.dtype == torch.long
    assert torch.allclose(out.probs.sum(-1), torch.ones(1, 7))


def test_ties_go_to_lowest_index():
    r = Router(4, 4)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[0., 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]))
    x = torch.tensor([[[3., 3, 0, 0], [2., 0, 0, 0], [0., 1, 0, 5]]])
    # token 0: rows 1, 2, 3 tie; token 1: rows 1, 2 tie; token 2: row 0 wins
    assert r(x).group_ids.tolist() == [[1, 1, 0]]


def test_run_time_merge():
    torch.manual_seed(2)
    r = Router(8, 6)
    with torch.no_grad():  # rows 0/3 and 1/4 nearly parallel: they must merge first
        r.weight[3] = r.weight[0] * 2 + 1e-3
        r.weight[4] = r.weight[1] * 0.5 + 1e-3
    assign = merge_rows(r.weight, 4)
    assert assign == [0, 1, 2, 0, 1, 3]
    assert merge_rows(r.weight, 6) == list(range(6))
    assert merge_rows(r.weight, 1) == [0] * 6
    x = torch.randn(2, 11, 8)
    full, merged = r(x), r(x, num_groups=4)
    expect = torch.zeros(2, 11, 4).index_add(-1, torch.tensor(assign), full.probs)
    assert torch.allclose(merged.probs, expect)
    assert torch.equal(merged.group_ids, expect.argmax(-1))
    assert torch.equal(r(x, num_groups=6).group_ids, full.group_ids)
    assert r.merge_map(4) is r.merge_map(4)  # cached
    with torch.no_grad():
        r.weight.mul_(1.0)  # a changed weight is merged anew
    assert r.merge_map(4) is not None and len(r._merge_cache) == 1


def test_more_groups_than_router_rows():
    r = Router(8, 3)
    with pytest.raises(ValueError, match="moga patch --groups 5"):
        r(torch.randn(1, 4, 8), num_groups=5)
    with pytest.raises(ValueError, match="tokens"):
        r(torch.randn(4, 7))


def _loop_loss(probs, ids, m, weight, form):
    t = ids.numel()
    p, ids = probs.reshape(-1, m), ids.reshape(-1)
    total = 0
    for i in range(m):
        routed = [tok for tok in range(t) if ids[tok] == i]
        f = len(routed) / t
        share = (sum(p[tok, i] for tok in routed) / t if form == "paper"
                 else sum(p[tok, i] for tok in range(t)) / t)
        total = total + f * share
    return weight * m * total


@pytest.mark.parametrize("form", ["paper", "switch"])
def test_balance_loss_matches_definition(form):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 13, 5, generator=gen, dtype=torch.float64), -1)
    ids = probs.argmax(-1)
    got = balance_loss(probs, ids, 5, weight=0.3, form=form)
    assert torch.allclose(got, _loop_loss(probs, ids, 5, 0.3, form))
    # perfectly balanced, confident routing: both forms give weight * 1
    ids = torch.arange(10) % 5
    onehot = torch.nn.functional.one_hot(ids, 5).double()
    assert torch.allclose(balance_loss(onehot, ids, 5, form=form), torch.tensor(0.1, dtype=torch.float64))
    # all tokens in one group: weight * M
    ids = torch.zeros(6, dtype=torch.long)
    assert torch.allclose(balance_loss(torch.nn.functional.one_hot(ids, 5).double(), ids, 5, form=form),
                          torch.tensor(0.5, dtype=torch.float64))


def test_balance_loss_bad_input():
    p = torch.softmax(torch.randn(4, 3), -1)
    with pytest.raises(ValueError, match="form"):
        balance_loss(p, p.argmax(-1), 3, form="aux")
    with pytest.raises(ValueError, match="num_groups"):
        balance_loss(p, p.argmax(-1), 4)
    with pytest.raises(ValueError, match="lie in"):
        balance_loss(p, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="match"):
        balance_loss(p, torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("num_groups, form", [(3, "paper"), (2, "switch")])
def test_gradcheck_router_through_gate_and_loss(num_groups, form):
    """float64 gradcheck of d(attention output . g + balance loss)/d(router weight); num_groups 2
    exercises the run-time merge of 3 rows."""
    gen = torch.Generator().manual_seed(4)
    lay = TokenLayout(3, 2, 2, (2, 1))
    n, dim = lay.num_tokens, 4
    x = torch.randn(2, n, dim, generator=gen, dtype=torch.float64)
    q, k, v = (torch.randn(2, n, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.randn(2, n, 2, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    cfg = MoGAConfig(num_groups=num_groups, backend="reference")
    router = Router(dim, 3).double()
    assign = merge_rows(w0, num_groups)

    def f(w):
        logits = x @ w.T
        probs = torch.softmax(logits, -1)
        probs = torch.zeros(2, n, num_groups, dtype=torch.float64).index_add(
            -1, torch.tensor(assign), probs)
        ids = probs.argmax(-1)
        from moga.attention.router import Routing
        r = Routing(ids, probs.gather(-1, ids[..., None])[..., 0], probs)
        out = moga_attention(q, k, v, r, lay, cfg)
        return (out * g).sum() + balance_loss(r.probs, r.group_ids, num_groups, form=form)

    w = w0.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (w,))
    # the module computes the same function: same value and gradient
    with torch.no_grad():
        router.weight.copy_(w0)
    r = router(x, num_groups=num_groups)
    val = (moga_attention(q, k, v, r, lay, cfg) * g).sum() + balance_loss(
        r.probs, r.group_ids, num_groups, form=form)
    val.backward()
    w2 = w0.clone().requires_grad_()
    f(w2).backward()
    assert torch.allclose(router.weight.grad, w2.grad)
    assert router.weight.grad.abs().sum() > 0
