"""benchmarks/train.py: one process, and 2 gloo ranks under torchrun (sequence parallel over the
ranks, the library's `moga train wan --sp 2` path): the JSON names the world, every mode has finite
step times, and the sequence-parallel losses equal the one-process ones (the same seeded clip,
timesteps and noise, the same update)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "train.py"
MODES = ("routers", "lora", "full")


def _bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import train
    finally:
        sys.path.remove(str(BENCH.parent))
    return train


def _check_rows(result, modes):
    assert [r["mode"] for r in result["rows"]] == list(modes)
    for r in result["rows"]:
        assert "error" not in r, r
        assert r["times"] and all(math.isfinite(t) and t > 0 for t in r["times"]), r
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0
        assert r["trained_params"] > 0 and all(math.isfinite(x) for x in r["loss"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_torch_thread):
    path = tmp_path_factory.mktemp("train_bench") / "one.json"
    assert _bench().main(["--smoke", "--modes", ",".join(MODES), "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_one_process_smoke(one_process):
    assert one_process["world_size"] == 1 and one_process["sp"] == 1
    assert one_process["env"]["world_size"] == 1
    _check_rows(one_process, MODES)


def test_full_fsdp_needs_torchrun(capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--smoke", "--modes", "routers,full-fsdp"])
    assert "torchrun" in capsys.readouterr().err


def test_out_of_memory_is_a_row_and_ranks_combine(monkeypatch):
    import torch
    train = _bench()

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")
    monkeypatch.setattr(train, "measure", oom)
    row = train.run_mode("full", None, type("C", (), {"tokens": 7})(), torch.device("cpu"), 1, "", 4, 2)
    assert row == dict(mode="full", tokens=7, error="out of memory: CUDA out of memory. Tried to allocate 20.00 GiB")
    ok = dict(mode="full", tokens=100, times=[2.0, 3.0, 1.0], s_per_step=2.0, warmup_s=5.0, setup_s=1.0,
              tokens_per_s=50.0, peak_gib=10.0, peak_reserved_gib=12.0, start_gib=0.0)
    other = dict(ok, times=[2.5, 1.0, 1.5], warmup_s=6.0, setup_s=0.5, peak_gib=11.0, peak_reserved_gib=11.5)
    both = train.combine([ok, other])
    assert both["times"] == [2.5, 3.0, 1.5] and both["s_per_step"] == 2.5 and both["tokens_per_s"] == 40.0
    assert both["peak_gib"] == 11.0 and both["peak_gib_per_rank"] == [10.0, 11.0] and both["peak_reserved_gib"] == 12.0
    assert (both["warmup_s"], both["setup_s"], both["tokens_per_s_per_gpu"]) == (6.0, 1.0, 20.0)
    assert train.combine([ok, row]) == dict(mode="full", tokens=7, error="rank 1: " + row["error"])


@pytest.mark.slow   # 3 fresh interpreters and 4 modes: ~15-30 s on 2 cores
def test_torchrun_two_ranks_sequence_parallel(one_process, tmp_path):
    out = tmp_path / "sp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(BENCH),
           "--smoke", "--modes", ",".join(MODES + ("full-fsdp",)), "--timeout", "60", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, "only rank 0 reports"
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["sp"] == 2
    assert result["env"]["world_size"] == 2 and result["env"]["process_group"] == "gloo"
    _check_rows(result, MODES + ("full-fsdp",))
    for r in result["rows"]:
        assert r["sp"] == 2 and r["fsdp"] == (r["mode"] == "full-fsdp")
        assert len(r["times_per_rank"]) == 2
        assert r["times"] == [max(a, b) for a, b in zip(*r["times_per_rank"])]
    # the same update as one process: sequence parallelism changes where the tokens are, not the loss
    single = {r["mode"]: r for r in one_process["rows"]}
    for r in result["rows"][:len(MODES)]:
        assert r["trained_params"] == single[r["mode"]]["trained_params"]
        assert r["loss"] == pytest.approx(single[r["mode"]]["loss"], rel=1e-3), r["mode"]
