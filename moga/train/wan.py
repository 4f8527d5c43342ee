"""`moga train wan`: fine-tune a Wan2.1 checkpoint into a MoGA checkpoint (and `moga train prepare`).

    moga train prepare CLIPS --out SHARDS --text-encoder WAN_DIR --vae WAN_DIR/vae --width 832 --height 480
    moga train wan --model wan2.1_t2v_1.3B_bf16.safetensors --data SHARDS --out RUN --mode routers --steps 1000
    torchrun --nproc-per-node 8 -m moga train wan ... --sp 2      # 4 data-parallel groups of 2 GPUs

What one step does (every rank): for each clip of its share of the global batch, draw a timestep and
noise from a generator seeded by (seed, step, position in the global batch), so any world size and any
resume sees the same draws; x_t = (1 - s) x0 + s noise; loss = MSE(model(x_t, 1000 s), noise - x0)
(rectified flow, as Wan trains) + the group-balancing loss (moga.attention.loss, alpha = 0.1, the
paper's form, averaged over the MoGA layers). Gradients are averaged over all ranks (see moga.train.sp
for why that is exact under sequence parallelism), clipped, and AdamW steps.

Modes: "routers" (the base frozen), "lora" (routers + LoRA on the attention and FFN projections),
"full" (every weight). Precision: the frozen weights stay in the training dtype (bf16); the trained
weights are float32 master weights that the layers cast to the compute dtype per call, so gradients
and AdamW states are float32. Gradient checkpointing per block. Sequence parallel (`--sp P`: Ulysses,
routing before the all-to-all) inside groups of P ranks, data parallel across groups, FSDP
(`--fsdp`, torch.distributed.fsdp.fully_shard) for weights that do not fit one GPU.

Resume: `OUT/state/` holds the trained weights, AdamW's moments, the step and the RNG state
(safetensors + JSON). The data order is a seeded permutation per epoch and every draw is seeded by
the step, so a resumed run continues exactly as an uninterrupted one.

Output: `OUT/moga.safetensors`, a MoGA checkpoint in the input's key layout: the input's tensors
(byte-copied where training did not change them), the routers, trained or LoRA-merged weights in the
input's dtype, and metadata `moga.fusion = mean` (trained routers) plus `moga.train` (a JSON record of
the run). `--lora-output separate` keeps the base weights and writes `OUT/lora.safetensors`
(ComfyUI's LoRA key names) instead of merging. `--routers-out FILE` also writes only the trained
routers as a router file (moga.checkpoint.router_file, with the fingerprint of `--model`), for ComfyUI's
MoGA Router Loader on core's own model.

Shared with the demo model's generic trainer (moga.train.trainer): the objective (`shift_sigma`, the
balance loss) and the on-disk state format (moga.train.state). Its own loop adds what a Wan checkpoint
needs: clips of different shapes (one per forward, gradient accumulation), frozen bf16 weights beside
float32 trained ones, LoRA, sequence/data parallel, FSDP, and the MoGA checkpoint export.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import MoGAConfig
from ..attention.loss import balance_loss
from ..attention.router import Router
from .data import ShardDataset
from .sp import ParallelLayout, make_exchange
from .trainer import shift_sigma

MODES = ("routers", "lora", "full")
ROUTER_INITS = ("auto", "checkpoint", "calibrate", "random")
DEFAULT_LR = {"routers": 1e-3, "lora": 1e-4, "full": 1e-5}  # full: the paper's constant 1e-5
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STATE_DIR = "state"
OUTPUT_NAME = "moga.safetensors"
LORA_NAME = "lora.safetensors"


@dataclass
class TrainSettings:
    mode: str = "routers"
    steps: int = 1000
    lr: float | None = None               # None: DEFAULT_LR[mode]
    warmup: int = 0                       # linear warm-up steps, then constant (the paper: constant)
    batch: int = 1                        # clips per step, over all data-parallel groups
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    clip_grad: float = 1.0                # 0: no clipping
    balance_weight: float = 0.1           # alpha of the group-balancing loss (the paper's 0.1)
    balance_form: str = "paper"           # "paper" (Eq. 8) or "switch"
    shift: float = 5.0                    # timestep sampling: s = shift u / (1 + (shift - 1) u)
    num_groups: int = 5                   # M for new routers (the paper's 5 for Wan2.1)
    window: str = "0,2,2"
    context_frames: int = 1
    routers: str = "auto"                 # auto: the checkpoint's if it has them, else calibrate
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str = "self_attn,cross_attn,ffn"
    lora_output: str = "merged"           # merged | separate
    dtype: str = "bfloat16"               # storage of frozen weights and compute dtype
    grad_checkpointing: bool = True
    seed: int = 0
    save_every: int = 100
    sp: int = 1
    fsdp: bool = False
    backend: str = "auto"                 # varlen kernel

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.routers not in ROUTER_INITS:
            raise ValueError(f"routers must be one of {ROUTER_INITS}, got {self.routers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.lora_output not in ("merged", "separate"):
            raise ValueError(f"lora_output must be 'merged' or 'separate', got {self.lora_output!r}")
        if self.balance_form not in ("paper", "switch"):
            raise ValueError(f"balance_form must be 'paper' or 'switch', got {self.balance_form!r}")
        for name in ("steps", "batch", "sp", "num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.warmup < 0:
            raise ValueError("save_every and warmup must be >= 0")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        self.betas = tuple(float(b) for b in self.betas)
        MoGAConfig.parse_window(self.window)

    def moga_config(self, num_groups: int) -> MoGAConfig:
        return MoGAConfig(num_groups=num_groups, window=MoGAConfig.parse_window(self.window),
                          context_frames=self.context_frames, fusion="mean", backend=self.backend)

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr


# ---- the pieces of one step (plain functions) -----------------------------------------------------


def _seed_of(*parts: int) -> int:
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def draw(seed: int, step: int, index: int, shape, shift: float) -> tuple[float, torch.Tensor]:
    """(sigma, noise) of global-batch position `index` at `step`: a CPU generator seeded by all three,
    so the draw does not depend on the rank, the device or on resuming."""
    g = torch.Generator().manual_seed(_seed_of(seed, step, index))
    u = torch.rand((), generator=g, dtype=torch.float64)
    return float(shift_sigma(u, shift)), torch.randn(tuple(shape), generator=g)


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(_seed_of(seed, 1_000_003, epoch))
    return torch.randperm(count, generator=g).tolist()


def batch_indices(seed: int, step: int, batch: int, count: int) -> list[int]:
    """Dataset indices of the global batch of `step`: consecutive positions of seeded per-epoch orders."""
    out, cache = [], {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch = pos // count
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, count)
        out.append(cache[epoch][pos % count])
    return out


def routed_layers(model) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if b.self_attn.router is not None]


def balance_terms(model, layers, weight: float, form: str):
    """(balance loss averaged over layers, per-layer max/mean group size) from the last forward."""
    losses, ratios = [], []
    for i in layers:
        r = model.blocks[i].self_attn.last_routing
        if r is None:
            raise RuntimeError(f"layer {i} recorded no routing: was the forward run with MoGA on?")
        m = r.num_groups
        if weight:
            losses.append(balance_loss(r.probs, r.group_ids, m, weight=weight, form=form))
        counts = torch.bincount(r.group_ids.reshape(-1), minlength=m).float()
        ratios.append(float(counts.max() / counts.mean()))
    loss = torch.stack(losses).mean() if losses else None
    return loss, ratios


def add_routers(model, weights: dict[int, torch.Tensor]) -> None:
    """Give layers routers (float32) and update the model's config to say so."""
    m = {w.shape[0] for w in weights.values()}
    if len(m) != 1:
        raise ValueError("every router needs the same group count")
    m = m.pop()
    for i, w in weights.items():
        attn = model.blocks[i].self_attn
        attn.router = Router(model.config.dim, m, device=model.device, dtype=torch.float32)
        with torch.no_grad():
            attn.router.weight.copy_(w.to(attn.router.weight.device, torch.float32))
    layers = tuple(sorted(set(model.config.moga_layers) | set(weights)))
    model.config = model.config.replace(num_groups=m, moga_layers=layers)


def random_routers(model, num_groups: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(_seed_of(seed, 7))
    dim = model.config.dim
    return {i: torch.randn(num_groups, dim, generator=g) / math.sqrt(dim) for i in range(len(model.blocks))}


# ---- the trainer --------------------------------------------------------------------------------


@dataclass
class StepStats:
    step: int
    loss: float
    flow: float
    balance: float
    group_ratio: list = field(default_factory=list)  # per MoGA layer: max / mean group size
    lr: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    grad_norm: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["balance_max"] = max(self.group_ratio) if self.group_ratio else 0.0
        d["balance_mean"] = sum(self.group_ratio) / len(self.group_ratio) if self.group_ratio else 0.0
        return d


class WanTrainer:
    """Fine-tunes a WanModel (from `moga.checkpoint.load_model`) on prepared shards.

        trainer = WanTrainer.from_checkpoint(ckpt, ShardDataset(shards), TrainSettings(...), out_dir)
        trainer.run()            # resumes from out_dir/state when it exists
        trainer.export()         # out_dir/moga.safetensors

    Distributed: call under torchrun with torch.distributed initialised (see `init_distributed`);
    `settings.sp` ranks form one sequence-parallel group.
    """

    def __init__(self, model, data: ShardDataset, settings: TrainSettings, out_dir, source=None,
                 log: Callable[[str], None] | None = print, progress: bool = True):
        self.model, self.data, self.s = model, data, settings
        self.out = Path(out_dir)
        self.source = None if source is None else str(source)
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.step = 0
        self.history: list[StepStats] = []
        self.routers_init = "checkpoint"
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.layout = ParallelLayout(rank, world, settings.sp)
        if settings.batch % self.layout.dp:
            raise ValueError(f"batch {settings.batch} must be a multiple of the data-parallel size "
                             f"{self.layout.dp} (world {world} / sp {settings.sp})")
        self.accum = settings.batch // self.layout.dp
        self.is_main = rank == 0
        self._setup()

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, checkpoint, data: ShardDataset, settings: TrainSettings, out_dir, device=None,
                        **kw) -> "WanTrainer":
        from ..checkpoint import load_model
        device = device or default_device()
        model = load_model(checkpoint, device=device, dtype=DTYPES[settings.dtype])
        return cls(model, data, settings, out_dir, source=checkpoint, **kw)

    def _setup(self) -> None:
        s, model = self.s, self.model
        cdtype = DTYPES[s.dtype]
        self._check_data()
        resuming = self._latest_state() is not None
        if s.routers in ("calibrate", "random") or not routed_layers(model):
            if s.routers == "checkpoint":
                raise ValueError("routers='checkpoint' but the checkpoint has no routers: use 'calibrate' "
                                 "or 'random' (or `moga patch` it first)")
            how = "random" if (s.routers == "random" or resuming) else "calibrate"
            if how == "calibrate" and s.fsdp:
                raise ValueError("calibrating routers needs the whole model on one device, which --fsdp "
                                 "avoids: run `moga patch --groups M` on the checkpoint first, or use "
                                 "--routers random")
            for i in routed_layers(model):
                model.blocks[i].self_attn.router = None
            model.config = model.config.replace(num_groups=0, moga_layers=())
            weights = random_routers(model, s.num_groups, s.seed) if how == "random" else self._calibrate()
            add_routers(model, weights)
            self.routers_init = "random" if s.routers == "random" else how
        self.num_groups = model.config.num_groups
        self.moga = s.moga_config(self.num_groups)
        model.moga_config = self.moga
        self.layers = routed_layers(model)
        for i in self.layers:
            model.blocks[i].self_attn.record_routing = True
        model.compute_dtype = cdtype
        model.gradient_checkpointing = bool(s.grad_checkpointing)
        model.requires_grad_(False)

        trainable: dict[str, torch.nn.Parameter] = {}
        for i in self.layers:
            trainable[f"blocks.{i}.self_attn.router.weight"] = model.blocks[i].self_attn.router.weight
        if s.mode == "lora":
            from .lora import add_lora
            names = add_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets, seed=s.seed)
            for n in names:
                m = model.get_submodule(n)
                trainable[f"{n}.lora_down"] = m.lora_down
                trainable[f"{n}.lora_up"] = m.lora_up
        elif s.mode == "full":
            from ..model import FP8_DTYPES
            for n, p in model.named_parameters():
                if p.dtype in FP8_DTYPES:
                    raise ValueError("full fine-tuning needs bf16/fp16/fp32 weights, this checkpoint has fp8 "
                                     "ones: train from the bf16 release")
                trainable[n] = p
        for p in trainable.values():  # float32 master weights, cast per call by the layers
            p.data = p.data.float()
            p.requires_grad_(True)
        self.trainable = trainable
        if self.distributed:
            self._broadcast_trainable()
        self.exchange = make_exchange(self.layout, model.config.num_heads) if self.distributed else None
        if s.fsdp:
            self._apply_fsdp()
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=s.lr, betas=s.betas,
                                           weight_decay=s.weight_decay, eps=1e-8)
        self._resume()

    def _check_data(self) -> None:
        st, cfg = self.data.settings, self.model.config
        if int(st.get("latent_channels", cfg.in_dim)) != cfg.in_dim:
            raise ValueError(f"the shards hold {st['latent_channels']}-channel latents but the model takes "
                             f"{cfg.in_dim}: prepare them with this model's VAE")
        if int(st.get("text_dim", cfg.text_dim)) != cfg.text_dim:
            raise ValueError(f"the shards hold {st['text_dim']}-dim text embeddings but the model takes "
                             f"{cfg.text_dim}: prepare them with this model's text encoder")

    def _calibrate(self) -> dict[int, torch.Tensor]:
        from ..checkpoint import calibrate_routers
        first = self.data[0]
        f, h, w = first.latent.shape[1:]
        self.log(f"calibrating {self.s.num_groups} groups per layer on {first.name} (k-means of the "
                 f"self-attention inputs)")
        return calibrate_routers(None, self.s.num_groups, range(len(self.model.blocks)), size=(f, h, w),
                                 steps=3, context=first.texts[0], seed=self.s.seed, model=self.model)

    def _broadcast_trainable(self) -> None:
        dist = torch.distributed
        with torch.no_grad():
            for p in self.trainable.values():
                dist.broadcast(p.data, src=0)

    def _apply_fsdp(self) -> None:
        if not self.distributed:
            raise ValueError("--fsdp needs torchrun (a torch.distributed process group)")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        import warnings
        # FSDP2 warns that a wrapped module returns a view (cross_attn.kv's transposes, the model's
        # cropped output); nothing here writes into those views in place (the FSDP test checks the update)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        dev = self.model.device
        mesh = init_device_mesh(dev.type, (self.layout.world,))
        # No FSDP casts: the layers cast weights to the compute dtype per call, and Wan computes the
        # residual stream, modulation, norms, embeddings and head in float32. A bf16 param_dtype rounded
        # those weights and cast a block's float32 inputs (x, e): the loss moved by ~0.7% (test). So
        # weights are gathered as stored (trained ones float32: twice the bytes of a bf16 gather).
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in self.model.blocks:
            # the model computes the text's keys/values outside the block's forward: its own unit
            fully_shard(block.cross_attn, mesh=mesh, mp_policy=mp)
            register_fsdp_forward_method(block.cross_attn, "kv")
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(self.model, mesh=mesh, mp_policy=mp)
        self.trainable = {n: p for n, p in self.model.named_parameters() if n in self.trainable}

    # -- one step ---------------------------------------------------------------------------------

    def sample_loss(self, index: int, step: int, j: int):
        """(loss tensor, flow value, balance value, group ratios, tokens) of global-batch position j."""
        sample = self.data[index]
        model = self.model
        dev = model.device
        x0 = sample.latent[None].float()
        sigma, noise = draw(self.s.seed, step, j, x0.shape, self.s.shift)
        xt = ((1 - sigma) * x0 + sigma * noise).to(dev)
        target = (noise - x0).to(dev)
        t = torch.tensor([sigma * 1000.0], device=dev)
        texts = [c.to(dev) for c in sample.texts]
        pred = model(xt, t, texts, shot_frames=sample.shot_frames, moga=self.moga, parallel=self.exchange)
        flow = F.mse_loss(pred.float(), target)
        bal, ratios = balance_terms(model, self.layers, self.s.balance_weight, self.s.balance_form)
        loss = flow if bal is None else flow + bal
        return loss, float(flow.detach()), float(bal.detach()) if bal is not None else 0.0, ratios, sample.tokens

    def train_step(self) -> StepStats:
        s, step = self.s, self.step
        t0 = time.perf_counter()
        idx = batch_indices(s.seed, step, s.batch, len(self.data))
        lo = self.layout.dp_rank * self.accum
        flows, bals, ratios, tokens = [], [], None, 0
        for k, j in enumerate(range(lo, lo + self.accum)):
            self._grad_sync(k == self.accum - 1)
            loss, flow, bal, r, n = self.sample_loss(idx[j], step, j)
            (loss / self.accum).backward()
            flows.append(flow)
            bals.append(bal)
            ratios = r if ratios is None else [a + b for a, b in zip(ratios, r)]
            tokens += n
        ratios = [r / self.accum for r in (ratios or [])]
        self._reduce_grads()
        norm = 0.0
        params = list(self.trainable.values())
        if s.clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(params, s.clip_grad))
        lr = s.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        flow, bal, ratios, tokens = self._reduce_stats(sum(flows), sum(bals), ratios, tokens)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.step += 1
        stats = StepStats(step=self.step, loss=flow + bal, flow=flow, balance=bal, group_ratio=ratios,
                          lr=lr, tokens=tokens, seconds=time.perf_counter() - t0, grad_norm=norm)
        self.history.append(stats)
        return stats

    def _grad_sync(self, last: bool) -> None:
        if self.s.fsdp:  # FSDP reduce-scatters only after the last micro-batch
            self.model.set_requires_gradient_sync(last)

    def _reduce_grads(self) -> None:
        """Average gradients over every rank (FSDP does it itself)."""
        if not self.distributed or self.s.fsdp or self.layout.world == 1:
            return
        dist = torch.distributed
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable.values()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.layout.world
        off = 0
        for p, g in zip(self.trainable.values(), grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(g).clone()
            off += n

    def _reduce_stats(self, flow, bal, ratios, tokens):
        n = self.s.batch
        if not self.distributed or self.layout.world == 1:
            return flow / n, bal / n, ratios, tokens
        dist = torch.distributed
        dev = self.model.device
        # every rank of a sequence-parallel group holds the same values: count each group once
        keep = 1.0 if self.layout.sp_rank == 0 else 0.0
        vec = torch.tensor([flow * keep, bal * keep, tokens * keep] + [r * keep * self.accum for r in ratios],
                           dtype=torch.float64, device=dev)
        dist.all_reduce(vec)
        vec = vec.cpu().tolist()
        return vec[0] / n, vec[1] / n, [r / n for r in vec[3:]], int(vec[2])

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> list[StepStats]:
        """Train up to `settings.steps` (or `stop_after` more steps); saves state every `save_every`
        steps, at the end, and when interrupted (Ctrl-C)."""
        end = self.s.steps if stop_after is None else min(self.s.steps, self.step + stop_after)
        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.s.steps, initial=self.step, desc=f"train {self.s.mode}", unit="step")
        self.out.mkdir(parents=True, exist_ok=True)
        done = []
        try:
            while self.step < end:
                st = self.train_step()
                done.append(st)
                self._write_log(st)
                if bar is not None:
                    d = st.to_json()
                    bar.set_postfix(loss=f"{st.loss:.4f}", bal=f"{d['balance_max']:.2f}",
                                    lr=f"{st.lr:.1e}", tok_s=f"{st.tokens_per_s:.0f}")
                    bar.update(1)
                if self.s.save_every and self.step % self.s.save_every == 0 and self.step < end:
                    self.save_state()
        except KeyboardInterrupt:
            self.log(f"interrupted at step {self.step}: saving the state (resume with the same command)")
            self.save_state()
            raise
        finally:
            if bar is not None:
                bar.close()
        self.save_state()
        return done

    def _write_log(self, st: StepStats) -> None:
        if not self.is_main:
            return
        d = st.to_json()
        if self.model.device.type == "cuda":
            d["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.model.device) / 2**30
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(d) + "\n")

    # -- state ------------------------------------------------------------------------------------

    def _full_state(self) -> tuple[dict, dict]:
        """(trained weights, AdamW state) by parameter name, full tensors (on CPU)."""
        if self.s.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.model, options=opts)
            osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            weights = {n: msd[n] for n in self.trainable if n in msd}
            optim = {n: osd["state"][n] for n in self.trainable if n in osd.get("state", {})}
            return weights, optim
        weights = {n: p.detach().float().cpu() for n, p in self.trainable.items()}
        optim = {n: self.optimizer.state[p] for n, p in self.trainable.items() if p in self.optimizer.state}
        return weights, optim

    def _fingerprint(self) -> dict:
        s = {k: v for k, v in asdict(self.s).items() if k not in ("steps", "save_every")}
        s["betas"] = list(s["betas"])
        names = [(x["name"], x["latent_shape"]) for x in self.data.samples]
        data = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
        return {"settings": s, "data": data, "clips": len(self.data), "world": self.layout.world}

    def save_state(self) -> Path | None:
        """Write OUT/state/step-N/ (the format of moga.train.state: weights.safetensors with the trained
        tensors, optimizer.safetensors, rng.safetensors, state.json) and point OUT/state/latest at it."""
        from .state import save_tensors, write_json
        weights, optim = self._full_state()
        if not self.is_main:
            self._barrier()
            return None
        root = self.out / STATE_DIR
        root.mkdir(parents=True, exist_ok=True)
        folder = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_tensors(tmp / "weights.safetensors", weights)
        # moga.train.state's optimizer naming: "{field}/{parameter name}"
        save_tensors(tmp / "optimizer.safetensors",
                     {f"{k}/{n}": (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu()
                      for n, st in optim.items() for k, v in st.items()})
        rng = {"torch": torch.get_rng_state()}
        if self.model.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.model.device)
        save_tensors(tmp / "rng.safetensors", rng)
        write_json(tmp / "state.json", dict(step=self.step, routers_init=self.routers_init,
                                            **self._fingerprint(),
                                            history=[h.to_json() for h in self.history[-1:]]))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        (root / "latest.part").write_text(folder.name, encoding="utf-8")
        os.replace(root / "latest.part", root / "latest")
        for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return folder

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _latest_state(self) -> Path | None:
        latest = self.out / STATE_DIR / "latest"
        if not latest.is_file():
            return None
        folder = self.out / STATE_DIR / latest.read_text(encoding="utf-8").strip()
        return folder if (folder / "state.json").is_file() else None

    def _resume(self) -> None:
        folder = self._latest_state()
        if folder is None:
            return
        from .state import load_tensors, read_json
        meta = read_json(folder / "state.json")
        mine = self._fingerprint()
        for key in ("data", "clips"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"{self.out} holds a run on other data ({key} differs): give a new --out, or "
                                 f"the same --data to resume")
        diff = {k: (meta["settings"].get(k), v) for k, v in mine["settings"].items()
                if meta["settings"].get(k) != v and k not in ("lr", "warmup", "clip_grad", "backend")}
        if diff:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{self.out} holds a run with other settings ({what}): use the same settings "
                             f"to resume, or a new --out")
        weights = load_tensors(folder / "weights.safetensors")
        missing = [n for n in self.trainable if n not in weights]
        if missing:
            raise ValueError(f"the saved state lacks {missing[:3]}: it belongs to another run")
        state: dict[str, dict] = {}
        for key, v in load_tensors(folder / "optimizer.safetensors").items():
            k, _, n = key.partition("/")
            state.setdefault(n, {})[k] = v
        self._load_full_state(weights, state)
        rng = load_tensors(folder / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.model.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.model.device)
        self.step = int(meta["step"])
        self.routers_init = meta.get("routers_init", self.routers_init)
        self.log(f"resumed from {folder} at step {self.step}")

    def _load_full_state(self, weights: dict, state: dict) -> None:
        if self.s.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, weights, options=opts)
            groups = [{"params": list(self.trainable), **{k: v for k, v in g.items() if k != "params"}}
                      for g in self.optimizer.param_groups]
            full = {"state": {n: {k: (v if k != "step" else v.reshape(())) for k, v in st.items()}
                              for n, st in state.items()}, "param_groups": groups}
            set_optimizer_state_dict(self.model, self.optimizer, full, options=opts)
            return
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(weights[n].to(p.device, p.dtype))
        for n, p in self.trainable.items():
            if n in state:
                st = {k: v.to(p.device) if k != "step" else v.reshape(()) for k, v in state[n].items()}
                self.optimizer.state[p] = st

    # -- output -----------------------------------------------------------------------------------

    def export(self, path=None, lora_output: str | None = None) -> Path | None:
        """Write the MoGA checkpoint (rank 0); returns its path (None on other ranks)."""
        from ..checkpoint import (FORMAT_VERSION, moga_metadata, plan_checkpoint, router_key,
                                  write_safetensors)
        lora_output = lora_output or self.s.lora_output
        weights, _ = self._full_state()
        if not self.is_main:
            self._barrier()
            return None
        path = Path(path) if path else self.out / OUTPUT_NAME
        if self.source is None:
            raise ValueError("export needs the source checkpoint (WanTrainer(..., source=path))")
        plan = plan_checkpoint(self.source)
        src, names = plan.source, dict(plan.names)
        new: dict[str, torch.Tensor] = {}
        lora = {n[: -len(".lora_down")]: (weights[n], weights[n[: -len("down")] + "up"])
                for n in weights if n.endswith(".lora_down")}
        scale = self.s.lora_rank if self.s.lora_alpha is None else self.s.lora_alpha
        scale = float(scale) / self.s.lora_rank
        for canon, w in weights.items():
            if canon.endswith((".lora_down", ".lora_up")):
                continue
            if canon.endswith(".self_attn.router.weight"):
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
                if base.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    raise ValueError(f"{key} is stored as {base.dtype}: LoRA cannot be merged into it without "
                                     f"loss; use --lora-output separate")
                new[key] = (base.float() + (up.float() @ down.float()) * scale).to(base.dtype)
        replaced = set(new)
        copy = {k: src for k in src.keys() if k not in replaced}
        meta = {k: v for k, v in src.metadata.items()
                if not k.startswith("moga.") or k in ("moga.num_heads", "moga.extras")}
        cfg = self.model.config
        if cfg.dim % 128 or cfg.num_heads != cfg.dim // 128:
            meta["moga.num_heads"] = str(cfg.num_heads)
        meta.update(moga_metadata(self.moga.replace(num_groups=self.num_groups), self.layers, 0.0))
        meta["moga.format_version"] = FORMAT_VERSION
        meta["moga.train"] = json.dumps(self.record(lora_output), separators=(",", ":"))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, new, meta, copy_from=copy)
        if lora and lora_output == "separate":
            from ..outputs import save_safetensors
            from .lora import COMFY_PREFIX
            sd = {}
            alpha = float(self.s.lora_rank if self.s.lora_alpha is None else self.s.lora_alpha)
            for mod, (down, up) in lora.items():
                sd[f"{COMFY_PREFIX}{mod}.lora_down.weight"] = down.float().contiguous()
                sd[f"{COMFY_PREFIX}{mod}.lora_up.weight"] = up.float().contiguous()
                sd[f"{COMFY_PREFIX}{mod}.alpha"] = torch.tensor(alpha)
            save_safetensors(sd, path.parent / LORA_NAME,
                             metadata={"moga.train": meta["moga.train"], "moga.base": Path(self.source).name})
        src.close()
        self._barrier()
        return path

    def export_routers(self, path) -> Path | None:
        """Write only the trained routers as a router file (rank 0; None on other ranks), with the fingerprint
        of the source checkpoint the run started from, for core's model through the MoGA Router Loader.
        In lora/full mode the routers were trained with changed weights: use them with the exported model
        (or the LoRA) on top of that base."""
        from ..checkpoint.router_file import file_fingerprint, write_routers
        weights, _ = self._full_state()   # collective under FSDP: every rank calls it
        if not self.is_main:
            self._barrier()
            return None
        if self.source is None:
            raise ValueError("export_routers needs the source checkpoint (WanTrainer(..., source=path))")
        suffix = ".self_attn.router.weight"
        routers = {int(n.split(".")[1]): w for n, w in weights.items() if n.endswith(suffix)}
        path = write_routers(path, routers, self.moga.replace(num_groups=self.num_groups), 0.0,
                             file_fingerprint(self.source))
        self._barrier()
        return path

    def record(self, lora_output: str) -> dict:
        """The `moga.train` metadata: what this run was."""
        import moga
        s = self.s
        last = self.history[-1].to_json() if self.history else {}
        rec = dict(mode=s.mode, steps=self.step, lr=s.lr, warmup=s.warmup, batch=s.batch,
                   balance_weight=s.balance_weight, balance_form=s.balance_form, shift=s.shift,
                   routers_init=self.routers_init, num_groups=self.num_groups, window=s.window,
                   dtype=s.dtype, seed=s.seed, world=self.layout.world, sp=s.sp, fsdp=s.fsdp,
                   base=Path(self.source).name if self.source else None, data_clips=len(self.data),
                   data_fingerprint=self._fingerprint()["data"], final_loss=last.get("loss"),
                   final_balance_max=last.get("balance_max"), moga_version=moga.__version__,
                   date=datetime.date.today().isoformat())
        if s.mode == "lora":
            rec.update(lora_rank=s.lora_rank, lora_alpha=s.lora_alpha or s.lora_rank,
                       lora_targets=s.lora_targets, lora_output=lora_output)
        return rec


# ---- processes ----------------------------------------------------------------------------------


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


# ---- command line -------------------------------------------------------------------------------


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="encode clips + captions into training shards (VAE latents, text "
                                       "embeddings), once")
    p.add_argument("source", help="a folder of clips with sidecar .json files, or a manifest (.json/.jsonl)")
    p.add_argument("--out", required=True, help="folder for the shards (new)")
    p.add_argument("--text-encoder", help="umT5 text encoder folder (a Wan2.1 diffusers folder works); needs "
                                          "the 'wan' extra")
    p.add_argument("--vae", help="Wan VAE: diffusers folder or .safetensors; needs the 'wan' extra")
    p.add_argument("--model", help="a checkpoint that brings its own text encoder and VAE (the demo model)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--max-shot-frames", type=int, default=81, help="4n+1; longer shots are cut (default 81)")
    p.add_argument("--min-shot-frames", type=int, default=5, help="4n+1; clips with a shorter shot are skipped")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="storage dtype of the shards")
    p.add_argument("--shard-gib", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def _wan_parser(sub) -> None:
    d = TrainSettings()
    p = sub.add_parser("wan", help="fine-tune a Wan2.1 checkpoint into a MoGA checkpoint")
    p.add_argument("--model", required=True, help="Wan2.1 T2V checkpoint (any key layout; MoGA or plain)")
    p.add_argument("--data", required=True, help="shard folder from `moga train prepare`")
    p.add_argument("--out", required=True, help="run folder: state/, train_log.jsonl, moga.safetensors")
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=None, help="default: routers 1e-3, lora 1e-4, full 1e-5")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--batch", type=int, default=d.batch, help="clips per step over all data-parallel groups")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad)
    p.add_argument("--balance-weight", type=float, default=d.balance_weight)
    p.add_argument("--balance-form", choices=("paper", "switch"), default=d.balance_form)
    p.add_argument("--shift", type=float, default=d.shift)
    p.add_argument("--groups", type=int, default=d.num_groups, help="M for new routers")
    p.add_argument("--window", default=d.window)
    p.add_argument("--context-frames", type=int, default=d.context_frames)
    p.add_argument("--routers", choices=ROUTER_INITS, default=d.routers)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default=d.lora_targets)
    p.add_argument("--lora-output", choices=("merged", "separate"), default=d.lora_output)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--sp", type=int, default=d.sp, help="ranks per sequence-parallel group (torchrun)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW over the ranks")
    p.add_argument("--backend", default=d.backend, help="varlen attention kernel")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help=f"checkpoint path (default OUT/{OUTPUT_NAME})")
    p.add_argument("--routers-out", default=None,
                   help="also write only the trained routers here (a router file with the fingerprint of "
                        "--model), for ComfyUI's MoGA Router Loader on core's own model; must not exist")
    p.add_argument("--quiet", action="store_true")


def cmd_prepare(args) -> int:
    from .data import PrepareSettings, describe, prepare
    settings = PrepareSettings(width=args.width, height=args.height, fps=args.fps,
                               max_shot_frames=args.max_shot_frames, min_shot_frames=args.min_shot_frames,
                               dtype=args.dtype, shard_bytes=int(args.shard_gib * 2**30))
    device = args.device or default_device()
    if args.model:
        from ..checkpoint import load_model
        m = load_model(args.model, device="cpu")
        te, vae = m.text_encoder, m.vae
        if te is None or vae is None:
            raise ValueError(f"{args.model} brings no text encoder/VAE of its own: pass --text-encoder and --vae")
        names = {"encoders": Path(args.model).name}
    else:
        if not (args.text_encoder and args.vae):
            raise ValueError("give --text-encoder and --vae (Wan2.1's umT5 and VAE), or --model with its own")
        from ..wan_io import TextEncoder, WanVAE
        te = TextEncoder.load(args.text_encoder, device=device)
        vae = WanVAE.load(args.vae, device=device)
        names = {"text_encoder": str(args.text_encoder), "vae": str(args.vae)}
    index = prepare(args.source, args.out, vae, te, settings, progress=not args.quiet,
                    log=None if args.quiet else print, encoder_names=names)
    print(describe(index))
    return 0 if index["samples"] else 1


def cmd_wan(args) -> int:
    distributed = init_distributed()
    settings = TrainSettings(
        mode=args.mode, steps=args.steps, lr=args.lr, warmup=args.warmup, batch=args.batch,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, balance_weight=args.balance_weight,
        balance_form=args.balance_form, shift=args.shift, num_groups=args.groups, window=args.window,
        context_frames=args.context_frames, routers=args.routers, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, lora_output=args.lora_output,
        dtype=args.dtype, grad_checkpointing=not args.no_grad_checkpointing, seed=args.seed,
        save_every=args.save_every, sp=args.sp, fsdp=args.fsdp, backend=args.backend)
    main_rank = not distributed or torch.distributed.get_rank() == 0
    log = print if (main_rank and not args.quiet) else None
    try:
        if args.routers_out is not None:  # before training: a bad path must not cost the run
            _check_routers_out(args.routers_out, args.model)
        data = ShardDataset(args.data)
        trainer = WanTrainer.from_checkpoint(args.model, data, settings, args.out, device=args.device,
                                             log=log, progress=main_rank and not args.quiet)
        trainer.run()
        path = trainer.export(args.output)
        routers = trainer.export_routers(args.routers_out) if args.routers_out is not None else None
        if routers is not None and log:
            from ..checkpoint.moga_format import format_layers
            print(f"wrote {routers} (routers of layers {format_layers(trainer.layers)}, "
                  f"{trainer.num_groups} groups)")
        if path is not None and log:
            last = trainer.history[-1].to_json() if trainer.history else {}
            print(f"wrote {path} (step {trainer.step}, loss {last.get('loss', float('nan')):.4f}, "
                  f"max/mean group size {last.get('balance_max', 0):.2f})")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


def _check_routers_out(path, model) -> None:
    from ..outputs import check_output
    if Path(path).exists():  # the train command has no --overwrite: never replace a file
        raise ValueError(f"--routers-out {path} already exists: choose another name (or delete it first)")
    check_output(path, "safetensors", overwrite=False, flag="--routers-out")
    if Path(path).resolve() == Path(model).resolve():
        raise ValueError(f"--routers-out {path} is the --model checkpoint: write the routers to a new file")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moga train", description="prepare data and fine-tune MoGA models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _prepare_parser(sub)
    _wan_parser(sub)
    args = parser.parse_args(argv)
    try:
        return cmd_prepare(args) if args.command == "prepare" else cmd_wan(args)
    except ValueError as e:
        print(f"moga train: error: {e}", file=sys.stderr)
        return 2


__all__ = ["WanTrainer", "TrainSettings", "StepStats", "main", "draw", "batch_indices", "balance_terms",
           "add_routers", "random_routers", "init_distributed", "MODES"]
