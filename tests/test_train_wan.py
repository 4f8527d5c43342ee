"""`moga train prepare` / `moga train wan` on a tiny random Wan checkpoint and synthetic clips (CPU).

The clips are mp4s written here (a moving disc per shot, a new colour per shot) with JSON sidecars. Most
tests encode them with two stand-ins defined below, which are NOT the Wan VAE / umT5 (same shapes, fixed
maths): `PoolingVAE` (4x temporal, 8x spatial average pooling + a fixed 3 -> 16 channel mix) and
`HashTextEncoder` (one seeded vector per word). One test runs the `wan` extra's tiny random UMT5 and
AutoencoderKLWan instead when transformers and diffusers are installed.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moga.checkpoint import TensorSource, inspect_checkpoint, load_model, read_header
from moga.testing import write_tiny_checkpoint
from moga.train import data as D
from moga.train.lora import lora_modules, load_lora, merge_lora
from moga.train.wan import TrainSettings, WanTrainer, balance_terms, batch_indices, draw, main

TEXT_DIM = 32
SIZE = dict(width=64, height=32)           # latent 4 x 8, 2 x 4 tokens per frame


# ---- stand-in encoders and synthetic clips (shared with test_train_wan_dist.py) -------------------


class PoolingVAE:
    """Stand-in for the Wan VAE (not a VAE): the first frame alone, then groups of 4 frames averaged;
    8x8 average pooling; a fixed random 3 -> channels mix. Same latent shapes as Wan's."""

    def __init__(self, channels: int = 16, seed: int = 0):
        self.mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(seed))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        rest = video[:, :, 1:].reshape(b, c, (t - 1) // 4, 4, h, w).mean(3)
        v = F.avg_pool3d(torch.cat([video[:, :, :1], rest], 2), (1, 8, 8))
        return torch.einsum("oc,bcfhw->bofhw", self.mix, v)


class HashTextEncoder:
    """Stand-in for umT5 (not a language model): one seeded random vector per word, zero-padded."""

    def __init__(self, dim: int = TEXT_DIM, text_len: int = 16):
        self.dim, self.text_len = dim, text_len

    def encode(self, prompts):
        out = []
        for p in prompts:
            e = torch.zeros(1, self.text_len, self.dim)
            for i, word in enumerate(p.split()[: self.text_len]):
                e[0, i] = torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))
            out.append(e)
        return out


def disc_frames(count: int, size=(48, 80), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    col = rng.integers(30, 225, 3)
    cx, cy, vx = rng.integers(10, w - 10), rng.integers(10, h - 10), rng.integers(-3, 4)
    frames = np.empty((count, h, w, 3), np.uint8)
    for t in range(count):
        frames[t] = col // 2
        frames[t][(xx - cx - vx * t) ** 2 + (yy - cy) ** 2 < 64] = 255 - col
    return frames


def write_clip(folder: Path, name: str, shot_lengths, seed: int, sidecar=True, captions=True) -> Path:
    from moga.video import write_video
    frames = np.concatenate([disc_frames(n, seed=seed * 10 + s) for s, n in enumerate(shot_lengths)])
    path = write_video(folder / f"{name}.mp4", frames, fps=16)
    if sidecar:
        shots, t0 = [], 0
        for s, n in enumerate(shot_lengths):
            cap = f"shot {s} a {('red', 'blue', 'green')[s % 3]} disc" if captions else ""
            shots.append({"start_frame": t0, "end_frame": t0 + n, "caption": cap})
            t0 += n
        (folder / f"{name}.json").write_text(json.dumps({"story": "a test story", "shots": shots}))
    return path


def make_clips(folder: Path, good: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        write_clip(folder, f"clip{i}", (13, 9), seed=i)
    (folder / "broken.mp4").write_bytes(b"this is not a video")
    (folder / "broken.json").write_text(json.dumps({"shots": [{"caption": "anything"}]}))
    write_clip(folder, "short", (9, 3), seed=7)            # second shot: 3 frames < min 5
    write_clip(folder, "nocap", (9, 9), seed=8, captions=False)
    write_clip(folder, "orphan", (9,), seed=9, sidecar=False)
    return folder


SETTINGS = D.PrepareSettings(max_shot_frames=9, min_shot_frames=5, dtype="float32", **SIZE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_wan")
    clips = make_clips(root / "clips")
    index = D.prepare(clips, root / "shards", PoolingVAE(), HashTextEncoder(), SETTINGS, progress=False, log=None)
    ckpt = write_tiny_checkpoint(root / "tiny.safetensors", layout="comfyui", text_dim=TEXT_DIM)
    moga_ckpt = write_tiny_checkpoint(root / "tiny_moga.safetensors", layout="wan", num_groups=4,
                                      text_dim=TEXT_DIM, dtype=torch.bfloat16)
    return dict(root=root, clips=clips, shards=root / "shards", index=index, ckpt=ckpt, moga_ckpt=moga_ckpt)


def trainer(world, out, ckpt=None, **kw) -> WanTrainer:
    kw.setdefault("dtype", "float32")
    kw.setdefault("save_every", 0)
    return WanTrainer.from_checkpoint(ckpt or world["ckpt"], D.ShardDataset(world["shards"]), TrainSettings(**kw),
                                      out, device="cpu", progress=False, log=None)


# ---- prepare ----------------------------------------------------------------------------------------


def test_prepare_writes_shards_with_expected_shapes(world):
    index = world["index"]
    assert [s["name"] for s in index["samples"]] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    skipped = {s["name"]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"broken.mp4", "short.mp4", "nocap.mp4", "orphan.mp4"}
    assert "unreadable" in skipped["broken.mp4"]
    assert "too short" in skipped["short.mp4"] and "shot 2" in skipped["short.mp4"]
    assert "no caption" in skipped["nocap.mp4"] and "no caption" in skipped["orphan.mp4"]

    ds = D.ShardDataset(world["shards"])
    assert len(ds) == 3
    s = ds[0]
    # two shots of 9 frames (13 cut to the longest 4n+1 <= max_shot_frames) -> 3 latent frames each
    assert s.shot_frames == (3, 3)
    assert tuple(s.latent.shape) == (16, 6, SIZE["height"] // 8, SIZE["width"] // 8)
    assert s.tokens == 6 * (SIZE["height"] // 16) * (SIZE["width"] // 16)
    assert len(s.texts) == 2
    caps = index["samples"][0]["captions"]
    assert caps == ["a test story shot 0 a red disc", "a test story shot 1 a blue disc"]
    for t, cap in zip(s.texts, caps):   # zero padding trimmed: one row per word
        assert tuple(t.shape) == (1, len(cap.split()), TEXT_DIM)
    assert index["settings"]["latent_channels"] == 16 and index["settings"]["text_dim"] == TEXT_DIM


def test_prepare_reports_progress_after_every_clip(world, tmp_path):
    clips, _ = D.find_clips(world["clips"])
    events = []
    index = D.prepare(world["clips"], tmp_path / "sh", PoolingVAE(), HashTextEncoder(), SETTINGS,
                      progress=lambda done, total: events.append((done, total)), log=None)
    assert len(clips) > len(index["samples"]) == 3  # clips skipped while cutting count too
    assert events == [(i, len(clips)) for i in range(1, len(clips) + 1)]


def test_prepare_cuts_each_shot_from_its_own_frames(world):
    """Shot 2 of clip0 starts at file frame 13: its latent is the encoding of frames 13..21, scaled to
    cover 64x32 and centre-cropped."""
    from moga.video import read_video
    frames, _ = read_video(world["clips"] / "clip0.mp4")
    want = PoolingVAE().encode(D.fit_frames(frames[13:22], **SIZE))[0]
    got = D.ShardDataset(world["shards"])[0].latent[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shot_timing_in_seconds_resamples_to_the_training_fps():
    shot = D.ClipShot("x", start=0.5, end=1.5)
    # a 32 fps file, 16 fps training: every second frame from 0.5 s
    assert D.shot_frame_indices(shot, 32.0, 100, 16.0) == list(range(16, 48, 2))
    assert D.shot_frame_indices(D.ClipShot("x", start_frame=10, end_frame=14), 16.0, 100, 16.0) == [10, 11, 12, 13]
    assert D.shot_frame_indices(D.ClipShot("x", start=0.0), 16.0, 20, 16.0) == list(range(20))
    assert D.longest_valid(12, 81) == 9 and D.longest_valid(100, 81) == 81 and D.longest_valid(0, 81) == 0


def test_prepare_reads_a_manifest(world, tmp_path):
    entries = [{"video": str(world["clips"] / "clip1.mp4"), "story": "a test story",
                "shots": [{"start": 0.0, "end": 13 / 16, "caption": "shot 0 a red disc"},
                          {"start": 13 / 16, "caption": "shot 1 a blue disc"}]},
               {"video": "missing.mp4", "shots": [{"caption": "gone"}]}]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in entries))
    index = D.prepare(manifest, tmp_path / "sh", PoolingVAE(), HashTextEncoder(), SETTINGS, progress=False, log=None)
    assert len(index["samples"]) == 1 and index["skipped"][0]["name"] == "missing.mp4"
    a = D.ShardDataset(tmp_path / "sh")[0]
    b = D.ShardDataset(world["shards"])[1]
    torch.testing.assert_close(a.latent, b.latent)
    with pytest.raises(ValueError, match="already holds prepared shards"):
        D.prepare(manifest, tmp_path / "sh", PoolingVAE(), HashTextEncoder(), SETTINGS, progress=False, log=None)


def _wan_extra():
    from moga.wan_io import wan_extra_available
    return wan_extra_available()


@pytest.mark.slow
@pytest.mark.skipif(not _wan_extra(), reason="the 'wan' extra (transformers, diffusers) is not installed")
def test_prepare_with_the_wan_extra_tiny_encoders(world, tmp_path):
    from moga.wan_io import TextEncoder, WanVAE, save_tiny_text_encoder, save_tiny_vae
    te = TextEncoder.load(save_tiny_text_encoder(tmp_path / "te", text_dim=TEXT_DIM))
    vae = WanVAE.load(save_tiny_vae(tmp_path / "vae"))
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips, "one", (9, 5), seed=3)
    index = D.prepare(clips, tmp_path / "sh", vae, te, SETTINGS, progress=False, log=None)
    s = D.ShardDataset(tmp_path / "sh")[0]
    assert s.shot_frames == (3, 2)
    assert tuple(s.latent.shape) == (16, 5, 4, 8)
    assert all(t.shape[0] == 1 and t.shape[2] == TEXT_DIM and 1 <= t.shape[1] <= 512 for t in s.texts)
    assert torch.isfinite(s.latent).all() and index["skipped"] == []


# ---- training -----------------------------------------------------------------------------------------


def fixed_flow_loss(tr: WanTrainer) -> float:
    """The flow loss over every clip at fixed draws (step 0): the same batch before and after training."""
    with torch.no_grad():
        return sum(tr.sample_loss(i, 0, i)[1] for i in range(len(tr.data))) / len(tr.data)


@pytest.mark.parametrize("mode,lr", [("lora", 3e-3), ("full", 1e-3)])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(world, tmp_path, mode, lr):
    tr = trainer(world, tmp_path / mode, ckpt=world["moga_ckpt"], mode=mode, lr=lr, steps=8, batch=3)
    before = fixed_flow_loss(tr)
    stats = tr.run()
    after = fixed_flow_loss(tr)
    assert len(stats) == 8 and all(np.isfinite(s.loss) for s in stats)
    assert after < 0.9 * before, (before, after)
    assert stats[0].tokens == 3 * 48 and stats[0].lr == lr and stats[-1].group_ratio
    log = [json.loads(line) for line in (tmp_path / mode / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"loss", "flow", "balance", "balance_max", "balance_mean", "lr", "tokens_per_s"} <= set(log[0])


def _eval_group_ratio(tr: WanTrainer) -> float:
    """Largest max/mean group size over the layers, averaged over fixed inputs (no training noise)."""
    ratios = []
    with torch.no_grad():
        for i in range(len(tr.data)):
            s = tr.data[i]
            for sigma in (0.3, 0.7):
                noise = torch.randn(s.latent[None].shape, generator=torch.Generator().manual_seed(i))
                tr.model((1 - sigma) * s.latent[None] + sigma * noise, torch.tensor([sigma * 1000.0]), s.texts,
                         shot_frames=s.shot_frames, moga=tr.moga)
                ratios.append(max(balance_terms(tr.model, tr.layers, 0.0, "paper")[1]))
    return sum(ratios) / len(ratios)


@pytest.mark.slow
def test_balance_loss_keeps_groups_from_collapsing(world, tmp_path):
    """Full fine-tuning with random routers (M = 4): without the balance loss one group swallows
    almost every token of a layer (max/mean -> M); with it (alpha = 0.1) the groups stay spread."""
    ckpt = write_tiny_checkpoint(tmp_path / "t.safetensors", text_dim=TEXT_DIM)
    got = {}
    for alpha in (0.0, 0.1):
        tr = trainer(world, tmp_path / f"a{alpha}", ckpt=ckpt, mode="full", lr=1e-3, steps=80, num_groups=4,
                     routers="random", balance_weight=alpha, grad_checkpointing=False)
        start = _eval_group_ratio(tr)
        tr.run()
        got[alpha] = (start, _eval_group_ratio(tr))
    assert got[0.0][0] == got[0.1][0]              # the same start (seeded routers, same model)
    assert got[0.0][1] > 3.5, got                 # collapsed: one group holds > 87% of the tokens
    assert got[0.1][1] < 3.0, got                 # seeds 0-3 gave 3.65-3.99 without, 1.85-2.87 with


def test_routers_only_leaves_every_other_tensor_byte_identical(world, tmp_path):
    src = world["moga_ckpt"]   # bf16, Wan layout, with routers (trained from the checkpoint's own)
    tr = trainer(world, tmp_path / "r", ckpt=src, mode="routers", lr=1e-2, steps=2, dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.run()
    for n, p in tr.model.named_parameters():
        if "router" in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    out = tr.export()
    a, b = TensorSource(src), TensorSource(out)
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        ea, eb = a.entries[key], b.entries[key]
        with open(ea.file, "rb") as fa, open(eb.file, "rb") as fb:
            fa.seek(ea.begin)
            fb.seek(eb.begin)
            same = fa.read(ea.end - ea.begin) == fb.read(eb.end - eb.begin)
        assert same == ("router" not in key), key
        assert (ea.dtype, ea.shape) == (eb.dtype, eb.shape), key
    _, meta, _ = read_header(Path(out))
    rec = json.loads(meta["moga.train"])
    assert meta["moga.fusion"] == "mean" and rec["mode"] == "routers" and rec["steps"] == 2
    assert rec["routers_init"] == "checkpoint" and rec["base"] == src.name
    info = inspect_checkpoint(out)
    assert info.moga["fusion"] == "mean" and info.moga["num_groups"] == 4


def _output(model, sample, seed=0):
    x = torch.randn(sample.latent[None].shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, torch.tensor([400.0]), sample.texts, shot_frames=sample.shot_frames)


def test_lora_merge_equals_running_with_lora(world, tmp_path):
    tr = trainer(world, tmp_path / "l", mode="lora", lora_rank=4, lr=1e-2, steps=3, routers="random",
                 num_groups=3)
    tr.run()
    model = tr.model
    assert all(float(m.lora_up.detach().abs().max()) > 0 for m in lora_modules(model).values())
    sample = tr.data[1]
    with_lora = _output(model, sample)
    merged_path = tr.export(tmp_path / "merged.safetensors", lora_output="merged")
    separate_path = tr.export(tmp_path / "base.safetensors", lora_output="separate")
    merged = merge_lora(model)
    assert len(merged) == 2 * 10 and not lora_modules(model)
    torch.testing.assert_close(_output(model, sample), with_lora, atol=2e-5, rtol=1e-5)
    # the exported checkpoints: LoRA merged into the weights, or kept beside the unchanged base
    torch.testing.assert_close(_output(load_model(merged_path), sample), with_lora, atol=2e-5, rtol=1e-5)
    base = load_model(separate_path)
    assert not torch.allclose(_output(base, sample), with_lora, atol=1e-4)
    load_lora(base, tmp_path / "lora.safetensors", merge=True)
    torch.testing.assert_close(_output(base, sample), with_lora, atol=2e-5, rtol=1e-5)
    # the checkpoint loader reads the trainer's LoRA file as any published one (moga.checkpoint.lora)
    at_load = load_model(separate_path, loras=[(tmp_path / "lora.safetensors", 1.0)])
    torch.testing.assert_close(_output(at_load, sample), with_lora, atol=2e-5, rtol=1e-5)


def test_resume_after_a_stop_matches_an_uninterrupted_run(world, tmp_path):
    kw = dict(mode="lora", lora_rank=4, lr=3e-3, steps=4, batch=2, routers="random", num_groups=3)
    whole = trainer(world, tmp_path / "whole", **kw)
    whole.run()
    part = trainer(world, tmp_path / "part", **kw)
    part.run(stop_after=2)                   # crosses an epoch boundary of the 3 clips at step 2
    assert part.step == 2
    again = trainer(world, tmp_path / "part", **kw)  # a new process would do the same
    assert again.step == 2
    again.run()
    for n, p in whole.trainable.items():
        assert torch.equal(p, again.trainable[n]), n
        sw, sa = whole.optimizer.state[p], again.optimizer.state[again.trainable[n]]
        assert torch.equal(sw["exp_avg_sq"], sa["exp_avg_sq"]), n
    assert [h.loss for h in whole.history[2:]] == [h.loss for h in again.history]
    with pytest.raises(ValueError, match="other settings"):
        trainer(world, tmp_path / "part", **{**kw, "lora_rank": 8})


def test_data_order_and_draws_do_not_depend_on_the_split():
    # epochs are permutations; consecutive steps walk through them
    seen = batch_indices(0, 0, 3, 3) + batch_indices(0, 1, 3, 3)
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]
    assert batch_indices(0, 1, 2, 5) == (batch_indices(0, 0, 4, 5))[2:4]
    s1, n1 = draw(0, 5, 1, (2, 3), shift=5.0)
    s2, n2 = draw(0, 5, 1, (2, 3), shift=5.0)
    assert s1 == s2 and torch.equal(n1, n2) and 0 < s1 < 1
    assert not torch.equal(n1, draw(0, 5, 2, (2, 3), shift=5.0)[1])


def test_bad_settings_fail_with_a_clear_message(world, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainSettings(mode="everything")
    with pytest.raises(ValueError, match="text embeddings"):
        other = write_tiny_checkpoint(tmp_path / "o.safetensors", text_dim=48)
        trainer(world, tmp_path / "x", ckpt=other)
    with pytest.raises(ValueError, match="routers='checkpoint'"):
        trainer(world, tmp_path / "y", routers="checkpoint")


def test_command_line_trains_and_writes_a_moga_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["wan", "--model", str(world["ckpt"]), "--data", str(world["shards"]), "--out", str(out),
               "--mode", "routers", "--steps", "2", "--dtype", "float32", "--groups", "3", "--quiet"])
    assert rc == 0
    info = inspect_checkpoint(out / "moga.safetensors")
    assert info.moga["num_groups"] == 3 and info.moga["fusion"] == "mean" and info.layout == "comfyui"
    rec = json.loads(info.metadata["moga.train"])
    assert rec["routers_init"] == "calibrate" and rec["steps"] == 2
    assert "trained:    routers fine-tune, 2 steps" in str(info)     # what `moga info` prints
    assert (out / "state" / "latest").is_file()
    assert main(["wan", "--model", str(world["ckpt"]), "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "no index.json" in capsys.readouterr().err


def test_routers_out_writes_the_trained_routers_with_the_base_fingerprint(world, tmp_path, capsys):
    from moga.checkpoint import compare_fingerprint, read_routers
    from moga.checkpoint.layouts import canonical_key, detect_layout
    out, dst = tmp_path / "run", tmp_path / "trained_routers.safetensors"
    rc = main(["wan", "--model", str(world["ckpt"]), "--data", str(world["shards"]), "--out", str(out),
               "--mode", "routers", "--steps", "2", "--dtype", "float32", "--groups", "3", "--quiet",
               "--routers-out", str(dst)])
    assert rc == 0 and dst.is_file()
    rs = read_routers(dst)
    trained = TensorSource(out / "moga.safetensors")
    layout = detect_layout(trained.keys())
    want = {int(c.split(".")[1]): trained.get(k) for k in trained.keys()
            if (c := canonical_key(k, layout)) and c.endswith(".self_attn.router.weight")}
    assert rs.kind == "routers" and rs.num_groups == 3 and set(rs.weights) == set(want) and want
    for i, w in want.items():
        assert torch.equal(rs.weights[i], w.float()), i
    base = TensorSource(world["ckpt"])
    by_canon = {canonical_key(k, detect_layout(base.keys())): k for k in base.keys()}
    assert compare_fingerprint(rs.fingerprint, lambda n: base.get(by_canon[n]).float())[0] == "same"
    assert rs.fingerprint["source"] == world["ckpt"].name
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", layout="comfyui", text_dim=TEXT_DIM, seed=7)
    ob = TensorSource(other)
    oc = {canonical_key(k, "comfyui"): k for k in ob.keys()}
    assert compare_fingerprint(rs.fingerprint, lambda n: ob.get(oc[n]).float())[0] == "different"
    # an existing file is refused before any training, and left as it was
    before = dst.read_bytes()
    capsys.readouterr()
    rc = main(["wan", "--model", str(world["ckpt"]), "--data", str(world["shards"]), "--out", str(tmp_path / "r2"),
               "--steps", "2", "--dtype", "float32", "--quiet", "--routers-out", str(dst)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert dst.read_bytes() == before and not (tmp_path / "r2").exists()
