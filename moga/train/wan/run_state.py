"""A run's state on disk, so that a resumed run continues exactly as an uninterrupted one.

`OUT/state/step-N/` holds the trained weights, AdamW's moments, the RNG state (safetensors, the format of
moga.train.state) and `state.json` (the step, how the routers began, a fingerprint of the settings and
the data); `OUT/state/latest` names the newest, and the last two are kept. A resume refuses other data
or other settings (the learning-rate schedule, clipping and the kernel may change).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..state import load_tensors, read_json, save_tensors, write_json
from .distributed import barrier
from .settings import STATE_DIR

RESUMABLE_CHANGES = ("lr", "warmup", "clip_grad", "backend")  # settings a resumed run may change


def full_state(trainer) -> tuple[dict, dict]:
    """(trained weights, AdamW state) by parameter name, full tensors (on CPU). Collective under FSDP:
    every rank calls it."""
    if trainer.s.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(trainer.model, options=opts)
        osd = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
        weights = {n: msd[n] for n in trainer.trainable if n in msd}
        optim = {n: osd["state"][n] for n in trainer.trainable if n in osd.get("state", {})}
        return weights, optim
    weights = {n: p.detach().float().cpu() for n, p in trainer.trainable.items()}
    optim = {n: trainer.optimizer.state[p] for n, p in trainer.trainable.items() if p in trainer.optimizer.state}
    return weights, optim


def fingerprint(trainer) -> dict:
    """What a resume must match: the settings (less the step count and save interval), the data, the world."""
    s = {k: v for k, v in asdict(trainer.s).items() if k not in ("steps", "save_every")}
    s["betas"] = list(s["betas"])
    names = [(x["name"], x["latent_shape"]) for x in trainer.data.samples]
    data = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return {"settings": s, "data": data, "clips": len(trainer.data), "world": trainer.layout.world}


def save_state(trainer) -> Path | None:
    """Write OUT/state/step-N/ (weights.safetensors with the trained tensors, optimizer.safetensors,
    rng.safetensors, state.json) and point OUT/state/latest at it; returns the folder (None off rank 0)."""
    weights, optim = full_state(trainer)
    if not trainer.is_main:
        barrier(trainer.distributed)
        return None
    root = trainer.out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{trainer.step:08d}"
    tmp = root / f".tmp-{trainer.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tmp / "weights.safetensors", weights)
    # moga.train.state's optimizer naming: "{field}/{parameter name}"
    save_tensors(tmp / "optimizer.safetensors",
                 {f"{k}/{n}": (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu()
                  for n, st in optim.items() for k, v in st.items()})
    rng = {"torch": torch.get_rng_state()}
    if trainer.model.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.model.device)
    save_tensors(tmp / "rng.safetensors", rng)
    write_json(tmp / "state.json", dict(step=trainer.step, routers_init=trainer.routers_init,
                                        **fingerprint(trainer),
                                        history=[h.to_json() for h in trainer.history[-1:]]))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    (root / "latest.part").write_text(folder.name, encoding="utf-8")
    os.replace(root / "latest.part", root / "latest")
    for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    barrier(trainer.distributed)
    return folder


def latest_state(out) -> Path | None:
    """The newest complete state folder of the run folder `out`, or None."""
    latest = Path(out) / STATE_DIR / "latest"
    if not latest.is_file():
        return None
    folder = Path(out) / STATE_DIR / latest.read_text(encoding="utf-8").strip()
    return folder if (folder / "state.json").is_file() else None


def resume(trainer) -> None:
    """Continue from the run folder's newest state, if any: weights, AdamW, RNG, step (checked first)."""
    folder = latest_state(trainer.out)
    if folder is None:
        return
    meta = read_json(folder / "state.json")
    mine = fingerprint(trainer)
    for key in ("data", "clips"):
        if meta.get(key) != mine[key]:
            raise ValueError(f"{trainer.out} holds a run on other data ({key} differs): give a new --out, or "
                             f"the same --data to resume")
    diff = {k: (meta["settings"].get(k), v) for k, v in mine["settings"].items()
            if meta["settings"].get(k) != v and k not in RESUMABLE_CHANGES}
    if diff:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{trainer.out} holds a run with other settings ({what}): use the same settings "
                         f"to resume, or a new --out")
    weights = load_tensors(folder / "weights.safetensors")
    missing = [n for n in trainer.trainable if n not in weights]
    if missing:
        raise ValueError(f"the saved state lacks {missing[:3]}: it belongs to another run")
    state: dict[str, dict] = {}
    for key, v in load_tensors(folder / "optimizer.safetensors").items():
        k, _, n = key.partition("/")
        state.setdefault(n, {})[k] = v
    _load_full_state(trainer, weights, state)
    rng = load_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and trainer.model.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], trainer.model.device)
    trainer.step = int(meta["step"])
    trainer.routers_init = meta.get("routers_init", trainer.routers_init)
    trainer.log(f"resumed from {folder} at step {trainer.step}")


def _load_full_state(trainer, weights: dict, state: dict) -> None:
    if trainer.s.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(trainer.model, weights, options=opts)
        groups = [{"params": list(trainer.trainable), **{k: v for k, v in g.items() if k != "params"}}
                  for g in trainer.optimizer.param_groups]
        full = {"state": {n: {k: (v if k != "step" else v.reshape(())) for k, v in st.items()}
                          for n, st in state.items()}, "param_groups": groups}
        set_optimizer_state_dict(trainer.model, trainer.optimizer, full, options=opts)
        return
    with torch.no_grad():
        for n, p in trainer.trainable.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    for n, p in trainer.trainable.items():
        if n in state:
            st = {k: v.to(p.device) if k != "step" else v.reshape(()) for k, v in state[n].items()}
            trainer.optimizer.state[p] = st


__all__ = ["full_state", "fingerprint", "save_state", "latest_state", "resume"]
