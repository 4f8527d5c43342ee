"""One WorkerPool worker: `python -m moga.parallel.worker PARENT_PID FD_IN FD_OUT` (started by pool.py).

A plain child process, not a multiprocessing one: multiprocessing's spawn re-imports the host's
`__main__` in every child, and ComfyUI's main.py parses arguments, runs every pack's prestartup
script and sets CUDA_VISIBLE_DEVICES at import. This process imports torch and moga only.

Protocol over two inherited pipes (multiprocessing.connection framing, pickled tuples):
  host -> worker: config dict once; then (job_id, job, preview) | ("cancel", job_id) | None (exit)
  worker -> host: ("ready", rank, pid) | ("step", job_id, index, timestep, expert)       [rank 0]
                  ("progress", job_id, step, total, latent|None)                       [rank 0]
                  ("done", job_id, latent) | ("cancelled", job_id)                         [rank 0]
                  ("error" | "invalid" | "fatal", rank, traceback)                         [any rank]
"""
from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection


def _serve(cfg: dict, inbox: Connection, outbox: Connection) -> None:
    import torch

    from moga.parallel.group import init_rank
    from moga.parallel.pool_model import load
    from moga.parallel.wire import pack, unpack
    from moga.parallel.ulysses import check_heads
    from moga.sampling import Cancelled, sample

    rank, world_size, device = cfg["rank"], cfg["world_size"], cfg["device"]
    try:
        if torch.device(device).type == "cpu":
            threads = cfg["settings"].get("threads") or max(1, (os.cpu_count() or 1) // world_size)
            torch.set_num_threads(threads)
        exchange = init_rank(rank, world_size, device, cfg["port"], cfg["timeout"])
        model = load(cfg["checkpoint"], device, cfg["settings"], cfg.get("extras_from"))
        check_heads(model.config.num_heads, world_size, "GPUs" if torch.device(device).type == "cuda" else "processes")
        outbox.send(("ready", rank, os.getpid()))
    except BaseException as err:  # noqa: BLE001 - reported, then this worker ends
        outbox.send(("invalid" if isinstance(err, ValueError) else "fatal", rank, traceback.format_exc()))
        return

    while True:
        msg = inbox.recv()  # EOFError when the host is gone: the process ends
        if msg is None:
            break
        if msg[0] == "cancel":
            continue  # a cancel that arrived after its job ended
        job_id, job, preview = msg
        asked = [False]

        def cancel():
            # read the host's cancel without blocking, then agree: every rank calls this at the same
            # points, and all stop if any saw it (one rank skipping a collective would hang the rest)
            while not asked[0] and inbox.poll():
                m = inbox.recv()
                if m is None or (m[0] == "cancel" and m[1] == job_id):
                    asked[0] = True
            return exchange.all_reduce_max(float(asked[0])) > 0

        def callback(step, total, latent):
            if rank == 0:
                outbox.send(("progress", job_id, step, total, pack(latent) if preview else None))

        def on_step(index, timestep, expert):
            if rank == 0:
                outbox.send(("step", job_id, index, float(timestep), expert))

        try:
            latent = sample(model, callback=callback, cancel=cancel, on_step=on_step, device=device,
                            parallel=exchange, **unpack(job))
            if rank == 0:
                outbox.send(("done", job_id, pack(latent.float())))
        except Cancelled:
            if rank == 0:
                outbox.send(("cancelled", job_id))
        except BaseException as err:  # noqa: BLE001
            outbox.send(("invalid" if isinstance(err, ValueError) else "error", rank, traceback.format_exc()))
            break  # ranks may now be out of step: leave; the host starts a fresh pool
    try:
        import torch.distributed as dist
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parent_pid, fd_in, fd_out = (int(a) for a in argv)
    if os.getppid() != parent_pid:
        return 3  # the host died before we started
    from moga.parallel.group import watch_parent

    watch_parent(parent_pid)
    inbox, outbox = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    try:
        _serve(inbox.recv(), inbox, outbox)
    except (EOFError, BrokenPipeError):
        return 3  # the host closed our pipes: nothing left to do
    return 0


if __name__ == "__main__":
    sys.exit(main())
