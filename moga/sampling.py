"""Flow-matching sampling as Wan2.1 does it: shifted sigmas, classifier-free guidance, Euler or flow UniPC.

The model predicts the velocity v = noise - data of the rectified flow x_s = (1 - s) * data + s * noise.

Schedule (Wan2.1's FlowUniPCMultistepScheduler.set_timesteps, also used here for Euler):
    base   = linspace(0.999, 0, steps + 1)[:-1]      # Wan's training sigmas run from 1 - 1/1000 to 0
    sigma  = shift * base / (1 + (shift - 1) * base)  # the shift pushes steps towards high noise
    t      = int(sigma * 1000)                        # the timestep the model sees (Wan truncates)
    sigmas = sigma + [0]                              # the solver integrates down to 0
Guidance: v = v_uncond + cfg * (v_cond - v_uncond); with cfg == 1 the unconditional pass is skipped.
Solvers:
    euler: x <- x + (sigma_next - sigma) * v
    unipc: UniPC (Zhao et al. 2023) in data prediction (x0 = x - sigma * v), B(h) = e^h - 1 ("bh2"),
           order 2 multistep predictor + corrector, first step order 1, last step order 1 (Wan's
           `lower_order_final`), which makes the last step return the model's x0 prediction.

Defaults are Wan2.1's for text-to-video (generate.py): 50 steps, shift 5.0, guidance 5.0, unipc, for
both 1.3B and 14B at 480p and 720p (generate.py only lowers shift to 3.0 for 480p image-to-video; its
README suggests guidance 6 and shift 8-12 as a tuning range for 1.3B). A checkpoint may record its
own (`model.sampler_defaults`, from the `moga.sampler.*` metadata: a distill model's 4 steps, cfg 1);
an explicit argument wins over both.

Step-distilled models (LightX2V's Wan distill LoRAs, 4 steps, cfg 1): `schedule="distill"` is their
scheduler (lightx2v WanStepDistillScheduler): timesteps 1000, 750, 500, 250 for 4 steps (1000 * (1 -
i / steps)), each shifted as above (shift 5.0), not floored, Euler down to 0:
    sigma_i = shift(t_i / 1000)  ->  1.0, 0.9375, 0.8333, 0.625, then 0
At cfg 1 no negative pass runs. Wan2.2 A14B: pass a `moga.experts.ExpertPair`; each step runs the
expert of its timestep.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

DEFAULT_STEPS = 50
DEFAULT_SHIFT = 5.0
DEFAULT_CFG = 5.0
DEFAULT_SOLVER = "unipc"
SOLVERS = ("unipc", "euler")
SCHEDULES = ("wan", "distill")
NUM_TRAIN_TIMESTEPS = 1000
# cfg > 1 runs both guidance branches as one batch of 2 on a GPU up to this many tokens (cfg_batch=None):
# the batch doubles the activations, so long videos stay two-pass unless asked (cfg_batch=True); on a
# CPU two passes stay the default (benchmarks/cfg_batch.py measures where the line belongs)
CFG_BATCH_MAX_TOKENS = 65536


class Cancelled(RuntimeError):
    """Raised by `sample` when its `cancel()` hook returns True; the run stops before the next model call."""


@dataclass(frozen=True)
class Schedule:
    sigmas: tuple[float, ...]     # steps + 1 values, from ~1 down to 0
    timesteps: tuple[float, ...]  # steps values: what the model is given at each step

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def shift_sigmas(sigmas, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma) (works on floats and tensors)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_schedule(steps: int, shift: float = DEFAULT_SHIFT,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be > 0, got {shift!r}")
    # float64 for the maths; the model still only sees integer timesteps, as in Wan.
    sigma_max = 1.0 - 1.0 / num_train_timesteps
    base = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift_sigmas(base, shift)
    timesteps = torch.floor(sigmas * num_train_timesteps)
    return Schedule(tuple(sigmas.tolist()) + (0.0,), tuple(timesteps.tolist()))


def distill_schedule(steps: int, shift: float = DEFAULT_SHIFT, timesteps=None,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """LightX2V's step-distill schedule: base timesteps `timesteps` (default 1000 * (1 - i / steps):
    1000, 750, 500, 250), sigma = shift(t / 1000), the model sees sigma * 1000 (unfloored)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if timesteps is None:
        timesteps = [num_train_timesteps * (1 - i / steps) for i in range(steps)]
    base = torch.tensor([float(t) for t in timesteps], dtype=torch.float64) / num_train_timesteps
    if base.numel() != steps or (base.numel() > 1 and not bool((base[1:] < base[:-1]).all())) \
            or float(base.max()) > 1 or float(base.min()) <= 0:
        raise ValueError(f"distill timesteps must be {steps} strictly decreasing values in (0, "
                         f"{num_train_timesteps}], got {list(timesteps)}")
    sigmas = shift_sigmas(base, shift)
    return Schedule(tuple(sigmas.tolist()) + (0.0,), tuple((sigmas * num_train_timesteps).tolist()))


def build_schedule(kind: str, steps: int, shift: float) -> Schedule:
    if kind == "wan":
        return make_schedule(steps, shift)
    if kind == "distill":
        return distill_schedule(steps, shift)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


# ---- solvers ---------------------------------------------------------------------------------
class EulerSolver:
    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


def _lambda(sigma: float) -> float:
    """log-SNR of the flow x_s = (1 - s) x0 + s eps: log(alpha / sigma); +inf at sigma = 0."""
    if sigma <= 0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class UniPCSolver:
    """Flow UniPC, data prediction, bh2, multistep order `order` (Wan: 2), with lower-order start/end.

    Step i goes from sigmas[i] to sigmas[i+1] with the model's velocity `v` at (x, sigmas[i]). Before the
    predictor, the corrector (UniC) refines x using this same model evaluation, so a step costs one call.
    """

    def __init__(self, schedule: Schedule, order: int = 2):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
        self.sigmas = schedule.sigmas
        self.order = order
        self.x0s: list[torch.Tensor] = []   # data predictions, oldest first (at most `order`)
        self.prev_x = None                  # the sample the last predictor started from
        self.prev_order = 0

    def _coefficients(self, h: float, order: int):
        """(e^{-h} - 1, B(h), b) for UniPC with data prediction; b solves the order conditions."""
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = h_phi_1  # bh2
        # b_k = k! * phi_{k+1}(hh) / B(h), via the phi recursion phi_{k+1} = (phi_k - 1/k!) / hh
        b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        return h_phi_1, B_h, b

    def _base(self, x, x0, s0: float, t: float, h_phi_1: float):
        # one exponential-integrator step with constant x0 (DDIM in flow form)
        return (t / s0) * x - (1.0 - t) * h_phi_1 * x0

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sig = self.sigmas
        x0 = x - sig[i] * v
        if self.prev_x is not None:  # corrector: refit the step from sigmas[i-1] to sigmas[i]
            x = self._correct(i, x0)
        self.x0s = (self.x0s + [x0])[-self.order:]
        remaining = len(sig) - 1 - i
        order = min(self.order, remaining, len(self.x0s))
        self.prev_x, self.prev_order = x, order
        return self._predict(i, x, order)

    def _predict(self, i: int, x, order: int):
        sig = self.sigmas
        s0, t = sig[i], sig[i + 1]
        if t == 0.0:  # lambda = inf (always an order-1 step): it lands on the data prediction itself
            return self.x0s[-1].clone()
        lam0, h = _lambda(s0), _lambda(t) - _lambda(s0)
        h_phi_1, B_h, b = self._coefficients(h, order)
        m0 = self.x0s[-1]
        out = self._base(x, m0, s0, t, h_phi_1)
        if order >= 2:
            rks, D = [], []
            for k in range(1, order):
                rk = (_lambda(sig[i - k]) - lam0) / h
                rks.append(rk)
                D.append((self.x0s[-(k + 1)] - m0) / rk)
            if order == 2:
                rhos = [0.5]  # Wan (after diffusers) fixes the order-2 predictor weight at 1/2
            else:
                rhos = _solve_vandermonde(rks, b[:-1])
            out = out - (1.0 - t) * B_h * sum(r * d for r, d in zip(rhos, D))
        return out

    def _correct(self, i: int, x0_new: torch.Tensor):
        sig = self.sigmas
        order = self.prev_order
        s0, t = sig[i - 1], sig[i]
        lam0, h = _lambda(s0), _lambda(t) - _lambda(s0)
        h_phi_1, B_h, b = self._coefficients(h, order)
        m0 = self.x0s[-1]
        out = self._base(self.prev_x, m0, s0, t, h_phi_1)
        rks, D = [], []
        for k in range(1, order):
            rk = (_lambda(sig[i - 1 - k]) - lam0) / h
            rks.append(rk)
            D.append((self.x0s[-(k + 1)] - m0) / rk)
        if order == 1:
            rhos = [0.5]
        else:
            rhos = _solve_vandermonde(rks + [1.0], b)
        corr = rhos[-1] * (x0_new - m0)
        for r, d in zip(rhos[:-1], D):
            corr = corr + r * d
        return out - (1.0 - t) * B_h * corr


def _solve_vandermonde(rks: list[float], b: list[float]) -> list[float]:
    """rho with sum_j rho_j * rks[j]^(k-1) = b[k-1], k = 1..len(rks) (UniPC's order conditions)."""
    n = len(rks)
    R = torch.tensor([[r ** k for r in rks] for k in range(n)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def make_solver(name: str, schedule: Schedule):
    if name == "euler":
        return EulerSolver(schedule)
    if name == "unipc":
        return UniPCSolver(schedule, order=2)
    raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")


# ---- the sampling loop -----------------------------------------------------------------------
@dataclass
class SampleResult:
    """`sample(..., return_result=True)`: the latent with its shot boundaries and timings."""
    latent: torch.Tensor                       # [1, C, F, H, W] float32
    shot_frames: tuple[int, ...]               # latent frames per shot
    latent_ranges: tuple[tuple[int, int], ...]  # [start, end) latent frames of each shot
    steps: int
    seconds: float                             # wall time of the denoising loop
    step_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def initial_noise(shape, seed: int) -> torch.Tensor:
    """The whole sequence's noise from one seeded CPU generator: the same on every device and GPU count."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def dense_step_count(dense_steps: float, steps: int, dense_warmup_steps: int | None = None) -> int:
    """How many first steps run dense attention: `dense_warmup_steps` when given (a count, e.g. 1
    of a 4-step distill run), else `dense_steps`, a fraction in [0, 1] of the steps, rounded."""
    if dense_warmup_steps is not None:
        if isinstance(dense_warmup_steps, bool) or int(dense_warmup_steps) != dense_warmup_steps \
                or not 0 <= dense_warmup_steps <= steps:
            raise ValueError(f"dense_warmup_steps is a step count in 0..{steps}, got {dense_warmup_steps!r}")
        return int(dense_warmup_steps)
    if not (0.0 <= float(dense_steps) <= 1.0):
        raise ValueError(f"dense_steps is a fraction of the steps in [0, 1], got {dense_steps!r}")
    return int(math.floor(dense_steps * steps + 0.5))


def _on_block(block_callback, step: int, call: int, calls: int) -> dict:
    """The model's on_block hook for call `call` (0-based) of a step's `calls` (nothing when no block
    progress was asked for): the callback sees the blocks done in the whole step."""
    if block_callback is None:
        return {}
    return {"on_block": lambda done, nb: block_callback(step, call * nb + done, calls * nb)}


def sampler_settings(model, steps=None, cfg=None, shift=None, solver=None, schedule=None) -> dict:
    """Explicit values, else the checkpoint's (`model.sampler_defaults`), else Wan2.1's defaults.
    The distill schedule defaults to Euler (what LightX2V integrates it with)."""
    own = dict(getattr(model, "sampler_defaults", None) or {})
    if hasattr(model, "expert_for") and not own:
        own = dict(getattr(model.high, "sampler_defaults", None) or {})
    pick = lambda v, k, d: v if v is not None else own.get(k, d)  # noqa: E731
    schedule = pick(schedule, "schedule", "wan")
    out = dict(steps=int(pick(steps, "steps", DEFAULT_STEPS)), cfg=pick(cfg, "cfg", DEFAULT_CFG),
               shift=float(pick(shift, "shift", DEFAULT_SHIFT)), schedule=schedule,
               solver=pick(solver, "solver", "euler" if schedule == "distill" else DEFAULT_SOLVER))
    if out["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {out['solver']!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return out


def _pad_text(c: torch.Tensor, length: int) -> torch.Tensor:
    if c.dim() == 2:
        c = c[None]
    pad = length - c.shape[1]
    return torch.cat([c, c.new_zeros(c.shape[0], pad, c.shape[2])], dim=1) if pad > 0 else c


@torch.inference_mode()
def sample(model, positive, negative, *, shot_frames, latent_size, steps: int | None = None,
           cfg: float | tuple | None = None, shift: float | None = None, solver: str | None = None,
           schedule: str | None = None, seed: int = 0, moga=None, dense_steps: float = 0.0,
           dense_warmup_steps: int | None = None, dense_layers=(), callback=None, cancel=None,
           device=None, dtype=None, parallel=None, channels: int | None = None, image=None,
           cfg_batch: bool | None = None, on_step=None, return_result: bool = False,
           block_callback=None):
    """Denoise the whole multi-shot latent as one sequence; returns the latent [1, C, F, H, W] (float32).

    model: a WanModel, or a `moga.experts.ExpertPair` (Wan2.2 A14B; each step runs the expert of
        its timestep, each with its own MoGA config unless `moga` is given).
    positive: one text embedding per shot ([1, L, text_dim] each; a single tensor is used for every shot).
    negative: one embedding used for every shot (None or cfg == 1: no unconditional pass).
    shot_frames: latent frames per shot (sums to F). latent_size: (F, H, W) in latent units.
    steps, cfg, shift, solver, schedule ("wan" | "distill"): None takes the checkpoint's default
        (`sampler_settings`). cfg may be (cfg_high, cfg_low) for an expert pair (Wan2.2's own
        guidance differs per expert).
    moga: the MoGAConfig for this run (None: the model's own); for an expert pair also (moga_high,
        moga_low), one per expert (each expert's routers have their own group count; None in the
        tuple: that expert's own). The first `dense_warmup_steps` steps
        (or the `dense_steps` fraction) run with `moga.replace(dense=True)`; `dense_layers` run dense
        at every step.
    image: a `moga.conditioning.ImageCondition` (start images per shot), or None.
    cfg_batch: run the two guidance branches as one batch of 2 (True), two passes (False), or (None)
        batch on a CUDA device when the latent has at most CFG_BATCH_MAX_TOKENS tokens and no sequence
        parallelism.
    callback(step, total, latent): after every step, step counted from 1. cancel(): checked before every
        model call; True raises `Cancelled` (so a run stops within one model evaluation).
    on_step(step, timestep, expert): before each step's model call (expert: "high"/"low"/"single").
    device: where the latent lives (default: the model's). dtype: cast the text embeddings to it (default:
        as given; the model casts them to its compute dtype). The latent stays float32 throughout.
    return_result: return a `SampleResult` (latent, shot boundaries, timings) instead of the tensor.
    block_callback(step, done, total): after every transformer block of the step's model calls (step
        from 1; done counts the blocks of all the step's calls, total = blocks x calls: 1 call without
        guidance or with batched guidance, else 2), for progress inside long steps; the model must
        take `on_block` (WanModel does). None: the model is called without it.
    """
    st = sampler_settings(model, steps, cfg, shift, solver, schedule)
    steps, cfg, shift, solver = st["steps"], st["cfg"], st["shift"], st["solver"]
    pair = hasattr(model, "expert_for")
    cfgs = tuple(float(c) for c in cfg) if isinstance(cfg, (tuple, list)) else (float(cfg),) * 2
    if len(cfgs) != 2 or (not pair and cfgs[0] != cfgs[1]):
        raise ValueError(f"cfg is one number (or (cfg_high, cfg_low) for an expert pair), got {cfg!r}")
    F, H, W = (int(v) for v in latent_size)
    shot_frames = tuple(int(f) for f in shot_frames)
    if not shot_frames or any(f < 1 for f in shot_frames) or sum(shot_frames) != F:
        raise ValueError(f"shot_frames {shot_frames} must be positive and sum to the latent frame count {F}")
    if isinstance(positive, torch.Tensor):
        positive = [positive] * len(shot_frames)
    positive = list(positive)
    if len(positive) != len(shot_frames):
        raise ValueError(f"{len(positive)} positive embeddings for {len(shot_frames)} shots: give one per shot")
    guided = any(c != 1.0 for c in cfgs)
    if guided and negative is None:
        raise ValueError("guidance (cfg != 1) needs a negative embedding; pass negative or set cfg=1")

    first_param = next(iter(model.parameters()), None)
    if device is None:
        device = first_param.device if first_param is not None else torch.device("cpu")
    device = torch.device(device)
    config = getattr(model, "config", None)
    if channels is None:
        channels = getattr(config, "out_dim", getattr(config, "in_dim", 16))
    conditioning = getattr(config, "conditioning", "none")
    if image is None and conditioning in ("concat", "clip+concat"):
        raise ValueError(f"{config.name} is an image-to-video model: pass image= "
                         f"(moga.conditioning.image_condition with a start image for shot 1)")
    n_dense = dense_step_count(dense_steps, steps, dense_warmup_steps)
    nets = (model.high, model.low) if pair else (model,)
    if isinstance(moga, (tuple, list)):
        if not pair or len(moga) != 2:
            raise ValueError(f"moga is one MoGAConfig (or (moga_high, moga_low) for an expert pair), got "
                             f"{len(moga)} configs for {'an expert pair' if pair else 'one model'}")
        given = dict(zip(map(id, nets), moga))
    else:
        given = {id(m): moga for m in nets}
    base_cfgs = {id(m): given[id(m)] if given[id(m)] is not None else getattr(m, "moga_config", None)
                 for m in nets}
    if n_dense and any(c is None for c in base_cfgs.values()):
        raise ValueError("dense warm-up needs a MoGA config: pass moga= or use a model with moga_config")
    dense_layers = tuple(dense_layers)

    # text embeddings move once; the model casts them to its compute dtype (or to `dtype` if given)
    positive = [p.to(device=device, dtype=dtype or p.dtype) for p in positive]
    neg = negative.to(device=device, dtype=dtype or negative.dtype) if (negative is not None and guided) else None
    extra = image.model_kwargs() if image is not None else {}
    if "y" in extra:
        extra["y"] = extra["y"].to(device)

    schedule_ = build_schedule(st["schedule"], steps, shift)
    stepper = make_solver(solver, schedule_)
    x = initial_noise((1, channels, F, H, W), seed).to(device)
    if image is not None:
        x = image.apply(x)
    batch_ctx = None
    if neg is not None:
        batch_ctx = _batched_contexts(config, positive, neg, F * H * W, cfg_batch, parallel, device)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("sampling cancelled")

    step_seconds = []
    start = time.perf_counter()
    for i in range(schedule_.steps):
        t0 = time.perf_counter()
        check_cancel()
        ts = schedule_.timesteps[i]
        net = model.expert_for(ts) if pair else model
        which = model.name_for(ts) if pair else "single"
        scale = cfgs[0] if which != "low" else cfgs[1]
        if on_step is not None:
            on_step(i, ts, which)
        base_cfg = base_cfgs[id(net)]
        run_cfg = base_cfg.replace(dense=True) if i < n_dense else base_cfg
        t = image.timesteps(ts, device) if image is not None else torch.full((1,), ts, device=device)
        xin = x  # float32: the model embeds it in float32 (an fp8/bf16 cast here would lose precision)
        kwargs = dict(shot_frames=shot_frames, moga=run_cfg, dense_layers=dense_layers, parallel=parallel, **extra)
        if neg is not None and scale != 1.0 and batch_ctx is not None:
            both = net(torch.cat([xin, xin]), t.expand(2, *t.shape[1:]), batch_ctx, **kwargs,
                       **_on_block(block_callback, i + 1, 0, 1)).float()
            v, v_uncond = both[:1], both[1:]
            v = v_uncond + scale * (v - v_uncond)
        else:
            calls = 2 if (neg is not None and scale != 1.0) else 1
            v = net(xin, t, positive, **kwargs, **_on_block(block_callback, i + 1, 0, calls)).float()
            if calls == 2:
                check_cancel()
                v_uncond = net(xin, t, neg, **kwargs, **_on_block(block_callback, i + 1, 1, calls)).float()
                v = v_uncond + scale * (v - v_uncond)
        x = stepper.step(i, x, v)
        if image is not None:
            x = image.apply(x)
        step_seconds.append(time.perf_counter() - t0)
        if callback is not None:
            callback(i + 1, schedule_.steps, x)
    total = time.perf_counter() - start
    if not return_result:
        return x
    ranges, s = [], 0
    for f in shot_frames:
        ranges.append((s, s + f))
        s += f
    return SampleResult(x, shot_frames, tuple(ranges), schedule_.steps, total, step_seconds)


def _batched_contexts(config, positive, neg, latent_positions: int, cfg_batch, parallel, device):
    """Per shot [2, L, D] (cond, uncond) for the one-pass CFG, or None for two passes. The texts
    are zero-padded to text_len, which the model does to each anyway, so the batch computes what
    the two passes do; a text longer than text_len cannot be padded to match, so it stays two-pass."""
    if cfg_batch is False:
        return None
    text_len = getattr(config, "text_len", None)
    if text_len is None:
        if cfg_batch:
            raise ValueError("cfg_batch needs a model with config.text_len (a Wan DiT)")
        return None
    fits = all(c.shape[-2] <= text_len for c in [*positive, neg])
    if not fits:
        if cfg_batch:
            raise ValueError(f"cfg_batch: a text embedding is longer than the model's text_len {text_len}; "
                             f"the two branches cannot share one batch (use cfg_batch=False)")
        return None
    if cfg_batch is None:
        patch = math.prod(getattr(config, "patch_size", (1, 2, 2)))
        if device.type != "cuda" or parallel is not None or latent_positions // patch > CFG_BATCH_MAX_TOKENS:
            return None
    pn = _pad_text(neg, text_len)
    done, out = {}, []
    for p in positive:
        if id(p) not in done:
            done[id(p)] = torch.cat([_pad_text(p, text_len), pn.to(p.dtype)], dim=0)
        out.append(done[id(p)])
    return out
