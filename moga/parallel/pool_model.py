"""The model a WorkerPool's workers load, and whether a job fits it.

Every worker loads the model itself (memory-mapped) from files named by the host: a checkpoint and
its settings, so each rank holds the same weights as a one-process run of the same files:

    dtype           weights' dtype name ("bfloat16"; None: as stored)
    threads         CPU threads per worker (CPU pools)
    loras           ((file, strength), ...) merged at load (a pair: into the high-noise expert)
    low_noise       Wan2.2 A14B: the low-noise expert's file; the checkpoint is then the high-noise one
                    (a checkpoint folder holding both experts is split into the two by itself)
    loras_low       the low-noise expert's LoRAs (None: the same as `loras`, as `moga generate --lora`)
    boundary        the expert switch, a fraction of the timestep range (None: Wan2.2's own)
    offload_expert  the expert not in use lives on the CPU: each worker holds it in host RAM
                    (P workers: P copies of an idle expert in RAM; see moga.experts for the copy cost)

`settings_of(model)` gives (checkpoint, settings) that load a model already loaded in the host again
(a WanModel or an ExpertPair read from files, with the LoRAs it merged). `check_fits` refuses, in the
host, a job the model cannot run (an image condition of another model kind, per-expert guidance or MoGA
configs for one model), so a mistake costs no worker restart.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SETTINGS = {"dtype": None, "threads": None, "loras": (), "low_noise": None, "loras_low": None,
            "boundary": None, "offload_expert": False}
_PAIR_ONLY = ("loras_low", "boundary", "offload_expert")


def canonical_settings(settings) -> dict:
    """Every key of SETTINGS, checked, in one form (resolved paths, tuples, dtype names), so equal
    settings compare equal; raises ValueError naming a bad value."""
    settings = dict(settings or {})
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown worker settings {sorted(unknown)}: known are {sorted(SETTINGS)} "
                         f"(per-run options such as MoGA settings belong in the job)")
    out = dict(SETTINGS, **settings)
    out["loras"] = _loras(out["loras"])
    if out["low_noise"] is None:
        given = [k for k in _PAIR_ONLY if settings.get(k)]
        if given:
            raise ValueError(f"settings {given} are for a Wan2.2 A14B pair: give settings['low_noise'] (the "
                             f"low-noise expert's file) too")
        out.update({k: SETTINGS[k] for k in _PAIR_ONLY})  # one form: an empty loras_low is no loras_low
    else:
        low = Path(out["low_noise"]).expanduser().resolve()
        if not low.exists():
            raise ValueError(f"the low-noise expert {str(out['low_noise'])!r} does not exist: pass the path of "
                             f"the Wan2.2 A14B low-noise .safetensors file (or folder)")
        out["low_noise"] = str(low)
        out["loras_low"] = out["loras"] if out["loras_low"] is None else _loras(out["loras_low"])
        if out["boundary"] is not None:
            b = float(out["boundary"])
            if not 0.0 < b < 1.0:
                raise ValueError(f"settings['boundary'] is a fraction of the timestep range in (0, 1), "
                                 f"got {out['boundary']!r} (None: Wan2.2's own)")
            out["boundary"] = b
        out["offload_expert"] = bool(out["offload_expert"])
    if out["dtype"] is not None:
        out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        if not isinstance(getattr(torch, out["dtype"], None), torch.dtype):
            raise ValueError(f"settings['dtype'] {settings['dtype']!r} is not a torch dtype name")
    return out


def _loras(loras) -> tuple:
    if not loras:
        return ()
    from moga.checkpoint import check_loras  # files exist, strengths are numbers: refused in the host
    return tuple((str(Path(f).resolve()), s) for f, s in check_loras(list(loras)))


def split_pair(checkpoint: Path, settings: dict) -> tuple[Path, dict]:
    """A checkpoint folder holding both Wan2.2 A14B experts -> (the high-noise expert, settings naming
    the low-noise one); anything else unchanged."""
    if settings.get("low_noise") is not None:
        return checkpoint, settings
    from moga.checkpoint import find_experts
    found = find_experts(checkpoint)
    if found is None:
        return checkpoint, settings
    return Path(found[0]).resolve(), canonical_settings(dict(settings, low_noise=str(found[1])))


def settings_of(model, dtype=None, threads=None) -> tuple[str, dict]:
    """(checkpoint, settings) that make the workers load `model` again: a WanModel or a
    `moga.experts.ExpertPair` loaded from files (`moga.checkpoint.load_model` / `load_experts`
    record each file and the LoRAs merged into it)."""
    pair = hasattr(model, "expert_for")
    high = model.high if pair else model
    nets = (model.high, model.low) if pair else (model,)
    paths = [getattr(n, "source_path", None) for n in nets]
    if None in paths:
        raise ValueError("this model was not loaded from a file (moga.checkpoint.load_model / load_experts), "
                         "so the workers cannot load it: save it (moga.checkpoint.save_checkpoint) and load that")
    settings = {"dtype": None if dtype is None else str(dtype).removeprefix("torch."), "threads": threads,
                "loras": tuple(tuple(x) for x in getattr(high, "loras", None) or ())}
    if pair:
        settings.update(low_noise=paths[1], loras_low=tuple(tuple(x) for x in getattr(model.low, "loras", None) or ()),
                        boundary=model.boundary, offload_expert=model.offload)
    return paths[0], settings


def pool_key(devices, path: Path, settings: dict) -> tuple:
    """What makes two pools the same: devices, the files (path, size, mtime) and the settings; an
    edited LoRA or expert file gives another key, hence a fresh pool."""
    def stamp(p):
        st = os.stat(p)
        return (str(p), st.st_size, st.st_mtime_ns)
    files = [path] + ([settings["low_noise"]] if settings.get("low_noise") else [])
    loras = tuple(os.stat(f).st_mtime_ns for f, _ in (settings.get("loras") or ()) + (settings.get("loras_low") or ()))
    return (tuple(devices), tuple(stamp(p) for p in files), tuple(sorted(settings.items())), loras)


def extras_module(checkpoint) -> str | None:
    """For a checkpoint that brings its own text encoder / VAE (`moga.extras`, the demo model): the
    module whose import registered its loader in this (host) process. Workers import that module by
    name, so this floor never names the modules above it; the entry point (CLI, nodes) that brought
    the loader decides. Raises ValueError when no loader is registered here."""
    from moga.checkpoint import EXTRA_LOADERS, inspect_checkpoint

    extras = inspect_checkpoint(checkpoint).extras
    if not extras:
        return None
    loader = EXTRA_LOADERS.get(extras)
    if loader is None:
        raise ValueError(f"{checkpoint} brings its own text encoder/VAE ('moga.extras' = {extras!r}) but no "
                         f"loader is registered for it in this process (registered: "
                         f"{sorted(EXTRA_LOADERS) or 'none'}): import the module that defines it (e.g. the "
                         f"demo package) before starting the pool")
    return loader.__module__


def model_config(checkpoint, settings: dict):
    """The WanConfig of the pool's model, read from the headers (no tensor); for a pair, also checks
    that the two experts are one model's (the workers would fail on it after loading)."""
    from moga.checkpoint import plan_checkpoint

    config = plan_checkpoint(checkpoint).config
    if settings.get("low_noise"):
        low = plan_checkpoint(settings["low_noise"]).config
        strip = dict(num_groups=0, moga_layers=())
        if config.replace(**strip) != low.replace(**strip):
            raise ValueError(f"the two experts differ in shape ({config.name} vs {low.name}): give the high- "
                             f"and low-noise files of one Wan2.2 A14B model")
    return config


def load(checkpoint: str, device: str, settings: dict, extras_from: str | None = None):
    """The worker's side: load the model (a WanModel, or an ExpertPair) onto `device`."""
    import importlib

    from moga.checkpoint import load_experts, load_model

    if extras_from:
        importlib.import_module(extras_from)  # registers the loader of the model's own encoders
    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    loras = [tuple(x) for x in settings.get("loras") or ()]
    if settings.get("low_noise"):
        return load_experts(checkpoint, settings["low_noise"], boundary=settings.get("boundary"),
                            offload=bool(settings.get("offload_expert")), device=device, dtype=dtype,
                            loras=loras or None, loras_low=[tuple(x) for x in settings.get("loras_low") or ()] or None)
    model = load_model(checkpoint, device=device, dtype=dtype, loras=loras)
    return model.eval().requires_grad_(False)


def check_fits(job: dict, config, pair: bool) -> None:
    """ValueError unless the model (`config`, an expert pair or not) can run this job."""
    cfg = job.get("cfg")
    if isinstance(cfg, (tuple, list)) and not pair:
        raise ValueError(f"cfg {tuple(cfg)} gives each Wan2.2 A14B expert its own guidance, but this pool's model "
                         f"({config.name}) is one model: give one number, or start the pool with "
                         f"settings['low_noise']")
    moga = job.get("moga")
    if isinstance(moga, (tuple, list)):
        if not pair:
            raise ValueError(f"moga gives each Wan2.2 A14B expert its own MoGA config, but this pool's model "
                             f"({config.name}) is one model: give one MoGAConfig, or start the pool with "
                             f"settings['low_noise']")
        if len(moga) != 2:
            raise ValueError(f"moga is (moga_high, moga_low) for an expert pair, got {len(moga)} configs")
    kind, image = config.conditioning, job.get("image")
    if image is None:
        if kind in ("concat", "clip+concat"):
            raise ValueError(f"{config.name} is an image-to-video model: the job needs image= (a "
                             f"moga.conditioning.ImageCondition with a start image for shot 1)")
        return
    if kind == "none":
        raise ValueError(f"{config.name} is a text-to-video model: it takes no image condition; drop image= "
                         f"or start the pool with an image-to-video checkpoint")
    if image.kind != kind:
        raise ValueError(f"the job's image condition is of the {image.kind!r} kind but {config.name} takes "
                         f"{kind!r}: build it with moga.conditioning.image_condition for this model's config")
    frames, height, width = (int(v) for v in job["latent_size"])
    shots = len(job["shot_frames"])
    want = {"y": (1, config.in_dim - config.out_dim, frames, height, width),
            "latent": (1, config.out_dim, frames, height, width), "fixed": (frames,)}
    for name in ("y",) if kind != "replace" else ("latent", "fixed"):
        got = getattr(image, name)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want[name]:
            raise ValueError(f"the job's image condition has {name} of shape "
                             f"{None if got is None else tuple(got.shape)}, but this latent needs {want[name]}: "
                             f"build it for the job's latent_size and shot_frames")
    if kind == "clip+concat":
        clip = image.clip
        if not isinstance(clip, (list, tuple)) or len(clip) != shots or any(
                not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[-1] != config.image_dim for c in clip):
            raise ValueError(f"{config.name} needs CLIP tokens [1, tokens, {config.image_dim}] for each of the "
                             f"{shots} shots in the image condition (moga.conditioning.image_condition makes them)")


__all__ = ["SETTINGS", "canonical_settings", "settings_of", "pool_key", "extras_module", "model_config",
           "load", "check_fits", "split_pair"]
