"""moga.sampling.sample on the real (tiny, random) Wan DiT from moga.testing."""
import pytest
import torch

from moga.attention import MoGAConfig
from moga.sampling import Cancelled, initial_noise, make_schedule, sample
from moga.shots import ShotPlan
from moga.testing import random_inputs, tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(seed=1, num_groups=3)
    plan = ShotPlan.from_prompts(["a", "b", "c"], frames=[5, 1, 9])
    _, _, ctx = random_inputs(model.config, shots=3, seed=2)
    _, _, neg = random_inputs(model.config, shots=1, seed=3)
    return model, plan, ctx, neg


def _run(setup, **kw):
    model, plan, ctx, neg = setup
    args = dict(shot_frames=plan.latent_shot_frames(), latent_size=plan.latent_size(48, 32), steps=3, cfg=4.0,
                shift=5.0, solver="unipc", seed=5)
    args.update(kw)
    return sample(model, ctx, neg, **args)


def test_seeded_and_shaped(setup):
    a, b, c = _run(setup, steps=2), _run(setup, steps=2), _run(setup, steps=2, seed=6)
    assert a.shape == (1, 16, 6, 4, 6)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    assert torch.isfinite(a).all()


def test_euler_and_unipc_differ_but_agree_on_one_step(setup):
    assert (_run(setup, solver="euler", cfg=1.0) - _run(setup, cfg=1.0)).abs().max() > 1e-4
    one_e, one_u = _run(setup, solver="euler", steps=1, cfg=1.0), _run(setup, steps=1, cfg=1.0)
    assert torch.allclose(one_e, one_u, atol=1e-5)  # a single step lands on x0 for both


def test_one_step_is_the_guided_data_prediction(setup):
    model, plan, ctx, neg = setup
    got = _run(setup, steps=1)
    sched = make_schedule(1, 5.0)
    x = initial_noise((1, 16, 6, 4, 6), 5)
    t = torch.tensor([sched.timesteps[0]])
    with torch.no_grad():
        vc = model(x, t, ctx, shot_frames=plan.latent_shot_frames())
        vu = model(x, t, neg, shot_frames=plan.latent_shot_frames())
    assert torch.allclose(got, x - sched.sigmas[0] * (vu + 4.0 * (vc - vu)), atol=1e-5)


def test_dense_warmup_changes_a_moga_model_and_dense_layers_pass_through(setup):
    run = lambda **kw: _run(setup, steps=2, cfg=1.0, **kw)  # noqa: E731
    base, warm = run(), run(dense_steps=0.5)
    all_dense = run(moga=MoGAConfig(num_groups=3, dense=True))
    assert (base - warm).abs().max() > 1e-5
    assert torch.allclose(run(dense_layers=(0, 1)), all_dense, atol=1e-5)  # every layer dense
    assert torch.allclose(run(dense_steps=1.0), all_dense, atol=1e-5)


def test_cancel_and_callback(setup):
    seen = []
    with pytest.raises(Cancelled):
        _run(setup, steps=4, cfg=1.0, callback=lambda i, n, x: seen.append(i), cancel=lambda: len(seen) >= 2)
    assert seen == [1, 2]
