"""The generic trainer on the demo world (tiny model, CPU): it learns, logs balance, resumes exactly,
stores no pickle; `python -m moga.train demo` runs end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

from moga.demo.data import WorldData, object_map
from moga.demo.training import _tiny
from moga.train import Batch, Trainer, TrainConfig, shift_sigma
from moga.train.state import load_tensors, save_tensors

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def codec(patch_codec):  # tests/conftest.py
    return patch_codec


class OneStory(WorldData):
    """The same 2-shot batch at every index (to see the loss fall in a few steps)."""

    def stories(self, index, count):
        return super().stories(0, count)


def _trainer(codec, steps=4, dense=False, **kw):
    model, text = _tiny(dense, 0)
    data = WorldData(codec, seed=1, shot_cycle=(2,))
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, warmup=2, log_every=1, ema_decay=0.9, **kw)
    return Trainer(model, data, cfg, modules={"text_encoder": text}, log=None)


def test_shift_sigma_matches_wan_shift():
    u = torch.rand(100, dtype=torch.float64)
    s = shift_sigma(u, 3.0)
    assert torch.allclose(s, 3 * u / (1 + 2 * u)) and bool((s >= u).all())


def test_world_batches_are_reproducible_and_weighted(codec):
    data = WorldData(codec, seed=3, shot_cycle=(2,), object_weight=4.0)
    a, b, c = data.batch(5, 2, "cpu"), data.batch(5, 2, "cpu"), data.batch(6, 2, "cpu")
    assert torch.equal(a.latent, b.latent) and a.captions == b.captions
    assert not torch.equal(a.latent, c.latent)
    assert a.latent.shape == (2, 16, 10, 16, 16) and a.shot_frames == (5, 5)
    assert a.weight.shape == (2, 1, 10, 16, 16) and set(a.weight.unique().tolist()) == {1.0, 5.0}
    share = float((a.weight > 1).float().mean())
    assert 0.02 < share < 0.5  # the object and its rim, not the whole frame


def test_object_map_follows_the_object():
    from moga.demo import world as w

    story = w.story_from_captions(["a large red square moves right on a grey background"], seed=0)
    video = w.render_story(story)[None]
    m = object_map(video, [17])[0, 0]  # [5, 16, 16]
    cols = [int(torch.nonzero(m[f].any(0)).float().mean()) for f in range(5)]
    assert cols == sorted(cols) and cols[-1] > cols[0]


def test_loss_falls_and_balance_is_logged(codec):
    model, text = _tiny(False, 0)
    data = OneStory(codec, seed=1, shot_cycle=(2,))
    cfg = TrainConfig(steps=90, batch_size=2, lr=3e-3, warmup=3, log_every=10, caption_dropout=0.0)
    trainer = Trainer(model, data, cfg, modules={"text_encoder": text}, log=None)
    rows = trainer.run()
    assert rows[-1]["flow"] < 0.7 * rows[0]["flow"], rows   # measured 0.64 (1.74 -> 1.11)
    for r in rows:
        assert 0 < r["balance"] < 1 and 1.0 <= r["group_max"] <= 8.0
        assert r["loss"] == pytest.approx(r["flow"] + r["balance"], rel=1e-6)


def test_dense_model_trains_without_balance_terms(codec):
    trainer = _trainer(codec, steps=2, dense=True)
    rows = trainer.run()
    assert "balance" not in rows[-1] and rows[-1]["loss"] == rows[-1]["flow"]


def test_resume_continues_exactly(codec, tmp_path):
    straight = _trainer(codec, steps=4)
    straight.run()
    first = _trainer(codec, steps=4)
    first.run(steps=2)
    first.save(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert files == {"weights.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}
    model, text = _tiny(False, 0)
    resumed = Trainer.resume(tmp_path / "ckpt", model, WorldData(codec, seed=1, shot_cycle=(2,)),
                             modules={"text_encoder": text}, log=None)
    assert resumed.step == 2
    resumed.run()
    a, b = straight.weights(ema=False), resumed.weights(ema=False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = straight.weights(ema=True), resumed.weights(ema=True)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["steps"] == 4


def test_resume_rejects_another_model(codec, tmp_path):
    t = _trainer(codec, steps=1)
    t.run()
    t.save(tmp_path / "ckpt")
    model, text = _tiny(True, 0)  # dense: no routers
    with pytest.raises(ValueError, match="does not match"):
        Trainer.resume(tmp_path / "ckpt", model, t.data, modules={"text_encoder": text}, log=None)


def test_sharded_tensor_files_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 50) for i in range(6)}
    paths = save_tensors(tmp_path / "w.safetensors", tensors, max_file_bytes=45_000)
    assert len(paths) == 3 and not (tmp_path / "w.safetensors").exists()  # 20 kB each, 2 a file
    back = load_tensors(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(3)})  # one file again: shards go
    assert set(load_tensors(tmp_path / "w.safetensors")) == {"x"}


def test_precomputed_context_batches(codec):
    """Issue 11's path: batches carrying text embeddings instead of captions."""
    model, _ = _tiny(False, 0)

    class Ready:
        def batch(self, index, size, device):
            g = torch.Generator().manual_seed(index)
            return Batch(latent=torch.randn(size, 16, 4, 8, 8, generator=g), shot_frames=(2, 2),
                         context=[torch.randn(size, 5, 32, generator=g) for _ in range(2)])

    trainer = Trainer(model, Ready(), TrainConfig(steps=2, batch_size=2, log_every=1), log=None)
    assert len(trainer.run()) == 2
    with pytest.raises(ValueError, match="captions"):
        Trainer(model, WorldData(codec, shot_cycle=(1,)), TrainConfig(steps=1, batch_size=1), log=None).run()


def test_train_demo_command_smoke(tmp_path):
    from moga.train.__main__ import main

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--tiny", "--steps", "2", "--batch", "1", "--device", "cpu",
                 "--log-every", "1", "--warmup", "2"]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "codec" and rows[-1]["event"] == "done" and rows[-1]["steps"] == 2
    from moga.demo.model import load_demo

    model = load_demo(out / "model.safetensors")
    assert model.text_encoder is not None and model.vae is not None
    assert main(["demo", "--out", str(out), "--tiny", "--steps", "3", "--batch", "1", "--device", "cpu",
                 "--warmup", "2", "--resume"]) == 0
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 3


def test_budget_fits_steps_once_and_resumed_chunks_keep_them(tmp_path):
    """--budget-seconds: the step count is fitted to the whole budget on the first call (which stops at
    its --time-limit), and a resumed call keeps that count instead of the command line's --steps."""
    from moga.train.__main__ import main

    out = tmp_path / "run"
    common = ["demo", "--out", str(out), "--tiny", "--batch", "1", "--device", "cpu", "--log-every", "1",
              "--warmup", "20", "--probe", "8", "--auto-steps", "--export-margin", "1"]
    assert main(common + ["--budget-seconds", "3000", "--time-limit", "4"]) == 0
    first = json.loads((out / "ckpt" / "state.json").read_text())
    fitted = first["config"]["steps"]
    assert fitted > 20 * first["step"], "the count must come from the budget, not from this call's limit"
    assert main(common + ["--time-limit", "3", "--steps", "5", "--resume"]) == 0
    second = json.loads((out / "ckpt" / "state.json").read_text())
    assert second["config"]["steps"] == fitted and second["step"] > first["step"]
    assert second["seconds"] > first["seconds"]


def test_trains_under_given_attention_settings_and_records_them(tmp_path):
    """--context-frames / --capacity / --capacity-split: the DiT trains under them (the trainer's calls
    see them), the exported file records them, and a resume with other settings is refused."""
    from moga.demo.model import load_demo
    from moga.train.__main__ import main

    out = tmp_path / "run"
    flags = ["--context-frames", "3", "--capacity", "1", "--capacity-split", "stride"]
    common = ["demo", "--out", str(out), "--tiny", "--batch", "2", "--device", "cpu", "--warmup", "2"]
    assert main(common + ["--steps", "2"] + flags) == 0
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["config"]["moga"] == {"context_frames": 3, "capacity": 1.0, "capacity_split": "stride"}
    cfg = load_demo(out / "model.safetensors").moga_config
    assert (cfg.context_frames, cfg.capacity, cfg.capacity_split) == (3, 1.0, "stride")
    with pytest.raises(ValueError, match="resume with the same"):
        main(common + ["--steps", "3", "--resume"])
    with pytest.raises(ValueError, match="resume with the same"):
        main(common + ["--steps", "3", "--resume", "--context-frames", "2", "--capacity", "1",
                       "--capacity-split", "stride"])
    assert main(common + ["--steps", "3", "--resume"] + flags) == 0
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 3


def test_training_under_capacity_reaches_the_router():
    """With the capacity on in training, the routed branch still gives the router a gradient (the
    capped groups keep the router's probabilities)."""
    from moga.demo.training import _tiny

    model, _ = _tiny(False, 0)
    model.moga_config = model.moga_config.replace(capacity=1.0, capacity_split="stride", context_frames=3)
    torch.manual_seed(1)
    with torch.no_grad():  # Wan's init zeroes the output head, which would stop every gradient
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 16, 10, 2, 2)
    ctx = torch.randn(1, 16, 32)
    out = model(x, torch.tensor([500.0]), ctx, shot_frames=[5, 5])
    out.float().pow(2).mean().backward()
    grads = [m.router.weight.grad for m in model.modules() if getattr(m, "router", None) is not None]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_router_learning_rate_scale(codec):
    """router_lr_scale: the routers' AdamW group runs at lr x scale, every other parameter at lr; with the
    same seed and data the DiT's first update is identical and the routers' is `scale` times larger."""
    from moga.train.trainer import is_router_param

    def first_update(scale):
        model, text = _tiny(False, 0)
        with torch.no_grad():  # Wan's zero output head would leave every gradient but its own at zero
            for p in model.head.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
        data = WorldData(codec, seed=0)
        cfg = TrainConfig(steps=1, batch_size=2, warmup=1, lr=1e-3, router_lr_scale=scale, ema_decay=0.0,
                          weight_decay=0.0)  # no decay: every change below is the gradient's
        trainer = Trainer(model, data, cfg, modules={"text_encoder": text})
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.train_step()
        return {n: (p.detach() - before[n]) for n, p in trainer.params.items()}

    plain, fast = first_update(1.0), first_update(10.0)
    routers = [n for n in plain if is_router_param(n)]
    assert routers and not is_router_param("blocks.0.self_attn.q.weight")
    for n in routers:  # Adam's first step is about lr * sign(grad): scale x larger
        assert plain[n].abs().sum() > 0
        torch.testing.assert_close(fast[n], 10.0 * plain[n], rtol=1e-3, atol=1e-9)
    other = next(n for n in plain if not is_router_param(n) and plain[n].abs().sum() > 0)
    torch.testing.assert_close(fast[other], plain[other])
    with pytest.raises(ValueError, match="router_lr_scale"):
        TrainConfig(router_lr_scale=0.0)


def test_train_demo_with_another_group_count(tmp_path):
    """--num-groups M: the routers get M rows and the exported file says M."""
    from moga.demo.model import load_demo
    from moga.train.__main__ import main

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--tiny", "--steps", "1", "--batch", "1", "--device", "cpu",
                 "--warmup", "1", "--num-groups", "6"]) == 0
    model = load_demo(out / "model.safetensors")
    assert model.config.num_groups == 6 and model.moga_config.num_groups == 6
    assert model.blocks[0].self_attn.router.weight.shape[0] == 6


def test_dense_warmup_trains_the_top_of_the_noise_range_dense(codec):
    """dense_warmup w: the steps the seeded coin picks draw s from shift(u), u in (1 - w, 1], and run
    dense attention; the others draw u below 1 - w and run MoGA. The same steps on a second trainer
    (resumable), and the sampler's dense steps at the shipped 3 of 40 fall in the dense range."""
    from moga.sampling import dense_step_count, make_schedule

    w = 0.3
    trainer = _trainer(codec, steps=24, dense_warmup=w)
    calls = []
    forward = trainer.model.forward

    def spy(x, t, context, **kw):
        calls.append(((t / 1000.0).detach().clone(), kw.get("moga")))
        return forward(x, t, context, **kw)

    trainer.model.forward = spy
    trainer.run()
    cut = float(shift_sigma(torch.tensor(1.0 - w, dtype=torch.float64), trainer.config.shift))
    picked = [trainer.dense_warmup_step(k) for k in range(24)]
    assert 0 < sum(picked) < 24, "both kinds of step must occur in 24 steps at w = 0.3"
    for (s, moga), dense in zip(calls, picked):
        if dense:
            assert moga is not None and moga.dense and bool((s >= cut - 1e-6).all()), (s, cut)
        else:
            assert (moga is None or not moga.dense) and bool((s < cut + 1e-6).all()), (s, cut)
    again = _trainer(codec, steps=24, dense_warmup=w)
    assert [again.dense_warmup_step(k) for k in range(24)] == picked
    # a dense model has no warm-up to train: every step as before
    dense_model = _trainer(codec, dense=True, dense_warmup=w)
    assert not any(dense_model.dense_warmup_step(k) for k in range(24))
    # the shipped setting: the sampler's dense steps (3 of 40) lie above the cut, the first MoGA step below
    sched = make_schedule(40, 3.0)
    n = dense_step_count(0.075, 40)
    cut = float(shift_sigma(torch.tensor(1.0 - 0.075, dtype=torch.float64), 3.0))
    assert n == 3 and min(sched.sigmas[:n]) > cut > sched.sigmas[n]
    with pytest.raises(ValueError, match="dense_warmup"):
        TrainConfig(dense_warmup=1.0)


def test_train_demo_dense_warmup_is_recorded_and_kept_on_resume(tmp_path):
    """--dense-warmup: the exported file samples with it (moga.dense_warmup), the training record says
    so (and --router-init-std), and a resume with another value is refused."""
    from moga.demo.model import demo_info, load_demo
    from moga.train.__main__ import main

    out = tmp_path / "run"
    common = ["demo", "--out", str(out), "--tiny", "--batch", "1", "--device", "cpu", "--warmup", "2"]
    assert main(common + ["--steps", "2", "--dense-warmup", "0.075", "--router-init-std", "0.09"]) == 0
    model = load_demo(out / "model.safetensors")
    assert model.dense_warmup == pytest.approx(0.075)
    assert demo_info(model)["training"]["dense_warmup"] == pytest.approx(0.075)
    assert demo_info(model)["training"]["router_init_std"] == pytest.approx(0.09)
    with pytest.raises(ValueError, match="--dense-warmup"):
        main(common + ["--steps", "3", "--resume"])
    assert main(common + ["--steps", "3", "--resume", "--dense-warmup", "0.075"]) == 0


def test_router_init_std_redraws_only_the_router_rows():
    """--router-init-std: the routers' rows are drawn at that scale, every other weight as by default."""
    import argparse

    from moga.demo.training import fresh_models

    args = lambda **kw: argparse.Namespace(**dict(dict(tiny=True, dense=False, seed=0, num_groups=None,  # noqa: E731
                                                       router_init_std=None), **kw))
    plain, _ = fresh_models(args())
    wide, _ = fresh_models(args(router_init_std=0.2))
    again, _ = fresh_models(args(router_init_std=0.2))
    p, q = dict(plain.named_parameters()), dict(wide.named_parameters())
    routers = [n for n in p if n.endswith("router.weight")]
    assert routers
    for n in p:
        if n in routers:
            assert abs(q[n].std().item() - 0.2) < 0.04 and abs(p[n].std().item() - 0.02) < 0.004
            assert torch.equal(q[n], dict(again.named_parameters())[n])  # seeded
        else:
            assert torch.equal(p[n], q[n]), n


@pytest.mark.parametrize("flags, match", [
    (["--dense", "--capacity", "1"], "dense model"),
    (["--dense", "--router-init-std", "0.1"], "router-init-std"),
    (["--router-init-std", "0"], "router-init-std"),
    (["--dense", "--dense-warmup", "0.1"], "dense model"),
    (["--dense-warmup", "1"], "dense-warmup"),
    (["--dense", "--num-groups", "6"], "dense model"),
    (["--context-frames", "-1"], "context_frames must be >= 0"),
    (["--num-groups", "1"], "at least 2"),
])
def test_bad_model_flags_are_refused_before_training(tmp_path, flags, match):
    """Flags the model cannot take fail with a clear error before the codec is trained or a folder made."""
    from moga.train.__main__ import main

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        main(["demo", "--out", str(out), "--tiny", "--steps", "1", "--device", "cpu", *flags])
    assert not out.exists()


def test_auto_steps_probe_is_kept_inside_the_warmup(tmp_path, capsys):
    """A probe longer than the warm-up is cut to fit it (said in the log), so the LR schedule is the one
    a run with the fitted step count would have; a warm-up too short to time anything is refused."""
    from moga.train.__main__ import main

    out = tmp_path / "run"
    common = ["demo", "--out", str(out), "--tiny", "--batch", "1", "--device", "cpu", "--log-every", "1",
              "--auto-steps", "--export-margin", "1", "--time-limit", "4"]
    assert main(common + ["--warmup", "10", "--probe", "100"]) == 0
    assert "--probe 100 cut to 9" in capsys.readouterr().out
    log = (out / "log.jsonl").read_text()
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] > 9
    with pytest.raises(ValueError, match="warm-up"):
        main(["demo", "--out", str(tmp_path / "short"), "--tiny", "--batch", "1", "--device", "cpu",
              "--auto-steps", "--time-limit", "4", "--warmup", "3"])
    assert "auto_steps" in log


def _dense_file(tmp_path):
    from moga.train.__main__ import main

    dense = tmp_path / "dense"
    assert main(["demo", "--out", str(dense), "--tiny", "--dense", "--steps", "2", "--batch", "1",
                 "--device", "cpu", "--warmup", "2", "--codec-steps", "2"]) == 0
    return dense


def test_moga_model_starts_from_a_dense_file_with_calibrated_routers(tmp_path):
    """--init DENSE on a MoGA model (the paper's dense-to-MoGA fine-tune): every DiT and text weight is the
    file's; the routers, which the file lacks, become unit k-means centroids of the layers' inputs, so a
    token joins the group of the centroid nearest to it; the exported file records how it began."""
    from safetensors.torch import load_file

    from moga.demo.model import load_demo
    from moga.demo.training import calibrate_routers, init_from
    from moga.train.__main__ import main

    dense = _dense_file(tmp_path)
    source = load_file(str(dense / "model.safetensors"))
    model, text = _tiny(False, 3)
    drawn = {i: b.self_attn.router.weight.detach().clone() for i, b in enumerate(model.blocks)}
    fresh = init_from(dense / "model.safetensors", model, text)
    assert fresh == [0, 1]
    for k, v in model.state_dict().items():
        if "router" not in k:
            assert torch.equal(v, source[k].float()), k
    for k, v in text.state_dict().items():
        assert torch.equal(v, source["text_encoder." + k].float()), k

    from moga.demo.training import load_codec
    data = WorldData(load_codec(dense / "codec.safetensors"), seed=0)
    seen = {}

    def keep_first_input(module, args, kwargs):  # returns None: the hook only looks
        seen.setdefault("x", (args[0] if args else kwargs["x"]).detach().clone())

    hook = model.blocks[1].self_attn.register_forward_pre_hook(keep_first_input, with_kwargs=True)
    calibrate_routers(model, text, data, [0, 1], batches=1, batch=2, tokens=4096, log=lambda m: None)
    hook.remove()
    for i, block in enumerate(model.blocks):
        rows = block.self_attn.router.weight.detach()
        assert not torch.allclose(rows, drawn[i]) and torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)
    x = seen["x"].flatten(0, -2).float()
    rows = model.blocks[1].self_attn.router.weight.detach()
    routing = model.blocks[1].self_attn.router(x[None])
    nearest = (F.normalize(x, dim=-1) @ rows.T).argmax(-1)
    assert torch.equal(routing.group_ids[0], nearest)
    assert len(set(nearest.tolist())) >= 3  # the centroids split the tokens, not one group for all
    assert float(routing.gate.detach().mean()) > 2.0 / rows.shape[0]  # gates start well above the 1/M of fresh rows

    out = tmp_path / "moga"
    assert main(["demo", "--out", str(out), "--tiny", "--steps", "2", "--batch", "1", "--device", "cpu",
                 "--warmup", "2", "--init", str(dense / "model.safetensors"), "--codec",
                 str(dense / "codec.safetensors")]) == 0
    from moga.demo.model import demo_info
    training = demo_info(load_demo(out / "model.safetensors"))["training"]
    assert training["init"] == "model.safetensors" and training["init_routers"] == "calibrate"


def test_init_refuses_a_file_of_another_model(tmp_path):
    from moga.demo.training import init_from

    dense = _dense_file(tmp_path)
    model, text = _tiny(False, 0, num_groups=4)
    init_from(dense / "model.safetensors", model, text)  # dense into MoGA with any M: fine
    from moga.demo.model import save_demo
    from moga.demo.training import load_codec
    moga8 = save_demo(tmp_path / "m8.safetensors", _tiny(False, 0)[0], _tiny(False, 0)[1],
                      load_codec(dense / "codec.safetensors"))
    with pytest.raises(ValueError, match="does not fit this model.*router"):
        init_from(moga8, model, text)  # 8 router rows into a model of 4
    with pytest.raises(ValueError, match="does not fit this model.*shapes"):
        init_from(dense / "model.safetensors", *_tiny_wide(True))  # another width: refused, named


def _tiny_wide(dense):
    """A tiny demo model of another width than _tiny's (96, not 64): no file of _tiny's fits it."""
    from moga.demo.model import demo_wan_config
    from moga.demo.text import DemoTextEncoder
    from moga.model import WanModel

    return WanModel(demo_wan_config(dense, dim=96, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)), \
        DemoTextEncoder()


def test_dense_model_starts_from_a_moga_file_without_its_routers(tmp_path):
    """--dense --init MOGA (a dense twin from the MoGA model's weights, for an equal-budget comparison): every
    weight but the routers is the file's, the routers are dropped and said so."""
    from safetensors.torch import load_file

    from moga.demo.model import save_demo
    from moga.demo.training import init_from, load_codec

    dense = _dense_file(tmp_path)
    moga_model, moga_text = _tiny(False, 5)
    path = save_demo(tmp_path / "moga.safetensors", moga_model, moga_text, load_codec(dense / "codec.safetensors"))
    source = load_file(str(path))
    assert any(k.endswith("router.weight") for k in source)
    model, text = _tiny(True, 1)
    said = []
    assert init_from(path, model, text, log=said.append) == []
    assert said and "routers are dropped" in said[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k].float()), k
    for k, v in text.state_dict().items():
        assert torch.equal(v, source["text_encoder." + k].float()), k
