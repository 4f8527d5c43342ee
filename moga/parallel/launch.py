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
