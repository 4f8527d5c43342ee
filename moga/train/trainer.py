"""A generic flow-matching trainer for `moga.model.WanModel`, with MoGA's group-balancing loss.

    trainer = Trainer(model, data, TrainConfig(steps=2000, batch_size=32), modules={"text_encoder": te})
    trainer.run()                 # or trainer.run(time_limit=300)
    trainer.save("ckpt/")         # weights, EMA, optimizer moments (safetensors) + state.json
    trainer = Trainer.resume("ckpt/", model, data, modules=...)   # continues bit-for-bit

Objective (rectified flow, as Wan2.1 and `moga.sampling`): x_s = (1 - s) * x0 + s * noise, the model
sees t = 1000 * s and predicts v = noise - x0; s = shift(u) with u ~ U(0, 1) and Wan's shift
s = k * u / (1 + (k - 1) * u). Loss = MSE(v) + the mean over MoGA layers of
`moga.attention.loss.balance_loss` (the paper's Eq. 8, weight 0.1). With `dense_warmup` w, a MoGA
model trains as it samples with a dense warm-up: a share w of the steps draw u from (1 - w, 1] and run
dense attention, the others draw u from [0, 1 - w) and run MoGA.

The data source is anything with `batch(index, size, device) -> Batch` that returns the same batch
for the same index (so a resumed run sees exactly the data it would have seen). Batches carry either
ready text embeddings (`context`, e.g. a frozen T5's) or captions, which the trainable
`modules["text_encoder"].encode_batch(list[str]) -> [B, L, D]` turns into embeddings. Every random
draw of step k comes from generators seeded with (seed, k): runs are reproducible and resumable.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MoGAConfig
from ..attention.loss import balance_loss
from .state import (load_optimizer_tensors, load_tensors, optimizer_tensors, read_json, save_tensors,
                    write_json)


@dataclass
class Batch:
    latent: torch.Tensor                         # [B, C, F, H, W] clean latents
    shot_frames: tuple[int, ...]                 # latent frames per shot
    captions: list[list[str]] | None = None      # per shot, B captions
    context: list[torch.Tensor] | None = None    # per shot, [B, L, text_dim]
    weight: torch.Tensor | None = None           # optional loss weight, broadcastable to the latent


class DataSource(Protocol):
    def batch(self, index: int, size: int, device) -> Batch: ...


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # cosine decay from lr to lr * this at `steps`
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    shift: float = 3.0              # timestep shift for the training sigmas
    balance_weight: float = 0.1     # alpha of Eq. 8
    router_lr_scale: float = 1.0    # the routers' learning rate, as a multiple of lr
    dense_warmup: float = 0.0       # top share of u trained with dense attention (the sampler's first steps)
    balance_form: str = "paper"
    caption_dropout: float = 0.1    # share of samples trained with empty captions (for guidance)
    ema_decay: float = 0.0          # 0: no EMA
    compute_dtype: str = "float32"  # "bfloat16" on GPUs: weights stay float32, matmuls in bf16
    moga: dict = field(default_factory=dict)  # MoGAConfig fields for training calls ({}: the model's)
    log_every: int = 10
    save_every: int = 0             # 0: only when asked
    max_file_mb: float = 0.0        # shard checkpoint files larger than this (0: never)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not (self.router_lr_scale > 0 and math.isfinite(self.router_lr_scale)):
            raise ValueError(f"router_lr_scale must be a positive number, got {self.router_lr_scale}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if not 0.0 <= self.dense_warmup < 1.0:
            raise ValueError(f"dense_warmup is the share of the noise range trained dense, in [0, 1); "
                             f"got {self.dense_warmup}")
        self.betas = tuple(self.betas)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


class Trainer:
    def __init__(self, model: nn.Module, data: DataSource, config: TrainConfig,
                 modules: dict[str, nn.Module] | None = None, device=None,
                 log: Callable[[str], None] | None = print):
        self.model, self.data, self.config = model, data, config
        self.modules = dict(modules or {})
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.log = log or (lambda s: None)
        self.params: dict[str, nn.Parameter] = {}
        for prefix, module in [("", model), *self.modules.items()]:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    self.params[f"{prefix}.{name}" if prefix else name] = p
        self.names = {p: n for n, p in self.params.items()}
        router = {n for n in self.params if is_router_param(n)}
        decay = [p for n, p in self.params.items() if p.dim() >= 2 and n not in router]
        no_decay = [p for n, p in self.params.items() if p.dim() < 2 and n not in router]
        groups = [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        if router:  # the routers may learn faster than the DiT they steer (router_lr_scale)
            groups.append({"params": [self.params[n] for n in sorted(router)],
                           "weight_decay": config.weight_decay, "lr_scale": config.router_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)
        self.ema = ({n: p.detach().float().clone() for n, p in self.params.items()}
                    if config.ema_decay > 0 else None)
        self.step = 0
        self.history: list[dict] = []
        self.seconds = 0.0
        self.moga = model.moga_config.replace(**config.moga) if config.moga else None
        # MoGA models sampled with a dense warm-up (the first steps dense) train that way too: a batch
        # is dense with probability dense_warmup, its noise levels drawn from the top of the range
        # (u > 1 - dense_warmup), the MoGA batches' from below it; the marginal of u stays uniform
        base = self.moga or getattr(model, "moga_config", None)
        self._dense_config = (base.replace(dense=True) if config.dense_warmup and base is not None
                              and getattr(getattr(model, "config", None), "moga_layers", ()) else None)
        self._routers = [m for m in model.modules()
                         if getattr(m, "router", None) is not None and hasattr(m, "record_routing")]
        for layer in self._routers:
            layer.record_routing = True
        if config.compute_dtype != "float32":
            model.compute_dtype = getattr(torch, config.compute_dtype)

    # -- schedule ----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        span = max(c.steps - c.warmup, 1)
        progress = min(max(step - c.warmup, 0) / span, 1.0)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _generator(self, step: int, stream: int, device="cpu") -> torch.Generator:
        """Seeded by (seed, step, stream). Draws on the training device (no host copy, no sync):
        reproducible and resumable on one kind of device."""
        g = torch.Generator(device=device)
        g.manual_seed((self.config.seed * 1_000_003 + step) * 7 + stream)
        return g

    # -- one step ----------------------------------------------------------------------------

    def dense_warmup_step(self, step: int) -> bool:
        """Whether step `step` trains the dense warm-up (seeded by (seed, step): the same on resume)."""
        if self._dense_config is None:
            return False
        return bool(torch.rand(1, generator=self._generator(step, 4)).item() < self.config.dense_warmup)

    def conditioning(self, batch: Batch, step: int) -> list[torch.Tensor]:
        """Per shot [B, L, D] text embeddings, with caption dropout applied per sample."""
        b = batch.latent.shape[0]
        drop = torch.rand(b, generator=self._generator(step, 1)) < self.config.caption_dropout
        if batch.context is not None:
            keep = (~drop).to(self.device).view(b, 1, 1)
            return [c.to(self.device) * keep.to(c.dtype) for c in batch.context]
        encoder = self.modules.get("text_encoder")
        if batch.captions is None or encoder is None:
            raise ValueError("a batch needs `context` tensors, or `captions` and a trainable "
                             "modules['text_encoder'] with encode_batch()")
        dropped = drop.tolist()
        texts = ["" if d else c for shot in batch.captions for c, d in zip(shot, dropped)]
        return list(encoder.encode_batch(texts).to(self.device).split(b))  # one pass for all shots

    def losses(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        x0 = batch.latent.to(self.device, torch.float32)
        b = x0.shape[0]
        dev = self.device
        noise = torch.randn(x0.shape, generator=self._generator(step, 2, dev), device=dev)
        u = torch.rand(b, generator=self._generator(step, 3, dev), dtype=torch.float64, device=dev)
        moga = self.moga
        if self.dense_warmup_step(step):  # the whole batch in the top of the noise range, dense
            u = 1.0 - c.dense_warmup * u
            moga = self._dense_config
        elif self._dense_config is not None:  # set only when dense_warmup > 0
            u = (1.0 - c.dense_warmup) * u
        s = shift_sigma(u, c.shift).float()
        view = (b,) + (1,) * (x0.dim() - 1)
        xt = (1 - s.view(view)) * x0 + s.view(view) * noise
        context = self.conditioning(batch, step)
        pred = self.model(xt, s * 1000.0, context, shot_frames=batch.shot_frames, moga=moga)
        err = (pred.float() - (noise - x0)) ** 2
        if batch.weight is not None:  # e.g. more weight where the subject is (normalised: same scale)
            w = batch.weight.to(dev, torch.float32).expand_as(err)
            flow = (w * err).sum() / w.sum()
        else:
            flow = err.mean()
        stats = {"flow": flow.detach()}  # tensors: read on the host only when logged (no sync per step)
        loss = flow
        routed = [layer.last_routing for layer in self._routers if layer.last_routing is not None]
        if routed and c.balance_weight > 0:
            terms, top = [], []
            for r in routed:
                m = r.probs.shape[-1]
                terms.append(balance_loss(r.probs, r.group_ids, m, c.balance_weight, c.balance_form))
                share = torch.bincount(r.group_ids.reshape(-1), minlength=m).float() / r.group_ids.numel()
                top.append(share.max() * m)
            bal = torch.stack(terms).mean()
            loss = loss + bal
            stats["balance"] = bal.detach()
            stats["group_max"] = torch.stack(top).mean()  # largest group's share x M (1 = balanced)
        for layer in self._routers:
            layer.last_routing = None
        stats["loss"] = loss.detach()
        return loss, stats

    def train_step(self) -> dict:
        step = self.step
        self.model.train()
        for m in self.modules.values():
            m.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step) * group["lr_scale"]
        batch = self.data.batch(step, self.config.batch_size, self.device)
        loss, stats = self.losses(batch, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.params.values())
        if self.config.grad_clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).detach()
        self.optimizer.step()
        if self.ema is not None:
            d = min(self.config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                names = list(self.params)
                ema = [self.ema[n] for n in names]
                cur = [self.params[n].detach().float() for n in names]
                torch._foreach_mul_(ema, d)
                torch._foreach_add_(ema, cur, alpha=1 - d)
        self.step += 1
        stats["step"] = self.step
        stats["lr"] = self.lr_at(step)
        return stats

    def run(self, steps: int | None = None, time_limit: float | None = None,
            save_dir=None) -> list[dict]:
        """Train until `steps` (default config.steps) or `time_limit` seconds; returns the logged rows."""
        until = self.config.steps if steps is None else steps
        start = time.perf_counter()
        rows, acc = [], []
        while self.step < until:
            if time_limit is not None and time.perf_counter() - start > time_limit:
                self.log(f"time limit {time_limit:.0f}s reached at step {self.step}")
                break
            stats = self.train_step()
            acc.append(stats)
            if self.step % self.config.log_every == 0 or self.step == until:
                row = {k: float(torch.stack([torch.as_tensor(a[k], dtype=torch.float64, device="cpu")
                                             if not torch.is_tensor(a[k]) else a[k].double().cpu()
                                             for a in acc if k in a]).mean())
                       for k in acc[-1] if k not in ("step",)}
                row["step"] = self.step
                row["seconds"] = round(self.seconds + time.perf_counter() - start, 2)
                rows.append(row)
                self.history.append(row)
                acc = []
                self.log(_format(row))
            if save_dir is not None and self.config.save_every and self.step % self.config.save_every == 0:
                self.seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save(save_dir)
        self.seconds += time.perf_counter() - start
        return rows

    # -- weights and checkpoints -------------------------------------------------------------

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """Every trained module's full state (buffers too), the EMA weights where kept and asked."""
        out = {}
        for prefix, module in [("", self.model), *self.modules.items()]:
            for name, t in module.state_dict().items():
                key = f"{prefix}.{name}" if prefix else name
                out[key] = t.detach()
        if ema and self.ema is not None:
            for n, t in self.ema.items():
                out[n] = t.to(out[n].dtype)
        return out

    def save(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        limit = int(self.config.max_file_mb * 2 ** 20) or None
        save_tensors(folder / "weights.safetensors", self.weights(ema=False), max_file_bytes=limit)
        if self.ema is not None:
            save_tensors(folder / "ema.safetensors", self.ema, max_file_bytes=limit)
        save_tensors(folder / "optimizer.safetensors", optimizer_tensors(self.optimizer, self.names),
                     max_file_bytes=limit)
        write_json(folder / "state.json", {"step": self.step, "seconds": self.seconds,
                                           "config": asdict(self.config), "history": self.history})
        return folder

    def load(self, folder) -> "Trainer":
        folder = Path(folder)
        state = read_json(folder / "state.json")
        weights = load_tensors(folder / "weights.safetensors")
        for prefix, module in [("", self.model), *self.modules.items()]:
            own = {k[len(prefix) + 1:] if prefix else k: v for k, v in weights.items()
                   if (k.startswith(prefix + ".") if prefix else k.split(".")[0] not in self.modules)}
            missing, unexpected = module.load_state_dict(own, strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint {folder} does not match module {prefix or 'model'!r}: "
                                 f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        if self.ema is not None:
            ema = load_tensors(folder / "ema.safetensors", self.device)
            self.ema = {n: ema[n].float() for n in self.params}
        load_optimizer_tensors(self.optimizer, self.params, load_tensors(folder / "optimizer.safetensors"))
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))
        self.history = list(state.get("history", []))
        return self

    @classmethod
    def resume(cls, folder, model, data, modules=None, config: TrainConfig | None = None, **kw) -> "Trainer":
        """A trainer continuing the run saved in `folder` (its config unless `config` is given)."""
        state = read_json(Path(folder) / "state.json")
        cfg = config or TrainConfig.from_dict(state["config"])
        return cls(model, data, cfg, modules=modules, **kw).load(folder)


def _format(row: dict) -> str:
    parts = [f"step {row['step']}"]
    for k in ("loss", "flow", "balance", "group_max", "grad_norm", "lr", "seconds"):
        if k in row:
            v = row[k]
            parts.append(f"{k} {v:.3g}" if k != "seconds" else f"{v:.0f}s")
    return "  ".join(parts)


def is_router_param(name: str) -> bool:
    """A MoGA router's weight (`blocks.{i}.self_attn.router.weight`), by its parameter name."""
    return ".router." in f".{name}"


def init_wan_weights(model: nn.Module, seed: int = 0, router_std: float = 0.02) -> nn.Module:
    """Fresh weights for a WanModel built from a config, as Wan2.1 initialises: xavier-uniform
    linears, zero biases, normal(0.02) time embedding, random modulation, zero output head, and
    router rows normal(router_std) (small: near-uniform routing at first). Deterministic in `seed`;
    router_std scales the router rows' draws and nothing else."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                w = m.weight
                fan_out = w.shape[0]
                fan_in = w[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif name.startswith("time_embedding") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * router_std)
            elif name.endswith(("norm_q.weight", "norm_k.weight")):
                p.fill_(1.0)
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    return model
