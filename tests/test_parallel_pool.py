"""WorkerPool on CPU workers (gloo): reuse, cancel, a killed worker, and bad requests.

One pool serves the whole module (starting workers costs seconds); the kill test runs last and
checks that the next job starts a fresh pool.
"""
import os
import signal
import threading
import time

import pytest
import torch

pytest.importorskip("moga.checkpoint", reason="moga.checkpoint (load_model) not available yet")

from moga.parallel import WorkerError, WorkerPool  # noqa: E402
from moga.parallel.pool import get_pool, release_pool  # noqa: E402
from moga.sampling import Cancelled, sample  # noqa: E402

DEVICES = ["cpu", "cpu"]
SHOTS, SIZE = (2, 3), (5, 8, 10)  # 100 tokens


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from moga.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pool") / "tiny.safetensors", num_groups=3, seed=5)


@pytest.fixture(scope="module")
def embeddings(checkpoint):
    from moga.checkpoint import load_model
    model = load_model(checkpoint)
    g = torch.Generator().manual_seed(3)
    pos = [torch.randn(1, 6, model.config.text_dim, generator=g) for _ in SHOTS]
    neg = torch.randn(1, 4, model.config.text_dim, generator=g)
    return model, pos, neg


def _job(embeddings, steps, seed=9):
    _, pos, neg = embeddings
    return dict(positive=pos, negative=neg, shot_frames=SHOTS, latent_size=SIZE, steps=steps, cfg=3.0,
                shift=5.0, solver="unipc", seed=seed)


@pytest.fixture(scope="module")
def pool(checkpoint):
    p = WorkerPool(DEVICES, checkpoint, {"threads": 1}, start_timeout=60, stall_timeout=30)
    yield p
    p.close()


def test_two_jobs_reuse_workers_and_match_one_process(pool, embeddings):
    model = embeddings[0]
    steps = []
    first = pool.run(_job(embeddings, 3), on_progress=lambda s, n, lat: steps.append((s, n, lat)),
                     timeout=60)
    pids = pool.pids
    second = pool.run(_job(embeddings, 3, seed=10), timeout=60, preview=False)
    assert pool.pids == pids and pool.starts == 1, "the second job must reuse the running workers"
    assert [(s, n) for s, n, _ in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(lat is None for _, _, lat in steps)
    ref1 = sample(model, **_job(embeddings, 3))
    ref2 = sample(model, **_job(embeddings, 3, seed=10))
    assert first.shape == ref1.shape == (1, 16) + SIZE
    assert _rel(first, ref1) < 1e-5 and _rel(second, ref2) < 1e-5
    assert _rel(first, second) > 1e-2  # different seeds really differ


def test_preview_latents_come_back(pool, embeddings):
    seen = []
    out = pool.run(_job(embeddings, 2), on_progress=lambda s, n, lat: seen.append(lat), preview=True,
                   timeout=60)
    assert len(seen) == 2 and all(lat.shape == out.shape for lat in seen)
    assert torch.equal(seen[-1], out)  # the last step's latent is the result


def test_cancel_stops_every_rank_and_the_pool_stays_usable(pool, embeddings):
    flag = threading.Event()
    steps = []

    def progress(s, n, lat):
        steps.append(s)
        if s == 2:
            flag.set()

    # the timeout only guards against a hang; the assertion is on steps: the cancel, raised after
    # step 2's event, reaches the workers before their next model call, so step 3 (already under
    # way) may still finish but step 4 never starts
    with pytest.raises(Cancelled):
        pool.run(_job(embeddings, 60), on_progress=progress, cancel=flag.is_set, timeout=300)
    assert steps[:2] == [1, 2] and steps[-1] <= 3, steps
    pids = pool.pids
    out = pool.run(_job(embeddings, 2), timeout=60)
    assert pool.pids == pids, "a cancel must not restart the workers"
    assert _rel(out, sample(embeddings[0], **_job(embeddings, 2))) < 1e-5


def test_progress_hook_error_cancels_workers_and_reraises(pool, embeddings):
    def boom(s, n, lat):
        raise KeyboardInterrupt  # what an interrupted host's progress hook may raise

    with pytest.raises(KeyboardInterrupt):
        pool.run(_job(embeddings, 60), on_progress=boom, timeout=120)
    pids = pool.pids
    pool.run(_job(embeddings, 1), timeout=60)
    assert pool.pids == pids


def test_killed_worker_is_an_error_naming_it_then_a_fresh_pool(pool, embeddings):
    starts, old = pool.starts, pool.pids
    steps = []

    def kill_rank1(s, n, lat):
        steps.append(s)
        if s == 1:
            os.kill(old[1], signal.SIGKILL)

    # the timeout only guards against a hang: the error must come before rank 0 finishes another
    # step without its peer (it cannot: every layer exchanges tokens with rank 1)
    with pytest.raises(WorkerError) as err:
        pool.run(_job(embeddings, 60), on_progress=kill_rank1, timeout=300)
    assert steps[-1] <= 2, steps
    msg = str(err.value)
    assert msg.startswith(f"worker rank 1 on cpu (pid {old[1]}) was killed by signal SIGKILL"), msg
    assert "it left no report" in msg
    assert "Traceback" not in msg, "the survivor's traceback is not the dead worker's report"
    assert not pool.alive
    out = pool.run(_job(embeddings, 2), timeout=60)
    assert pool.starts == starts + 1 and set(pool.pids).isdisjoint(old)
    assert _rel(out, sample(embeddings[0], **_job(embeddings, 2))) < 1e-5
    pids = pool.pids
    pool.close()
    for pid in pids:  # close() really ends the processes
        with pytest.raises(ProcessLookupError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)


def test_bad_requests_fail_in_the_host(checkpoint, embeddings, tmp_path):
    with pytest.raises(ValueError, match="one device"):
        WorkerPool(["cpu"], checkpoint)
    with pytest.raises(ValueError, match="does not exist"):
        WorkerPool(DEVICES, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown worker settings"):
        WorkerPool(DEVICES, checkpoint, {"num_groups": 3})
    p = WorkerPool(DEVICES, checkpoint)
    with pytest.raises(ValueError, match="not sample"):
        p.run(dict(_job(embeddings, 2), device="cuda"))
    with pytest.raises(ValueError, match="sum to the latent frame count"):
        p.run(dict(_job(embeddings, 2), shot_frames=(2, 2)))
    assert p.starts == 0, "bad jobs must be refused before any worker starts"


def test_get_pool_reuses_and_replaces(checkpoint):
    a = get_pool(DEVICES, checkpoint, {"dtype": "float32"})
    assert get_pool(DEVICES, str(checkpoint), {"dtype": torch.float32}) is a
    b = get_pool(DEVICES, checkpoint, {"dtype": "bfloat16"})
    assert b is not a and not a.alive
    release_pool()
    assert get_pool(DEVICES, checkpoint, {"dtype": "bfloat16"}) is not b
    release_pool()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait a moment for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_host_dies(checkpoint):
    import subprocess
    import sys
    from pathlib import Path

    host = ("import os, sys\n"
            "from moga.parallel import WorkerPool\n"
            "pool = WorkerPool(['cpu', 'cpu'], sys.argv[1], {'threads': 1}, start_timeout=60)\n"
            "pool.start()\n"
            "print(*pool.pids, flush=True)\n"
            "os._exit(1)  # a crash: no close(), no atexit\n")
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", host, str(checkpoint)], capture_output=True, text=True,
                         timeout=90, env=dict(os.environ, PYTHONPATH=root))
    pids = [int(p) for p in res.stdout.split()]
    assert len(pids) == 2, res.stdout + res.stderr
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in pids), "orphaned workers must exit by themselves"


def test_model_with_own_encoders_the_workers_import_what_the_host_registered(checkpoint, tmp_path):
    """moga.parallel names no module above it: the host tells the workers which module registered the
    loader of a file's own encoders (the demo model's), and a fresh worker process imports it by name."""
    import subprocess
    import sys
    from pathlib import Path

    from moga.checkpoint import EXTRA_LOADERS, save_checkpoint
    from moga.checkpoint import load_model as load
    from moga.parallel.pool import extras_module

    # a plain file that asks for unregistered extras is refused in the host, before any worker starts
    odd = save_checkpoint(load(checkpoint), tmp_path / "odd.safetensors", {"moga.extras": "nobody-registered"})
    with pytest.raises(ValueError, match="no loader is registered"):
        WorkerPool(DEVICES, odd)
    assert extras_module(checkpoint) is None

    import moga.demo  # the entry point's part (CLI, nodes): bring the demo, which registers its loader
    assert extras_module(moga.demo.DEMO_PATH) == EXTRA_LOADERS["demo"].__module__ == "moga.demo.model"
    worker = ("import sys\n"
              "from moga.parallel.pool_model import load\n"
              "assert 'moga.demo' not in sys.modules\n"
              "m = load(sys.argv[1], 'cpu', {'dtype': None}, sys.argv[2] or None)\n"
              "print(type(m.text_encoder).__name__, type(m.vae).__name__)\n")
    root = str(Path(__file__).resolve().parents[1])
    run = lambda module: subprocess.run([sys.executable, "-c", worker, str(moga.demo.DEMO_PATH), module],  # noqa: E731
                                        capture_output=True, text=True, timeout=120,
                                        env=dict(os.environ, PYTHONPATH=root))
    ok = run("moga.demo.model")
    assert ok.returncode == 0 and ok.stdout.split() == ["DemoTextEncoder", "DemoCodec"], ok.stdout + ok.stderr
    bare = run("")
    assert bare.returncode != 0 and "no loader is registered" in bare.stderr


def test_a_dead_workers_report_is_its_own(checkpoint):
    from multiprocessing import Pipe

    from moga.parallel.pool import _Worker

    host_end, worker_end = Pipe(duplex=False)
    w = object.__new__(_Worker)
    w.rank, w.device, w.outbox, w.eof = 1, "cpu", host_end, False
    worker_end.send(("progress", 1, 1, 3, None))
    worker_end.send(("error", 1, "Traceback ...\nRuntimeError: rank 1's own failure"))
    worker_end.send(("error", 0, "not rank 1's"))  # (never on its pipe, but never taken if it were)
    worker_end.close()
    p = WorkerPool(DEVICES, checkpoint)
    assert p._own_report(w).endswith("rank 1's own failure")
    assert w.eof
