"""What a run leaves: the MoGA checkpoint, the LoRA file, the router file, and the record of the run.

`OUT/moga.safetensors` is a MoGA checkpoint in the input's key layout: the input's tensors (byte-copied
where training did not change them), the routers, trained or LoRA-merged weights in the input's dtype,
and metadata `moga.fusion = mean` (trained routers) plus `moga.train` (`train_record`, JSON).
`--lora-output separate` keeps the base weights and writes `OUT/lora.safetensors` (ComfyUI's LoRA key
names, moga.checkpoint.lora's writer) instead of merging. `export_routers` writes only the trained routers
as a router file (moga.checkpoint.router_file, with the fingerprint of the source checkpoint), for
ComfyUI's MoGA Router Loader on core's own model.

Every function here is collective under FSDP (the full weights are gathered): every rank calls it, rank 0
writes.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from ..lora import lora_factors
from .distributed import barrier
from .run_state import fingerprint, full_state
from .settings import LORA_NAME, OUTPUT_NAME

ROUTER_SUFFIX = ".self_attn.router.weight"
MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def export_checkpoint(trainer, path=None, lora_output: str | None = None) -> Path | None:
    """Write the MoGA checkpoint (rank 0); returns its path (None on other ranks)."""
    from ...checkpoint import FORMAT_VERSION, moga_metadata, plan_checkpoint, router_key, write_safetensors
    s = trainer.s
    lora_output = lora_output or s.lora_output
    weights, _ = full_state(trainer)
    if not trainer.is_main:
        barrier(trainer.distributed)
        return None
    path = Path(path) if path else trainer.out / OUTPUT_NAME
    if trainer.source is None:
        raise ValueError("export needs the source checkpoint (WanTrainer(..., source=path))")
    plan = plan_checkpoint(trainer.source)
    src, names = plan.source, dict(plan.names)
    new: dict[str, torch.Tensor] = {}
    lora = lora_factors(weights)
    alpha = float(s.lora_rank if s.lora_alpha is None else s.lora_alpha)
    for canon, w in weights.items():
        if canon.endswith((".lora_down", ".lora_up")):
            continue
        if canon.endswith(ROUTER_SUFFIX):
            layer = int(canon.split(".")[1])
            key = names.pop(canon, None) or router_key(layer, plan.layout)
            new[key] = w.float().contiguous()
            continue
        key = names.pop(canon)
        new[key] = w.to(src.dtype(key) or torch.float32)
    if lora and lora_output == "merged":
        for mod, (down, up) in lora.items():
            key = names.pop(f"{mod}.weight")
            base = src.get(key)
            if base.dtype not in MERGEABLE_DTYPES:
                raise ValueError(f"{key} is stored as {base.dtype}: LoRA cannot be merged into it without "
                                 f"loss; use --lora-output separate")
            new[key] = (base.float() + (up.float() @ down.float()) * (alpha / s.lora_rank)).to(base.dtype)
    replaced = set(new)
    copy = {k: src for k in src.keys() if k not in replaced}
    meta = {k: v for k, v in src.metadata.items()
            if not k.startswith("moga.") or k in ("moga.num_heads", "moga.extras")}
    cfg = trainer.model.config
    if cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
        meta["moga.num_heads"] = str(cfg.num_heads)
    meta.update(moga_metadata(trainer.moga.replace(num_groups=trainer.num_groups), trainer.layers, 0.0))
    meta["moga.format_version"] = FORMAT_VERSION
    meta["moga.train"] = json.dumps(train_record(trainer, lora_output), separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, new, meta, copy_from=copy)
    if lora and lora_output == "separate":
        from ...checkpoint.lora import write_lora
        write_lora(path.parent / LORA_NAME, {mod: (down, up, alpha) for mod, (down, up) in lora.items()},
                   metadata={"moga.train": meta["moga.train"], "moga.base": Path(trainer.source).name})
    src.close()
    barrier(trainer.distributed)
    return path


def export_routers(trainer, path) -> Path | None:
    """Write only the trained routers as a router file (rank 0; None on other ranks), with the fingerprint
    of the source checkpoint the run started from, for core's model through the MoGA Router Loader.
    In lora/full mode the routers were trained with changed weights: use them with the exported model
    (or the LoRA) on top of that base."""
    from ...checkpoint.router_file import file_fingerprint, write_routers
    weights, _ = full_state(trainer)
    if not trainer.is_main:
        barrier(trainer.distributed)
        return None
    if trainer.source is None:
        raise ValueError("export_routers needs the source checkpoint (WanTrainer(..., source=path))")
    routers = {int(n.split(".")[1]): w for n, w in weights.items() if n.endswith(ROUTER_SUFFIX)}
    path = write_routers(path, routers, trainer.moga.replace(num_groups=trainer.num_groups), 0.0,
                         file_fingerprint(trainer.source))
    barrier(trainer.distributed)
    return path


def train_record(trainer, lora_output: str) -> dict:
    """The `moga.train` metadata: what this run was."""
    import moga
    s = trainer.s
    last = trainer.history[-1].to_json() if trainer.history else {}
    rec = dict(mode=s.mode, steps=trainer.step, lr=s.lr, warmup=s.warmup, batch=s.batch,
               balance_weight=s.balance_weight, balance_form=s.balance_form, shift=s.shift,
               routers_init=trainer.routers_init, num_groups=trainer.num_groups, window=s.window,
               dtype=s.dtype, seed=s.seed, world=trainer.layout.world, sp=s.sp, fsdp=s.fsdp,
               base=Path(trainer.source).name if trainer.source else None, data_clips=len(trainer.data),
               data_fingerprint=fingerprint(trainer)["data"], final_loss=last.get("loss"),
               final_balance_max=last.get("balance_max"), moga_version=moga.__version__,
               date=datetime.date.today().isoformat())
    if s.mode == "lora":
        rec.update(lora_rank=s.lora_rank, lora_alpha=s.lora_alpha or s.lora_rank,
                   lora_targets=s.lora_targets, lora_output=lora_output)
    return rec


__all__ = ["export_checkpoint", "export_routers", "train_record"]
