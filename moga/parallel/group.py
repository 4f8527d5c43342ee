"""Process-group plumbing shared by the worker pool, the tests and the benchmark.

- `HostStore`: a TCPStore served by the host process on a free loopback port (port 0, so no race for
  a port); spawned ranks rendezvous through it.
- `init_rank(...)`: one rank joins: NCCL when its device is CUDA, gloo otherwise, with a timeout.
- `watch_parent(pid)`: a rank exits by itself when the process that spawned it dies.
- `run_on_ranks(fn, world_size, ...)`: spawn P fresh ranks, call `fn(exchange, *args)` on each, return
  their results (rank order). Every wait has a timeout; a dead rank is an error within a second.
"""
from __future__ import annotations

import datetime
import os
import queue
import threading
import time
import traceback

import torch
import torch.distributed as dist

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerError(RuntimeError):
    """A rank failed or died; the message says which rank and why."""


class HostStore:
    """A torch.distributed TCPStore server in this process, on a free 127.0.0.1 port."""

    def __init__(self, timeout: float = 60.0):
        self.store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True,
                                   timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
        self.port = self.store.port


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_rank(rank: int, world_size: int, device: str, port: int, timeout: float = 60.0,
              prefix: str = "moga"):
    """Join the group rendezvousing at the host's store; returns the UlyssesExchange of the group."""
    from .ulysses import UlyssesExchange

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    kwargs = dict(backend=backend_for(dev), store=dist.PrefixStore(prefix, store), rank=rank,
                  world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # NCCL binds eagerly: the first collective does not hang on setup
    dist.init_process_group(**kwargs)
    return UlyssesExchange()


def watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """A daemon thread that ends this process (hard) once its parent is gone."""

    def loop():
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=loop, name="moga-parent-watch", daemon=True).start()


def spawn_env() -> None:
    """Environment every rank inherits: NVLink multicast stays off (see the device notes)."""
    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)


def _rank_main(rank, world_size, device, port, timeout, parent_pid, fn, args, results):
    watch_parent(parent_pid)
    try:
        if torch.device(device).type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
        exchange = init_rank(rank, world_size, device, port, timeout)
        out = fn(exchange, *args)
        results.put((rank, "ok", out))
        dist.barrier()  # nobody tears the group down while another rank still talks to it
        dist.destroy_process_group()
    except BaseException:  # report everything, including KeyboardInterrupt, then die
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def run_on_ranks(fn, world_size: int, args: tuple = (), devices=None, timeout: float = 120.0):
    """Run `fn(exchange, *args)` on `world_size` freshly spawned ranks; return the results by rank.

    `fn` must be importable (a module-level function) and its result picklable. `devices`: one device
    string per rank (default: all "cpu", gloo).
    """
    import multiprocessing as mp

    devices = list(devices or ["cpu"] * world_size)
    if len(devices) != world_size:
        raise ValueError(f"{world_size} ranks need {world_size} devices, got {devices}")
    spawn_env()
    ctx = mp.get_context("spawn")
    host = HostStore(timeout)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(r, world_size, devices[r], host.port, timeout, os.getpid(), fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                if dead:
                    raise WorkerError(f"rank {dead[0]} of {world_size} died "
                                      f"(exit code {procs[dead[0]].exitcode}) before reporting")
                if time.monotonic() > deadline:
                    raise WorkerError(f"ranks {sorted(set(range(world_size)) - set(out))} did not "
                                      f"finish within {timeout:.0f} s")
                continue
            if status == "error":
                raise WorkerError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(world_size)]
