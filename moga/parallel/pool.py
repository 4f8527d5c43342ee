"""Persistent sequence-parallel workers for a long-lived host process (ComfyUI).

    pool = WorkerPool(["cuda:0", "cuda:1"], "wan-moga.safetensors", {"dtype": "bfloat16"})
    latent = pool.run(job, on_progress=lambda step, total, latent: ..., cancel=lambda: False)
    pool.close()

One child process per device (`python -m moga.parallel.worker`, see there why not multiprocessing),
talking to the host over two private pipes. Each joins a torch.distributed group (NCCL on CUDA, gloo
on the CPU) through a TCPStore that the host serves on a free loopback port, loads the checkpoint
itself (memory-mapped: one model, a Wan2.2 A14B expert pair, their LoRAs; `pool_model.py`), then
waits for jobs. A job holds the keyword arguments of `moga.sampling.sample` (embeddings, shot frames,
latent size, steps, cfg or (cfg_high, cfg_low), shift, solver, seed, MoGA settings, an image
condition...; `wire.py` carries them); every rank runs the whole sampler on the full latent with the
Ulysses exchange (each keeps its share of the tokens, image channels included, inside the model), and
rank 0 sends one event before each step (its expert), one after it, and the final latent.

Cancel: the host sends every rank a cancel message; before every model call each rank reads its
pipe without blocking and the ranks all-reduce (max) what they read, so they all stop at the same
step (a skipped collective would hang the others). POSIX only (pipes passed by descriptor; NCCL is
Linux-only anyway). Failure: the host polls the workers' liveness while it waits, so a crashed or killed
worker is an error within a second or so; any worker error closes the pool and the next job starts
a fresh one. Every wait has a timeout. Workers exit by themselves when the host process dies.

One device needs no pool: run `moga.sampling.sample` in the calling process (WorkerPool refuses).
`get_pool(devices, checkpoint, settings)` keeps one pool per process: reused while the devices,
checkpoint file and settings stay the same, replaced when they change.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import torch

from .group import NVLS_OFF, HostStore, WorkerError
from .pool_model import (canonical_settings, check_fits, extras_module, model_config, pool_key,  # noqa: F401
                         settings_of, split_pair)
from .wire import check_job, pack, unpack

_POLL = 0.25  # seconds between liveness checks while waiting


# ---- the host side ---------------------------------------------------------------------------
class _Worker:
    """A worker process and the host's ends of its two pipes."""

    def __init__(self, rank: int, device: str, env: dict):
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moga.parallel.worker", str(os.getpid()), str(to_child_r),
                 str(from_child_w)], pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.rank, self.device = rank, device
        self.inbox = Connection(to_child_w, readable=False)      # host -> worker
        self.outbox = Connection(from_child_r, writable=False)   # worker -> host
        self.eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None and not self.eof

    def send(self, msg) -> None:
        try:
            self.inbox.send(msg)
        except (OSError, ValueError):
            pass  # a dead worker: the liveness check reports it

    def close(self) -> None:
        for c in (self.inbox, self.outbox):
            try:
                c.close()
            except OSError:
                pass


class WorkerPool:
    """Persistent per-device workers running `moga.sampling.sample` with sequence parallelism.

    devices: two or more device strings ("cuda:0", "cuda:1"; "cpu" repeated for CPU/gloo tests).
    checkpoint: a safetensors path every worker loads itself (memory-mapped); a Wan2.2 A14B pair:
        the high-noise expert (or one folder holding both experts).
    settings: model-load options (`pool_model.SETTINGS`): {"dtype": "bfloat16" | None, "threads": CPU
        threads per worker, "loras": [(file, strength), ...] merged into every worker's weights,
        "low_noise": the low-noise expert's file, "loras_low", "boundary", "offload_expert"}.
        `pool_model.settings_of(model)` gives both for a model loaded in the host.
    start_timeout: seconds for all workers to start and load the model.
    stall_timeout: seconds without any event from the workers during a job (a step, or the first
        step with its warm-up, must finish within it).
    """

    def __init__(self, devices, checkpoint, settings=None, *, start_timeout: float = 600.0,
                 stall_timeout: float = 1800.0):
        if os.name != "posix":
            raise ValueError("WorkerPool needs a POSIX system (Linux): on this system run one GPU in-process")
        devices = [str(torch.device(d)) for d in devices]
        if len(devices) < 2:
            raise ValueError(f"a WorkerPool needs two or more devices, got {devices}: with one device "
                             f"run moga.sampling.sample in this process (no pool, no copies)")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) != 1:
            raise ValueError(f"all pool devices must be of one kind (all CUDA or all CPU), got {devices}")
        cuda = [d for d in devices if d.startswith("cuda")]
        if len(set(cuda)) != len(cuda):
            raise ValueError(f"each GPU can hold one worker, got {devices}")
        path = Path(checkpoint).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist: pass the path of a "
                             f".safetensors file (or a diffusers folder)")
        path, canonical = split_pair(path, canonical_settings(settings))
        self.devices = devices
        self.checkpoint = str(path)
        self.settings = canonical
        self.extras_from = extras_module(path)
        self.config = model_config(path, canonical)   # from the headers: jobs are checked against it
        self.pair = canonical["low_noise"] is not None
        self.start_timeout = float(start_timeout)
        self.stall_timeout = float(stall_timeout)
        self.key = pool_key(devices, path, self.settings)
        self.starts = 0  # how many times workers were (re)started: tests and logs read it
        self._workers: list[_Worker] = []
        self._lock = threading.RLock()
        self._job_id = 0
        self._store = None
        self._last_event = time.monotonic()
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.is_alive() for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def matches(self, devices, checkpoint, settings=None) -> bool:
        try:
            path, canonical = split_pair(Path(checkpoint).expanduser().resolve(), canonical_settings(settings))
            return self.key == pool_key([str(torch.device(d)) for d in devices], path, canonical)
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        """Start the workers (if not running) and wait until every one has loaded the model."""
        with self._lock:
            if self.alive:
                return
            self._shutdown()
            self._store = HostStore(self.start_timeout)
            env = dict(NVLS_OFF, **os.environ)  # multicast off unless the user says otherwise
            root = str(Path(__file__).resolve().parents[2])  # the folder holding the moga package
            env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
            self.starts += 1
            try:
                for r, dev in enumerate(self.devices):
                    w = _Worker(r, dev, env)
                    self._workers.append(w)
                    w.send(dict(rank=r, world_size=self.world_size, device=dev, port=self._store.port,
                                checkpoint=self.checkpoint, settings=self.settings, extras_from=self.extras_from,
                                timeout=self.start_timeout))
                ready, deadline = set(), time.monotonic() + self.start_timeout
                self._last_event = time.monotonic()
                while len(ready) < self.world_size:
                    msg = self._next_event(deadline, "start and load the checkpoint")
                    if msg[0] == "ready":
                        ready.add(msg[1])
                    elif msg[0] in ("fatal", "invalid", "error"):
                        self._raise_worker_failure(msg, "while starting")
            except BaseException:
                self._shutdown()
                raise

    def close(self) -> None:
        """Stop the workers (politely, then by force) and free their devices."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            w.send(None)
        deadline = time.monotonic() + 5
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=10)
            w.close()
        self._store = None

    # -- jobs ----------------------------------------------------------------------------------
    def run(self, job: dict, on_progress=None, cancel=None, timeout: float | None = None,
            preview: bool = False, on_step=None) -> torch.Tensor:
        """Run one sampling job on all workers; returns the latent [1, C, F, H, W] (float32, CPU).

        job: `moga.sampling.sample` keyword arguments; checked here against the pool's model (an image
            condition of its kind and the latent's shape, (cfg_high, cfg_low) only for a pair).
        on_progress(step, total, latent_or_None): called in this thread after every step (the latent
            only with preview=True). If it raises, the workers are cancelled and the error re-raised.
        on_step(index, timestep, expert): as sample's on_step, before each step's model calls (expert:
            "high" / "low" for a pair, else "single"), from rank 0's event; a hook that raises stops
            the job as on_progress does.
        cancel(): polled while waiting; True stops every rank at its next step boundary and raises
            moga.sampling.Cancelled. timeout: seconds for the whole job (None: no limit, but the
            stall timeout still applies). Raises WorkerError if a worker fails or dies, ValueError
            for a request the workers reject.
        """
        from moga.sampling import Cancelled

        check_job(job)
        check_fits(job, self.config, self.pair)
        with self._lock:
            self.start()  # no-op when running; a fresh pool after a failure
            self._job_id += 1
            job_id, packed = self._job_id, pack(job)
            for w in self._workers:
                w.send((job_id, packed, bool(preview)))
            deadline = time.monotonic() + timeout if timeout else None
            self._last_event = time.monotonic()
            cancelling = False
            try:
                while True:
                    if not cancelling and cancel is not None and cancel():
                        self._send_cancel(job_id)
                        cancelling = True
                    msg = self._next_event(deadline, "finish the job", poll_only=True)
                    if msg is None:
                        continue
                    kind = msg[0]
                    if kind in ("error", "invalid", "fatal"):
                        self._raise_worker_failure(msg, "during a job")
                    if msg[1] != job_id:
                        continue  # a late event of an earlier job
                    if kind == "progress":
                        if on_progress is not None:
                            _, _, step, total, latent = msg
                            on_progress(step, total, unpack(latent) if latent is not None else None)
                    elif kind == "step":
                        if on_step is not None:
                            _, _, index, timestep, expert = msg
                            on_step(index, timestep, expert)
                    elif kind == "done":
                        return unpack(msg[2])
                    elif kind == "cancelled":
                        raise Cancelled("sampling cancelled: every worker stopped at the same step")
            except Cancelled:
                raise
            except BaseException:
                # our caller failed (a progress hook raised, KeyboardInterrupt...): stop the workers
                # at their next step so they stay in step for the next job, or else end them
                if self.alive:
                    self._drain_after_cancel(job_id)
                raise

    def _send_cancel(self, job_id: int) -> None:
        for w in self._workers:
            w.send(("cancel", job_id))

    def _drain_after_cancel(self, job_id: int) -> None:
        self._send_cancel(job_id)
        deadline = time.monotonic() + min(self.stall_timeout, 120.0)
        try:
            while True:
                msg = self._next_event(deadline, "stop after a cancel", poll_only=True)
                if msg is not None and msg[0] in ("done", "cancelled") and msg[1] == job_id:
                    return
                if msg is not None and msg[0] in ("error", "invalid", "fatal"):
                    break
        except (WorkerError, TimeoutError):
            pass
        self._shutdown()

    # -- waiting -------------------------------------------------------------------------------
    def _next_event(self, deadline, what: str, poll_only: bool = False):
        """The next worker event. Raises WorkerError at once if a worker died, TimeoutError past
        `deadline` or after stall_timeout without any event. poll_only: None after one poll."""
        from multiprocessing.connection import wait

        while True:
            by_conn = {w.outbox: w for w in self._workers if not w.eof}
            for conn in wait(list(by_conn), timeout=_POLL):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    by_conn[conn].eof = True  # its process is ending: reported below
                    continue
                self._last_event = time.monotonic()
                return msg
            dead = [w for w in self._workers if not w.is_alive()]
            if dead:
                self._raise_dead(dead[0], f"while the workers were to {what}")
            now = time.monotonic()
            if deadline is not None and now > deadline:
                self._shutdown()
                raise TimeoutError(f"the workers did not {what} within the time limit; pool shut down")
            if now - self._last_event > self.stall_timeout:
                self._shutdown()
                raise TimeoutError(f"no word from the workers for {self.stall_timeout:.0f} s while they "
                                   f"were to {what}; pool shut down")
            if poll_only:
                return None

    def _own_report(self, w: _Worker):
        """The last error report `w` itself sent before it died (None: it left none)."""
        report = None
        try:
            while not w.eof and w.outbox.poll(0.2):
                try:
                    msg = w.outbox.recv()
                except (EOFError, OSError):
                    w.eof = True
                    break
                if msg[0] in ("error", "invalid", "fatal") and msg[1] == w.rank:
                    report = msg[2]
        except (OSError, ValueError):
            pass
        return report

    def _raise_dead(self, w: _Worker, during: str, consequence: str = ""):
        """WorkerError naming the dead worker, with its own last report (never another worker's)."""
        try:
            code = w.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        report = self._own_report(w)
        self._shutdown()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by signal {name}"
        else:
            how = f"died with exit code {code}"
        if report:
            detail = f"; its last report:\n{report}"
        elif code == -signal.SIGKILL:
            detail = "; it left no report (SIGKILL, e.g. from the system's out-of-memory killer, leaves none)"
        else:
            detail = "; it left no report"
        raise WorkerError(f"worker rank {w.rank} on {w.device} (pid {w.pid}) {how} {during}; the pool was shut "
                          f"down and the next job starts a fresh one{detail}{consequence}")

    def _raise_worker_failure(self, msg, when: str):
        kind, rank, tb = msg
        last = tb.strip().splitlines()[-1] if tb.strip() else ""
        # a worker that lost its peer fails in the collective: blame the peer that was already dead
        dead = [w for w in self._workers if w.rank != rank and w.proc.poll() is not None]
        if dead and kind != "invalid":
            self._raise_dead(dead[0], when, consequence=f"\n(worker rank {rank} then failed in a collective "
                                                         f"without its peer: {last})")
        self._shutdown()
        if kind == "invalid":  # a bad request or setting: the worker's ValueError, as a ValueError
            raise ValueError(f"{last.removeprefix('ValueError: ')} (worker rank {rank}, {when})")
        raise WorkerError(f"worker rank {rank} on {self.devices[rank]} failed {when}; the pool was "
                          f"shut down and the next job starts a fresh one:\n{tb}")


# ---- one pool per process (what ComfyUI nodes use) ---------------------------------------------
_current: WorkerPool | None = None
_current_lock = threading.Lock()


def get_pool(devices, checkpoint, settings=None, **kwargs) -> WorkerPool:
    """The process's pool for these devices, checkpoint and settings: the running one when they
    match, else a new one (the old one is closed first, freeing its GPUs). Workers start lazily, on
    the first job (or `pool.start()`)."""
    global _current
    with _current_lock:
        if _current is not None and _current.matches(devices, checkpoint, settings):
            return _current
        release_pool()
        _current = WorkerPool(devices, checkpoint, settings, **kwargs)
        return _current


def release_pool() -> None:
    """Close the process's pool (a model unload): workers exit and free their devices."""
    global _current
    pool, _current = _current, None
    if pool is not None:
        pool.close()
