"""`WanTrainer`: the training loop of `moga train wan` (construction, one step, the loop, its log).

What one step does (every rank): for each clip of its share of the global batch, draw a timestep and
noise (moga.train.wan.draws); x_t = (1 - s) x0 + s noise; loss = MSE(model(x_t, 1000 s), noise - x0)
(rectified flow, as Wan trains) + the group-balancing loss (moga.attention.loss, alpha = 0.1, the
paper's form, averaged over the MoGA layers). Gradients are averaged over all ranks (see moga.train.sp
for why that is exact under sequence parallelism), clipped, and AdamW steps.

Precision: the frozen weights stay in the training dtype (bf16); the trained weights are float32 master
weights that the layers cast to the compute dtype per call, so gradients and AdamW states are float32.
Gradient checkpointing per block.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import ShardDataset
from ..sp import ParallelLayout, make_exchange
from . import export, run_state
from .distributed import average_gradients, broadcast_from_first, default_device, shard_with_fsdp, sum_step_stats
from .draws import batch_indices, draw
from .routers import add_routers, balance_terms, random_routers, routed_layers
from .settings import TrainSettings, torch_dtype


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
        from ...checkpoint import load_model
        device = device or default_device()
        model = load_model(checkpoint, device=device, dtype=torch_dtype(settings.dtype))
        return cls(model, data, settings, out_dir, source=checkpoint, **kw)

    def _setup(self) -> None:
        s, model = self.s, self.model
        cdtype = torch_dtype(s.dtype)
        self._check_data()
        resuming = run_state.latest_state(self.out) is not None
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
            from ..lora import add_lora
            names = add_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets, seed=s.seed)
            for n in names:
                m = model.get_submodule(n)
                trainable[f"{n}.lora_down"] = m.lora_down
                trainable[f"{n}.lora_up"] = m.lora_up
        elif s.mode == "full":
            from ...model import FP8_DTYPES
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
            broadcast_from_first(self.trainable.values())
        self.exchange = make_exchange(self.layout, model.config.num_heads) if self.distributed else None
        if s.fsdp:
            self._apply_fsdp()
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=s.lr, betas=s.betas,
                                           weight_decay=s.weight_decay, eps=1e-8)
        run_state.resume(self)

    def _check_data(self) -> None:
        st, cfg = self.data.settings, self.model.config
        if int(st.get("latent_channels", cfg.in_dim)) != cfg.in_dim:
            raise ValueError(f"the shards hold {st['latent_channels']}-channel latents but the model takes "
                             f"{cfg.in_dim}: prepare them with this model's VAE")
        if int(st.get("text_dim", cfg.text_dim)) != cfg.text_dim:
            raise ValueError(f"the shards hold {st['text_dim']}-dim text embeddings but the model takes "
                             f"{cfg.text_dim}: prepare them with this model's text encoder")

    def _calibrate(self) -> dict[int, torch.Tensor]:
        from ...checkpoint import calibrate_routers
        first = self.data[0]
        f, h, w = first.latent.shape[1:]
        self.log(f"calibrating {self.s.num_groups} groups per layer on {first.name} (k-means of the "
                 f"self-attention inputs)")
        return calibrate_routers(None, self.s.num_groups, range(len(self.model.blocks)), size=(f, h, w),
                                 steps=3, context=first.texts[0], seed=self.s.seed, model=self.model)

    def _apply_fsdp(self) -> None:
        if not self.distributed:
            raise ValueError("--fsdp needs torchrun (a torch.distributed process group)")
        shard_with_fsdp(self.model, self.layout.world)
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
            if s.fsdp:  # FSDP reduce-scatters only after the last micro-batch
                self.model.set_requires_gradient_sync(k == self.accum - 1)
            loss, flow, bal, r, n = self.sample_loss(idx[j], step, j)
            (loss / self.accum).backward()
            flows.append(flow)
            bals.append(bal)
            ratios = r if ratios is None else [a + b for a, b in zip(ratios, r)]
            tokens += n
        ratios = [r / self.accum for r in (ratios or [])]
        if self.distributed and not s.fsdp and self.layout.world > 1:  # FSDP averages them itself
            average_gradients(self.trainable.values(), self.layout.world)
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

    def _reduce_stats(self, flow, bal, ratios, tokens):
        n = self.s.batch
        if not self.distributed or self.layout.world == 1:
            return flow / n, bal / n, ratios, tokens
        return sum_step_stats(flow, bal, ratios, tokens, self.layout, self.accum, n, self.model.device)

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

    # -- state and output (moga.train.wan.run_state, moga.train.wan.export) ----------------------

    def _full_state(self) -> tuple[dict, dict]:
        """(trained weights, AdamW state) by parameter name, full tensors on the CPU (collective under FSDP)."""
        return run_state.full_state(self)

    def save_state(self) -> Path | None:
        """Write OUT/state/step-N/ and point OUT/state/latest at it (see moga.train.wan.run_state)."""
        return run_state.save_state(self)

    def export(self, path=None, lora_output: str | None = None) -> Path | None:
        """Write the MoGA checkpoint (rank 0); returns its path (None on other ranks)."""
        return export.export_checkpoint(self, path, lora_output)

    def export_routers(self, path) -> Path | None:
        """Write only the trained routers as a router file (see moga.train.wan.export.export_routers)."""
        return export.export_routers(self, path)

    def record(self, lora_output: str) -> dict:
        """The `moga.train` metadata: what this run was."""
        return export.train_record(self, lora_output)


__all__ = ["WanTrainer", "StepStats"]
