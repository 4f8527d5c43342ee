"""The processes of a run: joining torchrun's group, the device of this rank, and the collectives one
training step needs (the trained weights made equal, gradients averaged, the log's numbers summed, FSDP).

Sequence parallelism itself (the exchange inside the model's attention) is moga.train.sp's.
"""
from __future__ import annotations

import datetime
import os

import torch


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def init_distributed(timeout_s: float = 600.0) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}.items():
        os.environ.setdefault(k, v)
    kw = dict(timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, **kw)
    else:
        dist.init_process_group("gloo", **kw)
    return True


def barrier(distributed: bool) -> None:
    """Wait for every rank (a no-op in one process)."""
    if distributed:
        torch.distributed.barrier()


def broadcast_from_first(params) -> None:
    """Every rank starts from rank 0's values of the trained weights."""
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def shard_with_fsdp(model, world: int) -> None:
    """FSDP2 (`fully_shard`) over all `world` ranks: each block, its cross-attention (the model computes
    the text's keys/values outside the block's forward: its own unit), then the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    import warnings
    # FSDP2 warns that a wrapped module returns a view (cross_attn.kv's transposes, the model's
    # cropped output); nothing here writes into those views in place (the FSDP test checks the update)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(model.device.type, (world,))
    # No FSDP casts: the layers cast weights to the compute dtype per call, and Wan computes the
    # residual stream, modulation, norms, embeddings and head in float32. A bf16 param_dtype rounded
    # those weights and cast a block's float32 inputs (x, e): the loss moved by ~0.7% (test). So
    # weights are gathered as stored (trained ones float32: twice the bytes of a bf16 gather).
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block.cross_attn, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(block.cross_attn, "kv")
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def average_gradients(params, world: int) -> None:
    """Average the gradients of `params` over every rank, in one all-reduce (a missing one counts as 0)."""
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).clone()
        off += n


def sum_step_stats(flow: float, bal: float, ratios: list, tokens: int, layout, accum: int, batch: int, device):
    """A step's (flow, balance, group ratios, tokens) over the global batch of `batch` clips, from each
    rank's sums over its `accum` clips (ratios: their mean)."""
    # every rank of a sequence-parallel group holds the same values: count each group once
    keep = 1.0 if layout.sp_rank == 0 else 0.0
    vec = torch.tensor([flow * keep, bal * keep, tokens * keep] + [r * keep * accum for r in ratios],
                       dtype=torch.float64, device=device)
    torch.distributed.all_reduce(vec)
    vec = vec.cpu().tolist()
    return vec[0] / batch, vec[1] / batch, [r / batch for r in vec[3:]], int(vec[2])


__all__ = ["default_device", "init_distributed", "barrier", "broadcast_from_first", "shard_with_fsdp",
           "average_gradients", "sum_step_stats"]
