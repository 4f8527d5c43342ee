"""`torchrun ... -m moga generate ...`: sequence-parallel generation, one process per GPU, any number
of machines (torchrun's rendezvous sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Every rank reads the same checkpoint, encodes the same prompts and runs the whole sampler on the full
latent with the Ulysses exchange (the transformer blocks only see its 1/P of the tokens); rank 0
decodes and writes the video. `moga.cli.cmd_generate` runs that flow (the CLI is the entry point, so
nothing here imports it); this module gives it the process group: `env_ranks` and `init_from_env`.
See docs/parallel.md for the commands.
"""
from __future__ import annotations

import datetime
import os

DEFAULT_TIMEOUT_S = 3600  # a collective may wait this long (rank 0 loading or a long first step)


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except KeyError as e:
        raise ValueError(f"{e.args[0]} is not set: start this with torchrun (see docs/parallel.md)") from None


def init_from_env(device=None, timeout_s: float | None = None):
    """Join torchrun's group: NCCL on CUDA (GPU LOCAL_RANK), gloo on the CPU. Returns (exchange, device)."""
    import torch
    import torch.distributed as dist

    from .group import NVLS_OFF
    from .ulysses import UlyssesExchange

    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)
    rank, world, local = env_ranks()
    if device is None or str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            if device is not None:
                raise ValueError(f"--device {device} asked for but CUDA is not available: use --device cpu")
            device = "cpu"
        else:
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs: "
                                 f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
            device = f"cuda:{local}"  # one GPU per local rank, whatever --device named
    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("MOGA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    kwargs = dict(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if not dist.is_initialized():
        dist.init_process_group(**kwargs)
    return UlyssesExchange(), device


# ---- one clean exit for every rank -------------------------------------------------------------
# Under torchrun every rank runs the same command line. A user error is printed by rank 0 alone and
# every rank exits 2; Ctrl-C (SIGINT, or torchrun's SIGTERM when it stops the ranks) exits 130 on
# every rank, also one blocked inside a collective whose peer has stopped: Python only runs signal
# handlers between bytecodes, so the signals go to a watcher thread that interrupts the main thread
# and, if it is still stuck after SIGNAL_GRACE_S, ends the process itself.
EXIT_USAGE, EXIT_CANCELLED = 2, 130
SIGNAL_GRACE_S = 10.0
EXIT_BARRIER_S = 10.0
_state = {"exit_code": None, "watching": False}


def watch_signals(lead: bool, grace_s: float = SIGNAL_GRACE_S):
    """Route SIGINT/SIGTERM to a watcher thread (call before torch starts its threads: they inherit
    the blocked mask, so the watcher alone receives them). Returns stop(): the watcher ends and the
    signals are delivered as before."""
    import _thread
    import signal
    import sys
    import threading

    if _state["watching"] or not hasattr(signal, "pthread_sigmask"):
        return lambda: None
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    _state["watching"] = True
    stopping = threading.Event()

    def watch():
        while signal.sigtimedwait(sigs, 0.2) is None:
            if stopping.is_set():
                return
        code = _state["exit_code"]
        if code is not None:  # already on the way out (an error every rank shares): keep its code
            os._exit(code)
        _state["exit_code"] = EXIT_CANCELLED
        _thread.interrupt_main()  # KeyboardInterrupt at the main thread's next bytecode
        signal.sigtimedwait(sigs, grace_s)  # a second signal, or the grace, ends it here
        if stopping.is_set():
            return
        if lead:
            print("moga: cancelled", file=sys.stderr, flush=True)
        os._exit(EXIT_CANCELLED)

    watcher = threading.Thread(target=watch, name="moga-signals", daemon=True)
    watcher.start()

    def stop():
        stopping.set()
        watcher.join(timeout=1.0)
        # exiting with a code: SIGTERM stays blocked, so torchrun stopping this rank while Python
        # finalizes (which restores the default handlers) cannot turn that code into -15
        exiting = _state["exit_code"] is not None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT} if exiting else sigs)
        _state["watching"] = False
        _state["exit_code"] = None

    return stop


def cancelled() -> bool:
    """True once this rank got SIGINT/SIGTERM (watch_signals)."""
    return _state["exit_code"] == EXIT_CANCELLED


def exit_together(code: int, timeout_s: float = EXIT_BARRIER_S) -> int:
    """Wait (at most timeout_s) until every rank is on its way out, so torchrun does not stop the
    slower ranks with a signal while they reach the same error; returns `code`."""
    _state["exit_code"] = code
    if code == EXIT_CANCELLED:
        return code  # every rank got the signal itself
    try:
        rank, world, _ = env_ranks()
        store = _exit_store(rank, timeout_s)
        if store is None:
            return code
        import time
        store.add("moga/exiting", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("moga/exiting", 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
        # the store lives in rank 0: it stays up until every other rank has made its last call to it (a fixed
        # grace was not enough on a loaded machine: a rank still polling saw the store vanish and printed
        # c10d's "recvValue failed" warning after the user's error)
        if rank == 0:
            while store.add("moga/left", 0) < world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            store.add("moga/left", 1)
    except Exception:  # noqa: BLE001 - an exit must never fail: leave without the barrier
        pass
    return code


def _exit_store(rank: int, timeout_s: float):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    # newer torchrun serves the store itself on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE): join it
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(addr, int(port), is_master=rank == 0 and not agent, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def agree_on_error(error: Exception | None) -> None:
    """Collective: if any rank hit a user error, every rank raises the first one (by rank), so none
    is left waiting in the next collective for a rank that has left."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if error is None else str(error))
    first = next((m for m in msgs if m is not None), None)
    if first is not None:
        raise error if error is not None and str(error) == first else ValueError(first)
