"""`moga train wan` on two gloo ranks gives the same update as one process.

Data parallel (2 groups of 1, global batch 2), sequence parallel (1 group of 2 ranks: routing before the
differentiable all-to-all) and FSDP with sequence parallel, each against one process with the same
global batch. Full fine-tuning is the strictest case: every weight's gradient crosses the exchange.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from moga.parallel.group import run_on_ranks
from moga.testing import write_tiny_checkpoint
from moga.train import data as D
from moga.train.wan import TrainSettings, WanTrainer
from test_train_wan import SETTINGS, TEXT_DIM, HashTextEncoder, PoolingVAE, make_clips

pytestmark = pytest.mark.slow  # two spawned ranks: ~15-30 s on 2 cores

CONFIGS = [
    ("data parallel", dict(mode="full", steps=2, batch=2, lr=1e-3)),
    ("sequence parallel", dict(mode="full", steps=2, batch=1, lr=1e-3, sp=2)),
    ("fsdp + sequence parallel", dict(mode="lora", lora_rank=4, steps=2, batch=1, lr=1e-2, sp=2, fsdp=True)),
]


def _train(ckpt, shards, out, **kw):
    shutil.rmtree(out, ignore_errors=True)
    tr = WanTrainer.from_checkpoint(ckpt, D.ShardDataset(shards), TrainSettings(dtype="float32", save_every=0, **kw),
                                    out, device="cpu", progress=False, log=None)
    tr.run()
    weights, _ = tr._full_state()      # full tensors on rank 0 (FSDP: empty elsewhere)
    return {k: v.numpy().copy() for k, v in weights.items()}, [h.loss for h in tr.history]


def _fsdp_resume(ckpt, shards, out):
    """FSDP + SP: stop after one step, resume in a new trainer, finish; export the checkpoint."""
    kw = dict(CONFIGS[2][1], dtype="float32", save_every=0)
    make = lambda: WanTrainer.from_checkpoint(ckpt, D.ShardDataset(shards), TrainSettings(**kw), out,  # noqa: E731
                                              device="cpu", progress=False, log=None)
    make().run(stop_after=1)
    tr = make()
    resumed_at = tr.step
    tr.run()
    weights, _ = tr._full_state()
    path = tr.export()
    return resumed_at, {k: v.numpy().copy() for k, v in weights.items()}, None if path is None else str(path)


def _rank(exchange, ckpt, shards, root):
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = [_train(ckpt, shards, f"{root}/{i}-rank{rank}", **kw) for i, (_, kw) in enumerate(CONFIGS)]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(f"{root}/resume", ignore_errors=True)
    dist.barrier()
    return out, _fsdp_resume(ckpt, shards, f"{root}/resume")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_wan_dist")
    shards = root / "shards"
    D.prepare(make_clips(root / "clips"), shards, PoolingVAE(), HashTextEncoder(), SETTINGS, progress=False, log=None)
    ckpt = str(write_tiny_checkpoint(root / "tiny.safetensors", num_groups=4, text_dim=TEXT_DIM))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [_train(ckpt, shards, root / f"single-{i}", **{k: v for k, v in kw.items() if k not in ("sp", "fsdp")})
                  for i, (_, kw) in enumerate(CONFIGS)]
    finally:
        torch.set_num_threads(threads)
    ranks = run_on_ranks(_rank, 2, args=(ckpt, str(shards), str(root / "dist")), timeout=300)
    return single, ranks


@pytest.mark.parametrize("which", range(len(CONFIGS)), ids=[c[0] for c in CONFIGS])
def test_two_ranks_match_one_process(runs, which):
    single, ranks = runs
    (w1, loss1), (w2, loss2) = single[which], ranks[0][0][which]
    assert set(w1) == set(w2) and w1
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=5e-6, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    if not CONFIGS[which][1].get("fsdp"):   # both ranks hold the same weights
        other, _ = ranks[1][0][which]
        for k in w1:
            np.testing.assert_array_equal(other[k], w2[k], err_msg=k)


def test_fsdp_run_resumes_exactly_and_exports(runs):
    from moga.checkpoint import inspect_checkpoint
    _, ranks = runs
    resumed_at, weights, path = ranks[0][1]
    whole, _ = ranks[0][0][2]
    assert resumed_at == 1 and ranks[1][1][2] is None       # rank 0 writes the checkpoint
    for k in whole:
        np.testing.assert_array_equal(weights[k], whole[k], err_msg=k)
    info = inspect_checkpoint(path)
    assert info.moga["fusion"] == "mean" and '"fsdp":true' in info.metadata["moga.train"]


def _rank_bf16(exchange, ckpt, shards, root):
    """Full fine-tune and LoRA (bf16 frozen weights beside float32 trained ones in one FSDP unit) in
    bfloat16 with sequence parallel, without and with FSDP: {mode: [(losses, grad norms) plain, fsdp]}."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = {}
    for mode in ("full", "lora"):
        kw = dict(mode=mode, lora_rank=4, steps=2, batch=1, lr=1e-3, sp=2, dtype="bfloat16", save_every=0)
        for fsdp in (False, True):
            tr = WanTrainer.from_checkpoint(ckpt, D.ShardDataset(shards), TrainSettings(**kw, fsdp=fsdp),
                                            f"{root}/bf16-{mode}-{fsdp}-rank{rank}", device="cpu", progress=False,
                                            log=None)
            tr.run()
            out.setdefault(mode, []).append(([h.loss for h in tr.history], [h.grad_norm for h in tr.history]))
    return out


def test_fsdp_in_bfloat16_computes_what_the_unsharded_run_does(tmp_path):
    """FSDP must not round the float32 parts of the model (residual stream, modulation, norms, embeddings,
    head) to bfloat16: it used to cast every weight and a block's float32 inputs, which moved the loss ~1%."""
    shards = tmp_path / "shards"
    D.prepare(make_clips(tmp_path / "clips"), shards, PoolingVAE(), HashTextEncoder(), SETTINGS, progress=False,
              log=None)
    ckpt = str(write_tiny_checkpoint(tmp_path / "tiny.safetensors", num_groups=4, text_dim=TEXT_DIM))
    ranks = run_on_ranks(_rank_bf16, 2, args=(ckpt, str(shards), str(tmp_path / "dist")), timeout=300)
    for mode in ("full", "lora"):
        (plain_loss, plain_norm), (fsdp_loss, fsdp_norm) = ranks[0][mode]
        assert len(plain_loss) == 2 and all(np.isfinite(plain_loss + plain_norm)), mode
        # step 1 computes on the same weights: the same loss (the old cast moved it by 0.7%) and gradient norm
        np.testing.assert_allclose(fsdp_loss[0], plain_loss[0], rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(fsdp_norm[0], plain_norm[0], rtol=1e-4, err_msg=mode)
        # after one AdamW step (lr 1e-3): AdamW moves every weight by ~lr whatever its gradient's size, so the
        # last bits of near-zero bfloat16 gradients, which differ under FSDP, reach the loss at ~1e-4; the old
        # cast gave 5e-3
        np.testing.assert_allclose(fsdp_loss[1], plain_loss[1], rtol=1e-3, err_msg=mode)
