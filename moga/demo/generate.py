"""Generating world stories with the demo model, many at once, and scoring them.

`generate(model, stories, ...)` denoises a batch of stories with the same schedule and solver as
`moga.sampling.sample` (a batch of one gives the same latent as `sample` with the same seed:
tests/test_demo_model.py checks it), conditional and unconditional passes in one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..sampling import dense_step_count, initial_noise, make_schedule, make_solver
from .evaluate import score_story, summarize
from .world import Story


def latent_shot_frames(story: Story, temporal_ratio: int = 4) -> tuple[int, ...]:
    return tuple((f - 1) // temporal_ratio + 1 for f in story.shot_frames)


def _pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """[1, L_i, D] rows -> [B, max L, D], zero rows appended (the DiT pads with zeros anyway)."""
    length = max(r.shape[1] for r in rows)
    return torch.cat([torch.cat([r, r.new_zeros(1, length - r.shape[1], r.shape[2])], 1) for r in rows])


@torch.inference_mode()
def generate(model, stories: list[Story], *, steps: int, cfg: float, shift: float, solver: str = "unipc",
             seeds=None, moga=None, device=None, callback=None, dense_steps: float = 0.0,
             step_configs=None) -> torch.Tensor:
    """Latents [B, C, F, H, W] (float32) for stories of one shape; seeds default to each story's index.
    The first `dense_steps` fraction of the steps run dense attention (`moga.sampling.dense_step_count`).
    step_configs: one MoGAConfig per step instead (attention schedules, `benchmarks/demo_schedules.py`)."""
    if not stories:
        raise ValueError("no stories to generate")
    shapes = {(tuple(s.shot_frames), s.size) for s in stories}
    if len(shapes) != 1:
        raise ValueError(f"generate() batches stories of one shape; got {sorted(shapes)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    enc, codec = model.text_encoder, model.vae
    if enc is None or codec is None:
        raise ValueError("the model brings no text encoder / codec: load the demo model (moga.demo.load_demo)")
    shots = latent_shot_frames(stories[0], codec.temporal_ratio)
    size = stories[0].size // codec.spatial_ratio
    b = len(stories)
    seeds = list(range(b)) if seeds is None else list(seeds)
    positive = [_pad_stack([enc.encode([s.captions[k]])[0] for s in stories]).to(device)
                for k in range(len(shots))]
    negative = enc.encode([""])[0].to(device)
    if cfg != 1.0:
        pad = lambda t, n: torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], t.shape[2])], 1)  # noqa: E731
        context = []
        for p in positive:
            length = max(p.shape[1], negative.shape[1])
            context.append(torch.cat([pad(p, length), pad(negative, length).expand(b, -1, -1)]))
    else:
        context = positive
    x = torch.cat([initial_noise((1, codec.latent_channels, sum(shots), size, size), s) for s in seeds]).to(device)
    schedule = make_schedule(steps, shift)
    stepper = make_solver(solver, schedule)
    n_dense = dense_step_count(dense_steps, steps)
    base = moga if moga is not None else model.moga_config
    if n_dense and base is None:
        raise ValueError("dense_steps needs a MoGA model (or moga=)")
    dense = base.replace(dense=True) if n_dense else None
    if step_configs is None:
        configs = [dense if i < n_dense else moga for i in range(steps)]
    else:
        configs = list(step_configs)
        if len(configs) != steps or n_dense:
            raise ValueError(f"step_configs gives {len(configs)} configs for {steps} steps"
                             f"{' and dense_steps too' if n_dense else ''}: give one per step, without dense_steps")
    for i in range(schedule.steps):
        t = torch.full((1,), schedule.timesteps[i], device=device, dtype=torch.float32)
        xin = torch.cat([x, x]) if cfg != 1.0 else x
        v = model(xin, t, context, shot_frames=shots, moga=configs[i]).float()
        if cfg != 1.0:
            v_cond, v_uncond = v[:b], v[b:]
            v = v_uncond + cfg * (v_cond - v_uncond)
        x = stepper.step(i, x, v)
        if callback is not None:
            callback(i + 1, schedule.steps, x)
    return x


@torch.inference_mode()
def decode(model, latent: torch.Tensor, story: Story) -> torch.Tensor:
    """Latent [B, C, F, h, w] -> video [B, 3, T, H, W] in [-1, 1], each shot decoded alone."""
    codec = model.vae
    return codec.decode_shots(latent.to(codec.latent_mean.device), latent_shot_frames(story, codec.temporal_ratio))


@dataclass
class EvalResult:
    summary: dict
    scores: list
    seconds: float
    attention_flops: float
    dense_attention_flops: float

    @property
    def flop_ratio(self) -> float:
        return self.attention_flops / self.dense_attention_flops if self.dense_attention_flops else 1.0


def evaluate_model(model, stories: list[Story], *, steps: int, cfg: float, shift: float,
                   solver: str = "unipc", moga=None, batch: int = 16, device=None, seed: int = 0,
                   dense_steps: float = 0.0, step_configs=None) -> EvalResult:
    """Generate every story (seed = seed + its index), decode, score; count attention FLOPs."""
    from ..diagnostics import attention_flops

    scores = []
    start = time.perf_counter()
    with attention_flops(model) as count:
        for lo in range(0, len(stories), batch):
            part = stories[lo:lo + batch]
            lat = generate(model, part, steps=steps, cfg=cfg, shift=shift, solver=solver,
                           seeds=[seed + lo + i for i in range(len(part))], moga=moga, device=device,
                           dense_steps=dense_steps, step_configs=step_configs)
            video = decode(model, lat, part[0]).cpu()
            scores += [score_story(video[i], s) for i, s in enumerate(part)]
    seconds = time.perf_counter() - start
    return EvalResult(summarize(scores), scores, seconds, count.flops, count.dense_flops)
