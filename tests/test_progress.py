"""Progress on long work fires once per unit of work (steps, blocks, shots, layers), never by the clock:
sampling block by block, calibration, inspect, decode; the CLI shows them on stderr."""
import torch

from moga.sampling import sample
from moga.testing import tiny_model, write_tiny_checkpoint


def _inputs(model, shots=(2, 1), text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = [torch.randn(1, text, model.config.text_dim, generator=g) for _ in shots]
    neg = torch.randn(1, text, model.config.text_dim, generator=g)
    return pos, neg


def test_block_callback_fires_after_every_block_of_every_call():
    model = tiny_model(num_groups=3, num_layers=3, seed=2)
    pos, neg = _inputs(model)
    kw = dict(shot_frames=(2, 1), latent_size=(3, 8, 8), steps=2, shift=5.0, solver="euler", seed=3)
    nb = len(model.blocks)
    for batch, calls in ((False, 2), (True, 1)):  # two guidance passes, or one batch of both
        events = []
        got = sample(model, pos, neg, cfg=3.0, cfg_batch=batch, block_callback=lambda *e: events.append(e), **kw)
        total = calls * nb
        assert events == [(s, d, total) for s in (1, 2) for d in range(1, total + 1)], batch
        assert torch.equal(got, sample(model, pos, neg, cfg=3.0, cfg_batch=batch, **kw))  # progress changes nothing
    events.clear()
    sample(model, pos, None, cfg=1.0, block_callback=lambda *e: events.append(e), **kw)
    assert events == [(s, d, nb) for s in (1, 2) for d in range(1, nb + 1)]  # no unconditional call


def test_calibration_reports_every_block_then_every_layer(tmp_path):
    from moga.checkpoint import calibrate_routers, load_model
    path = write_tiny_checkpoint(tmp_path / "plain.safetensors", num_layers=3, seed=4)
    model = load_model(path)
    events = []
    routers = calibrate_routers(path, 2, [0, 2], size=(2, 4, 4), steps=2, model=model,
                                progress=lambda d, t: events.append((d, t)))
    total = 2 * 3 + 2
    assert events == [(i, total) for i in range(1, total + 1)]
    assert sorted(routers) == [0, 2]


def test_inspect_reports_both_passes_block_by_block():
    from moga.diagnostics import inspect_step
    from moga.testing import random_inputs
    model = tiny_model(num_groups=3, num_layers=3, seed=5)
    x, t, ctx = random_inputs(model.config, frames=2, height=8, width=8, seed=6)
    events = []
    inspect_step(model, x, t, ctx, shot_frames=(2,), queries=8, progress=lambda d, n: events.append((d, n)))
    assert events == [(i, 6) for i in range(1, 7)]


def test_decode_shots_reports_every_shot():
    from moga.wan_io import decode_shots

    class Half:
        def decode(self, z):
            return z[:, :3] * 0.5

    z = torch.randn(1, 16, 6, 2, 2, generator=torch.Generator().manual_seed(1))
    events = []
    out = decode_shots(Half(), z, [1, 3, 2], progress=lambda d, n: events.append((d, n)))
    assert events == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(out, z[:, :3] * 0.5)
