import math

import pytest
import torch
from torch import nn

from moga.attention import MoGAConfig
from moga.sampling import (Cancelled, EulerSolver, UniPCSolver, dense_step_count, initial_noise, make_schedule,
                           sample)


# ---- schedule ----------------------------------------------------------------------------------
def test_schedule_by_hand():
    s = make_schedule(2, shift=5.0)
    # base sigmas: linspace(0.999, 0, 3)[:-1] = [0.999, 0.4995]
    hand = [5 * 0.999 / (1 + 4 * 0.999), 5 * 0.4995 / (1 + 4 * 0.4995), 0.0]
    assert s.sigmas == pytest.approx(hand, abs=1e-12)
    assert s.timesteps == (math.floor(hand[0] * 1000), math.floor(hand[1] * 1000)) == (999, 833)
    flat = make_schedule(4, shift=1.0)
    assert flat.sigmas == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0], abs=1e-12)
    assert flat.timesteps == (999, 749, 499, 249)


def test_schedule_is_monotone_and_shift_pushes_to_noise():
    for steps in (1, 7, 50):
        lo, hi = make_schedule(steps, 1.0), make_schedule(steps, 8.0)
        assert all(a > b for a, b in zip(hi.sigmas, hi.sigmas[1:]))
        assert all(h >= l for h, l in zip(hi.sigmas, lo.sigmas))
        assert hi.sigmas[-1] == 0.0 and len(hi.sigmas) == steps + 1


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="steps"):
        make_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        make_schedule(10, shift=0.0)


# ---- solvers against hand-written step formulas -------------------------------------------------
def _velocity(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=g, dtype=torch.float64)
    return lambda x, s: torch.tanh(x @ A) + (1 + s) * b


def _run(solver, sched, x, vel):
    for i in range(sched.steps):
        x = solver.step(i, x, vel(x, sched.sigmas[i]))
    return x


def test_euler_by_hand():
    sched = make_schedule(3, shift=3.0)
    vel = _velocity(1)
    x0 = torch.randn(4, 6, dtype=torch.float64)
    s = sched.sigmas
    x1 = x0 + (s[1] - s[0]) * vel(x0, s[0])
    x2 = x1 + (s[2] - s[1]) * vel(x1, s[1])
    x3 = x2 + (s[3] - s[2]) * vel(x2, s[2])
    assert torch.allclose(_run(EulerSolver(sched), sched, x0, vel), x3, atol=1e-12)
    # the last Euler step to sigma 0 lands on the data prediction x - sigma * v
    assert torch.allclose(x3, x2 - s[2] * vel(x2, s[2]), atol=1e-12)


def test_unipc_by_hand_four_steps():
    """UniPC-2 with bh2 in data prediction, written out step by step in scalars (no matrices)."""
    sched = make_schedule(4, shift=5.0)
    vel = _velocity(2)
    x0 = torch.randn(4, 6, dtype=torch.float64)
    s = sched.sigmas
    lam = [math.log((1 - v) / v) for v in s[:4]]

    def ddim(x, m, a, b):  # the order-1 step from sigma a to sigma b with data prediction m
        h = lam[b] - lam[a]
        return s[b] / s[a] * x - (1 - s[b]) * math.expm1(-h) * m, math.expm1(-h)

    # step 0: order-1 predictor
    m0 = x0 - s[0] * vel(x0, s[0])
    x1, _ = ddim(x0, m0, 0, 1)
    # step 1: order-1 corrector (rho = 1/2) with the new model output, then order-2 predictor (rho = 1/2)
    m1 = x1 - s[1] * vel(x1, s[1])
    base, B = ddim(x0, m0, 0, 1)
    x1c = base - (1 - s[1]) * B * 0.5 * (m1 - m0)
    base, B = ddim(x1c, m1, 1, 2)
    r = (lam[0] - lam[1]) / (lam[2] - lam[1])
    x2 = base - (1 - s[2]) * B * 0.5 * (m0 - m1) / r
    # step 2: order-2 corrector, rho solves [[1, 1], [r, 1]] rho = [b1, b2]; then order-2 predictor
    m2 = x2 - s[2] * vel(x2, s[2])
    base, B = ddim(x1c, m1, 1, 2)
    hh = -(lam[2] - lam[1])
    phi = B / hh - 1
    b1, b2 = phi / B, 2 * (phi / hh - 0.5) / B
    rho1 = (b1 - b2) / (1 - r)
    rho2 = b1 - rho1
    x2c = base - (1 - s[2]) * B * (rho1 * (m0 - m1) / r + rho2 * (m2 - m1))
    base, B = ddim(x2c, m2, 2, 3)
    r2 = (lam[1] - lam[2]) / (lam[3] - lam[2])
    x3 = base - (1 - s[3]) * B * 0.5 * (m1 - m2) / r2
    # step 3 (last): the step to sigma 0 is order 1 and lands on the data prediction at x3
    final = x3 - s[3] * vel(x3, s[3])

    solver = UniPCSolver(sched)
    xs = [x0]
    for i in range(4):
        xs.append(solver.step(i, xs[-1], vel(xs[-1], s[i])))
    for got, want in zip(xs[1:], (x1, x2, x3, final)):
        assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_single_step_returns_data_prediction():
    sched = make_schedule(1, shift=5.0)
    vel = _velocity(3)
    x = torch.randn(3, 6, dtype=torch.float64)
    want = x - sched.sigmas[0] * vel(x, sched.sigmas[0])
    for solver in (EulerSolver(sched), UniPCSolver(sched)):
        assert torch.allclose(solver.step(0, x, vel(x, sched.sigmas[0])), want, atol=1e-12)


def _gaussian_flow(mu, tau):
    """Data N(mu, tau^2) per element: the exact flow-matching velocity and its exact ODE solution."""
    def vel(x, s):
        var = (1 - s) ** 2 * tau ** 2 + s ** 2
        x0_mean = mu + (1 - s) * tau ** 2 / var * (x - (1 - s) * mu)
        return (x - x0_mean) / s

    def on_path(eps, s):
        return (1 - s) * mu + math.sqrt((1 - s) ** 2 * tau ** 2 + s ** 2) * eps
    return vel, on_path


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_convergence_on_gaussian_ode(tau):
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(64, generator=g, dtype=torch.float64)
    vel, on_path = _gaussian_flow(mu, tau)
    eps = torch.randn(64, generator=g, dtype=torch.float64)
    exact = mu + tau * eps

    def err(cls, steps, shift):
        sched = make_schedule(steps, shift)
        x = on_path(eps, sched.sigmas[0])
        return (_run(cls(sched), sched, x, vel) - exact).abs().max().item()

    ns = (40, 80, 160)
    for shift in (1.0, 5.0):
        e_euler = [err(EulerSolver, n, shift) for n in ns]
        e_unipc = [err(UniPCSolver, n, shift) for n in ns]
        # Euler is first order: doubling the steps halves the error
        for a, b in zip(e_euler, e_euler[1:]):
            assert 1.8 < a / b < 2.2
        # UniPC is more accurate and converges faster
        for eu, ep in zip(e_euler, e_unipc):
            assert ep < eu / 5
        for a, b in zip(e_unipc, e_unipc[1:]):
            # second order once the steps are small (with shift 5 the last, coarse steps still dominate)
            assert a / b > (3.5 if shift == 1.0 else 1.5)
    assert e_unipc[-1] < 5e-3


# ---- the sampling loop with a small fake velocity model ----------------------------------------
class FakeVelocity(nn.Module):
    """Same call signature as moga.model.WanModel; its velocity depends on x, t and each shot's text."""

    def __init__(self, channels=4, text_dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=g) * 0.3)
        self.text = nn.Parameter(torch.randn(text_dim, channels, generator=g) * 0.3)
        self.config = type("Cfg", (), {"in_dim": channels})()
        self.moga_config = MoGAConfig(num_groups=3)
        self.calls = []

    def forward(self, x, t, context, shot_frames=None, moga=None, dense_layers=(), parallel=None):
        self.calls.append(dict(t=float(t[0]), moga=moga, dense_layers=dense_layers, shot_frames=shot_frames,
                               per_shot=isinstance(context, list)))
        b, c, f, h, w = x.shape
        shot_frames = shot_frames or (f,)
        contexts = context if isinstance(context, list) else [context] * len(shot_frames)
        bias = torch.cat([(ctx.mean(1) @ self.text)[:, :, None].expand(b, c, n)
                          for ctx, n in zip(contexts, shot_frames)], dim=2)
        mixed = torch.einsum("bcfhw,cd->bdfhw", x, self.mix)
        return torch.tanh(mixed) * (1 + t[0] / 1000) + bias[..., None, None]


def _embeds(n, seed=0, text_dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 5, text_dim, generator=g) for _ in range(n)]


def _sample(model, **kw):
    args = dict(shot_frames=(2, 1, 3), latent_size=(6, 4, 4), steps=4, cfg=3.0, shift=5.0, solver="unipc", seed=11)
    args.update(kw)
    return sample(model, args.pop("positive", _embeds(3)), args.pop("negative", _embeds(1, 9)[0]), **args)


def test_same_seed_same_latent_different_seed_different():
    model = FakeVelocity()
    a, b, c = _sample(model), _sample(model), _sample(model, seed=12)
    assert a.shape == (1, 4, 6, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_noise_comes_from_one_cpu_generator():
    model = FakeVelocity()
    seen = []
    _sample(model, steps=1, callback=lambda i, n, x: seen.append(x.clone()), cfg=1.0)
    noise = initial_noise((1, 4, 6, 4, 4), 11)
    assert torch.equal(noise, initial_noise((1, 4, 6, 4, 4), 11))
    # one step with cfg 1 lands on the data prediction from the initial noise
    sched = make_schedule(1, 5.0)
    v = model(noise, torch.tensor([sched.timesteps[0]]), _embeds(3), shot_frames=(2, 1, 3))
    assert torch.allclose(seen[0], noise - sched.sigmas[0] * v, atol=1e-6)


def test_guidance_matches_manual_euler_loop():
    model = FakeVelocity()
    pos, neg = _embeds(3), _embeds(1, 9)[0]
    got = _sample(model, solver="euler", positive=pos, negative=neg, cfg=4.0)
    sched = make_schedule(4, 5.0)
    x = initial_noise((1, 4, 6, 4, 4), 11)
    for i in range(4):
        t = torch.tensor([sched.timesteps[i]])
        vc = model(x, t, pos, shot_frames=(2, 1, 3))
        vu = model(x, t, neg, shot_frames=(2, 1, 3))
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (vu + 4.0 * (vc - vu))
    assert torch.allclose(got, x, atol=1e-5)


def test_cfg_one_skips_the_negative_pass_and_shots_get_their_own_text():
    model = FakeVelocity()
    _sample(model, cfg=1.0, negative=None)
    assert len(model.calls) == 4 and all(c["per_shot"] and c["shot_frames"] == (2, 1, 3) for c in model.calls)
    model.calls.clear()
    _sample(model, cfg=2.0)
    assert len(model.calls) == 8 and [c["per_shot"] for c in model.calls[:2]] == [True, False]
    # the shot texts matter: swapping two shots' prompts changes the result
    pos = _embeds(3)
    a = _sample(model, positive=pos)
    b = _sample(model, positive=[pos[1], pos[0], pos[2]])
    assert (a - b).abs().max() > 1e-3


def test_callback_every_step_and_timesteps_in_order():
    model = FakeVelocity()
    seen = []
    _sample(model, steps=5, callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(i, 5, (1, 4, 6, 4, 4)) for i in range(1, 6)]
    assert [c["t"] for c in model.calls[::2]] == list(make_schedule(5, 5.0).timesteps)


def test_cancel_stops_within_one_step():
    model = FakeVelocity()
    state = {"stop": False}

    def callback(i, n, x):
        if i == 2:
            state["stop"] = True
    with pytest.raises(Cancelled):
        _sample(model, steps=10, callback=callback, cancel=lambda: state["stop"])
    assert len(model.calls) == 4  # two steps of two passes, then no further model call
    model.calls.clear()
    with pytest.raises(Cancelled):
        _sample(model, cancel=lambda: True)
    assert model.calls == []


def test_cancel_between_cond_and_uncond_passes():
    model = FakeVelocity()
    with pytest.raises(Cancelled):
        _sample(model, cancel=lambda: len(model.calls) >= 1)
    assert len(model.calls) == 1


def test_dense_steps_and_dense_layers():
    model = FakeVelocity()
    _sample(model, steps=5, dense_steps=0.4, dense_layers=(0, 2), cfg=1.0)
    dense = [c["moga"].dense for c in model.calls]
    assert dense == [True, True, False, False, False]
    assert all(c["dense_layers"] == (0, 2) for c in model.calls)
    assert all(c["moga"].num_groups == 3 for c in model.calls)
    model.calls.clear()
    mine = MoGAConfig(num_groups=2, fusion="lse")
    _sample(model, steps=2, moga=mine, cfg=1.0)
    assert [c["moga"] for c in model.calls] == [mine, mine]
    assert dense_step_count(1.0, 7) == 7 and dense_step_count(0.0, 7) == 0
    with pytest.raises(ValueError, match="fraction"):
        _sample(model, dense_steps=1.5)


def test_result_keeps_shot_boundaries():
    res = _sample(FakeVelocity(), return_result=True)
    assert res.shot_frames == (2, 1, 3) and res.latent_ranges == ((0, 2), (2, 3), (3, 6))
    assert res.steps == 4 and len(res.step_seconds) == 4 and res.seconds_per_step > 0
    assert torch.equal(res.latent, _sample(FakeVelocity()))


def test_bad_arguments():
    model = FakeVelocity()
    with pytest.raises(ValueError, match="sum to the latent frame count"):
        _sample(model, shot_frames=(2, 2))
    with pytest.raises(ValueError, match="one per shot"):
        _sample(model, positive=_embeds(2))
    with pytest.raises(ValueError, match="solver"):
        _sample(model, solver="dpm++")
    with pytest.raises(ValueError, match="negative"):
        _sample(model, negative=None)


def test_runs_under_inference_mode():
    model = FakeVelocity()
    out = _sample(model, steps=1)
    assert out.is_inference()
