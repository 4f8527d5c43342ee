"""How close MoGA comes to dense attention, layer by layer, for one model evaluation (`moga inspect`).

`inspect_step(model, x, t, context, ...)` runs the model once (one denoising step's model call) and,
in every self-attention layer, compares the MoGA layer with dense attention on the same q, k, v:

- recall: the share of dense attention's probability mass that falls on the keys MoGA keeps for a
  query (the union of its routed group, its window group's keys and its frame), averaged over a
  seeded sample of queries and over heads; also per branch.
- error: ||MoGA(q, k, v) - dense(q, k, v)|| / ||dense(q, k, v)|| over all tokens and heads (the
  attention output, before the output projection; `error_proj` after it).
- group sizes of the routed branch; overlap: keys that lie in two or more branches of a query, as a
  share of the keys it keeps (`overlap`) and of dense attention mass (`overlap_mass`). The `lse`
  fusion counts such keys twice in its softmax, so overlap is where `lse` departs from a softmax
  over the union.
- attention FLOPs of the layer (4 * query-key pairs * heads * head_dim) against dense.

The MoGA output comes from the layer's fast path (`moga_attention`, whatever varlen backend is
picked) and dense from SDPA; the only score matrix ever built is [sampled queries, heads, N], in
chunks of at most `chunk_elements` scores. `stream` picks which output feeds the next layer:
"moga" (what sampling does: errors compound) or "dense" (every layer sees the dense model's inputs).
One input at a time (batch 1), one process (no sequence parallelism).

`attention_flops(model)` is a context manager that counts every self-attention call's FLOPs (and
how many calls ran dense or MoGA) during sampling; `main(args)` is the command line's `inspect`.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .attention import MoGAConfig, TokenLayout, dense_attention, moga_attention
from .attention.mixture import attention_pairs, window_groups
from .attention.router import cap_routing
from .inspect_args import STREAMS, add_arguments, build_parser  # torch-free: `moga inspect --help` is fast



# ---- one layer: recall and overlap on sampled queries ---------------------------------------------


@dataclass
class RecallStats:
    """Per sampled query (rows) and head (columns) where shaped [S, H]; per query where [S]."""

    queries: torch.Tensor        # [S] token indices
    recall: torch.Tensor         # [S, H] dense mass on the union of the kept keys
    branch_recall: dict          # branch -> [S, H] dense mass on that branch's keys
    overlap: torch.Tensor        # [S] keys in >= 2 branches / keys kept
    overlap_mass: torch.Tensor   # [S, H] dense mass on keys in >= 2 branches
    kept: torch.Tensor           # [S] keys kept / N

    def summary(self) -> dict:
        mean = lambda t: float(t.double().mean())  # noqa: E731
        per_query = self.recall.double().mean(1)
        return {"recall": mean(self.recall),
                "recall_p10": float(torch.quantile(per_query, 0.1)) if per_query.numel() else math.nan,
                "branch_recall": {b: mean(r) for b, r in self.branch_recall.items()},
                "overlap": mean(self.overlap), "overlap_mass": mean(self.overlap_mass),
                "kept": mean(self.kept)}


def _window_membership(layout: TokenLayout, cfg: MoGAConfig, device):
    """(group of every query token [N], key membership [G, N] bool) of the window branch."""
    groups = window_groups(layout, cfg.window, cfg.context_frames)
    n = layout.num_tokens
    owner = torch.full((n,), len(groups), dtype=torch.long)   # the last, empty row: no window group
    member = torch.zeros(len(groups) + 1, n, dtype=torch.bool)
    for g, (qi, ki) in enumerate(groups):
        owner[qi] = g
        member[g, ki] = True
    return owner.to(device), member.to(device)


def branch_masks(layout: TokenLayout, cfg: MoGAConfig, queries: torch.Tensor,
                 group_ids: torch.Tensor | None = None, _window=None) -> dict[str, torch.Tensor]:
    """{branch: [S, N] bool}: the keys each active branch gives each query in `queries` [S].
    group_ids [N] (batch element's routing) is needed when the routed branch is on."""
    n, tpf = layout.num_tokens, layout.tokens_per_frame
    dev = queries.device
    out = {}
    if cfg.routed:
        if group_ids is None:
            raise ValueError("the routed branch is on: pass the router's group ids")
        out["routed"] = group_ids[None, :] == group_ids[queries][:, None]
    if cfg.windowed:
        owner, member = _window if _window is not None else _window_membership(layout, cfg, dev)
        out["window"] = member[owner[queries]]
    if cfg.per_frame:
        frame = torch.arange(n, device=dev) // tpf
        out["frame"] = frame[None, :] == (queries // tpf)[:, None]
    return out


def attention_recall(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, cfg: MoGAConfig,
                     group_ids: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                     chunk_elements: int = 1 << 25) -> RecallStats:
    """Dense attention mass captured by MoGA's kept keys, for the query tokens `queries` (all when
    None). q, k [1, N, H, D] with RoPE applied (as the layer attends); group_ids [1, N] or [N].
    Scores are formed `chunk_elements` at a time ([queries in the chunk, H, N]); nothing N x N."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[0] != 1:
        raise ValueError(f"q and k must be [1, N, heads, head_dim] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}: inspect one input at a time")
    _, n, h, d = q.shape
    layout.check_tokens(n)
    dev = q.device
    if queries is None:
        queries = torch.arange(n, device=dev)
    queries = queries.to(dev).long()
    if group_ids is not None:
        group_ids = group_ids.reshape(-1).to(dev).long()
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k[0].to(work).transpose(0, 1)                   # [H, N, D]
    scale = 1.0 / math.sqrt(d)
    window = _window_membership(layout, cfg, dev) if cfg.windowed else None
    rows = max(1, int(chunk_elements) // (h * n))
    parts: dict[str, list] = {"recall": [], "overlap": [], "overlap_mass": [], "kept": []}
    branch_parts: dict[str, list] = {}
    for lo in range(0, queries.numel(), rows):
        sel = queries[lo:lo + rows]
        qc = q[0, sel].to(work).transpose(0, 1)          # [H, c, D]
        probs = torch.softmax(torch.bmm(qc, kk.transpose(1, 2)).mul_(scale), dim=-1)   # [H, c, N]
        masks = branch_masks(layout, cfg, sel, group_ids, window)
        count = sum(m.to(torch.int16) for m in masks.values())
        union, dup = count > 0, count > 1
        mass = lambda m: torch.einsum("hcn,cn->ch", probs, m.to(work))  # noqa: E731
        parts["recall"].append(mass(union))
        parts["overlap_mass"].append(mass(dup))
        parts["overlap"].append(dup.sum(1).double() / union.sum(1).clamp_min(1).double())
        parts["kept"].append(union.sum(1).double() / n)
        for b, m in masks.items():
            branch_parts.setdefault(b, []).append(mass(m))
        del probs
    cat = lambda xs: torch.cat(xs).cpu()  # noqa: E731
    return RecallStats(queries.cpu(), cat(parts["recall"]), {b: cat(v) for b, v in branch_parts.items()},
                       cat(parts["overlap"]), cat(parts["overlap_mass"]), cat(parts["kept"]))


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (Frobenius, float64)."""
    ref64 = ref.double()
    den = float(ref64.norm())
    return float((a.double() - ref64).norm()) / den if den > 0 else float((a.double()).norm())


# ---- the whole model: one evaluation --------------------------------------------------------------


@dataclass
class LayerReport:
    layer: int
    mode: str                          # "moga" or "dense" (no router, dense_layers, or config.dense)
    recall: float = 1.0
    recall_p10: float = 1.0
    branch_recall: dict = field(default_factory=dict)
    error: float = 0.0
    error_proj: float = 0.0
    overlap: float = 0.0
    overlap_mass: float = 0.0
    kept: float = 1.0
    group_sizes: list = field(default_factory=list)
    flops: float = 0.0                 # attention FLOPs of this layer's call (QK^T and PV)
    dense_flops: float = 0.0


@dataclass
class InspectReport:
    layers: list
    step_error: float                  # ||model output - dense model output|| / ||dense model output||
    tokens: int
    queries: int
    layout: str
    config: dict
    stream: str
    timestep: float

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.layers)

    @property
    def dense_flops(self) -> float:
        return sum(r.dense_flops for r in self.layers)

    def mean(self, key: str) -> float:
        rows = [getattr(r, key) for r in self.layers if r.mode == "moga"]
        return sum(rows) / len(rows) if rows else (1.0 if key in ("recall", "kept") else 0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(flops=self.flops, dense_flops=self.dense_flops,
                   mean_recall=self.mean("recall"), mean_error=self.mean("error"))
        return out

    def table(self) -> str:
        head = (f"{self.tokens} tokens ({self.layout}), t = {self.timestep:g}, {self.queries} sampled queries, "
                f"stream {self.stream}; MoGA: M = {self.config['num_groups']}, window "
                f"{tuple(self.config['window'])}, fusion {self.config['fusion']}, group capacity "
                f"{self.config.get('capacity') or 'off'}"
                f"{' (' + self.config.get('capacity_split', 'runs') + ')' if self.config.get('capacity') else ''}")
        lines = [head, "layer  mode   recall  p10     error   err_o   overlap  ov_mass  kept   groups (min/mean/max)"]
        for r in self.layers:
            sizes = (f"{min(r.group_sizes)}/{sum(r.group_sizes) / len(r.group_sizes):.0f}/{max(r.group_sizes)}"
                     if r.group_sizes else "-")
            lines.append(f"{r.layer:5d}  {r.mode:5s}  {r.recall:.4f}  {r.recall_p10:.4f}  {r.error:.4f}  "
                         f"{r.error_proj:.4f}  {r.overlap:.4f}   {r.overlap_mass:.4f}   {r.kept:.3f}  {sizes}")
        ratio = self.flops / self.dense_flops if self.dense_flops else 1.0
        lines.append(f"mean over MoGA layers: recall {self.mean('recall'):.4f}, error {self.mean('error'):.4f}; "
                     f"model output error vs dense {self.step_error:.4f}; attention FLOPs {self.flops:.3e} = "
                     f"{ratio:.3f} x dense")
        return "\n".join(lines)


def _layer_call(args, kwargs, module):
    x = args[0] if args else kwargs["x"]
    layout = args[1] if len(args) > 1 else kwargs["layout"]
    rope = args[2] if len(args) > 2 else kwargs.get("rope")
    cfg = (args[3] if len(args) > 3 else kwargs.get("config")) or module.config
    parallel = args[4] if len(args) > 4 else kwargs.get("parallel")
    return x, layout, rope, cfg, parallel


def _pairs(layout: TokenLayout, cfg: MoGAConfig, sparse: bool, group_sizes) -> tuple[int, int]:
    """(pairs computed, dense pairs) of one batch-1 attention call."""
    dense = layout.num_tokens ** 2
    if not sparse:
        return dense, dense
    pairs = attention_pairs(layout, cfg, group_sizes)
    return sum(v for key, v in pairs.items() if key != "dense"), dense


@torch.no_grad()
def inspect_step(model, x: torch.Tensor, t, context, *, shot_frames=None, moga: MoGAConfig | None = None,
                 dense_layers=(), queries: int = 256, seed: int = 0, stream: str = "moga",
                 chunk_elements: int = 1 << 25, progress=None) -> InspectReport:
    """Run `model(x, t, context, shot_frames, moga, dense_layers)` once and measure every self-attention
    layer against dense attention (see the module docstring). x [1, C, F, H, W]; `queries` query tokens
    per layer (seeded, without replacement; all tokens when N <= queries) carry the recall.
    progress(done, total): after every block of the dense reference pass and of the measured pass
    (total = 2 x blocks)."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"inspect one input at a time: x must be [1, C, F, H, W], got {tuple(x.shape)}")
    if int(queries) < 1:
        raise ValueError(f"queries must be >= 1 (query tokens sampled per layer), got {queries}")
    cfg = moga or model.moga_config
    dense_cfg = cfg.replace(dense=True)
    kwargs = dict(shot_frames=shot_frames)
    nb = len(model.blocks)
    tick = progress or (lambda done, total: None)
    reference = model(x, t, context, moga=dense_cfg, on_block=lambda b, n: tick(b, 2 * nb), **kwargs)

    reports: dict[int, LayerReport] = {}
    seen: dict[str, object] = {}
    gen = torch.Generator().manual_seed(int(seed))

    def hook(index):
        def run(module, args, kw, output):
            xin, layout, rope, lcfg, parallel = _layer_call(args, kw, module)
            if parallel is not None:
                raise ValueError("inspect runs in one process: call it without a parallel exchange")
            if xin.shape[0] != 1:
                raise ValueError("inspect one input at a time (batch 1)")
            seen["layout"] = layout
            n, heads, hd = layout.num_tokens, module.num_heads, module.head_dim
            sparse = module.router is not None and not lcfg.dense
            if not sparse:
                reports[index] = LayerReport(index, "dense", flops=4.0 * n * n * heads * hd,
                                             dense_flops=4.0 * n * n * heads * hd)
                return None
            q, k, v = module.qkv(xin, rope)
            routing = module.router(xin, num_groups=lcfg.num_groups) if lcfg.routed else None
            if routing is not None:   # the groups the layer attends in (capped when lcfg.capacity is set)
                routing = cap_routing(routing, lcfg.capacity, lcfg.capacity_split)
            fast = moga_attention(q, k, v, routing, layout, lcfg)
            exact = dense_attention(q, k, v)
            sizes = [] if routing is None else routing.group_sizes(0)
            pairs, dense_pairs = _pairs(layout, lcfg, True, [s for s in sizes if s])
            if n <= queries:
                sel = torch.arange(n)
            else:
                sel = torch.randperm(n, generator=gen)[:int(queries)].sort().values
            stats = attention_recall(q, k, layout, lcfg, None if routing is None else routing.group_ids,
                                     sel.to(q.device), chunk_elements).summary()
            out_fast = module.o(fast.flatten(2))
            out_exact = module.o(exact.flatten(2))
            reports[index] = LayerReport(
                index, "moga", recall=stats["recall"], recall_p10=stats["recall_p10"],
                branch_recall=stats["branch_recall"], error=relative_error(fast, exact),
                error_proj=relative_error(out_fast, out_exact), overlap=stats["overlap"],
                overlap_mass=stats["overlap_mass"], kept=stats["kept"], group_sizes=sizes,
                flops=4.0 * pairs * heads * hd, dense_flops=4.0 * dense_pairs * heads * hd)
            return out_exact if stream == "dense" else out_fast
        return run

    handles = [block.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(model.blocks)]
    try:
        out = model(x, t, context, moga=cfg, dense_layers=tuple(dense_layers),
                    on_block=lambda b, n: tick(nb + b, 2 * nb), **kwargs)
    finally:
        for hd in handles:
            hd.remove()
    layout = seen.get("layout")
    tt = float(torch.as_tensor(t).reshape(-1)[0])
    return InspectReport([reports[i] for i in sorted(reports)], relative_error(out, reference),
                         layout.num_tokens if layout else 0, min(int(queries), layout.num_tokens if layout else 0),
                         str(layout), _cfg_dict(cfg), stream, tt)


def _cfg_dict(cfg: MoGAConfig) -> dict:
    d = asdict(cfg)
    d["window"] = list(cfg.window)
    return d


# ---- counting attention work during sampling ------------------------------------------------------


@dataclass
class FlopCount:
    """Attention work of every self-attention call while the context was open (batch counted)."""

    flops: float = 0.0
    dense_flops: float = 0.0          # what the same calls would cost dense
    dense_calls: int = 0
    moga_calls: int = 0
    calls_by_layer: dict = field(default_factory=dict)   # layer -> ["dense" | "moga", ...] in call order

    @property
    def ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0


@contextmanager
def attention_flops(model):
    """`with attention_flops(model) as count: sample(model, ...)`: FLOPs of QK^T and PV (4 * pairs *
    heads * head_dim) of every self-attention call; a MoGA call's routed pairs come from the router's
    group sizes on that call's input (the router runs once more: N x dim x M, negligible)."""
    count = FlopCount()

    def hook(index):
        def run(module, args, kw, output):
            xin, layout, _, lcfg, parallel = _layer_call(args, kw, module)
            if parallel is not None:
                raise ValueError("attention_flops counts one process's calls: run it without parallel")
            sparse = module.router is not None and not lcfg.dense
            per = 4.0 * module.num_heads * module.head_dim
            total = dense_total = 0.0
            for b in range(xin.shape[0]):
                sizes = []
                if sparse and lcfg.routed:
                    routing = cap_routing(module.router(xin[b:b + 1], num_groups=lcfg.num_groups), lcfg.capacity,
                                          lcfg.capacity_split)
                    sizes = [s for s in routing.group_sizes(0) if s]
                pairs, dense_pairs = _pairs(layout, lcfg, sparse, sizes)
                total += per * pairs
                dense_total += per * dense_pairs
            count.flops += total
            count.dense_flops += dense_total
            if sparse:
                count.moga_calls += 1
            else:
                count.dense_calls += 1
            count.calls_by_layer.setdefault(index, []).append("moga" if sparse else "dense")
        return run

    handles = [block.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(model.blocks)]
    try:
        yield count
    finally:
        for hd in handles:
            hd.remove()


# ---- command line ---------------------------------------------------------------------------------


def _plan(args):
    from .shots import ShotPlan
    if args.shots:
        return ShotPlan.load(args.shots)
    prompts = args.prompt or ["a test scene"]
    return ShotPlan.from_prompts(prompts, seconds=args.seconds, fps=args.fps)


def _encode(model, plan, args, dtype):
    """Per-shot embeddings and a note on where they came from."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is None and args.text_encoder:
        from .wan_io import TextEncoder
        encoder = TextEncoder.load(args.text_encoder)
    if encoder is not None:
        return [e.to(model.device, dtype) for e in encoder.encode(plan.prompts())], "text encoder"
    g = torch.Generator().manual_seed(args.seed + 7)
    dim = model.config.text_dim
    return ([torch.randn(1, 16, dim, generator=g).to(model.device, dtype) for _ in plan.shots],
            "seeded random text embedding (no text encoder: pass --text-encoder)")


def main(args) -> int:
    """`moga inspect`: args is the argparse Namespace from `add_arguments` (or a list of strings)."""
    if isinstance(args, (list, tuple)):
        args = build_parser().parse_args(list(args))
    from .checkpoint import load_model, parse_layers
    from .sampling import DEFAULT_SHIFT, Cancelled, initial_noise, make_schedule, sample

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    from .checkpoint import lora_specs
    if not getattr(args, "quiet", False):
        print(f"loading {args.checkpoint} on {device}", file=sys.stderr, flush=True)
    model = load_model(args.checkpoint, device=device, dtype=dtype, loras=lora_specs(getattr(args, "lora", None)))
    if not model.config.moga_layers:
        raise ValueError(f"{args.checkpoint} has no routers: make a MoGA checkpoint first "
                         f"(`moga patch {args.checkpoint} out.safetensors --groups 5`)")
    changes = {}
    if args.groups:
        changes["num_groups"] = args.groups
    if args.fusion:
        changes["fusion"] = args.fusion
    if args.capacity is not None:
        changes["capacity"] = args.capacity
    if args.window:
        changes["window"] = MoGAConfig.parse_window(args.window)
    if args.context_frames is not None:
        changes["context_frames"] = args.context_frames
    cfg = model.moga_config.replace(**changes)
    if not 0 <= args.at < args.steps:
        raise ValueError(f"--at {args.at} must be a step in 0..{args.steps - 1}")
    plan = _plan(args)
    f, h, w = plan.latent_size(args.width, args.height)
    shot_frames = plan.latent_shot_frames()
    cdtype = next(model.parameters()).dtype
    if cdtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        cdtype = torch.bfloat16
    positive, source = _encode(model, plan, args, cdtype)
    shift = DEFAULT_SHIFT if args.shift is None else args.shift
    schedule = make_schedule(args.steps, shift)
    from tqdm import tqdm
    quiet = bool(getattr(args, "quiet", False))
    if args.at:
        done = []  # the latent after each dense step; the run stops before step `at`'s model call
        with tqdm(total=args.at, desc=f"dense steps to step {args.at}", unit="step", file=sys.stderr,
                  disable=quiet) as bar:
            try:
                sample(model, positive, None, shot_frames=shot_frames, latent_size=(f, h, w), steps=args.steps,
                       cfg=1.0, shift=shift, seed=args.seed, moga=cfg, dense_steps=1.0,
                       callback=lambda step, total, latent: (done.append(latent), bar.update(1)),
                       cancel=lambda: len(done) >= args.at)
            except Cancelled:
                pass
        x = done[-1]
    else:
        x = initial_noise((1, model.config.in_dim, f, h, w), args.seed)
    t = torch.tensor([schedule.timesteps[args.at]], device=model.device)
    nb = len(model.blocks)
    with tqdm(total=2 * nb, desc="inspect: dense reference, then each layer measured", unit="block",
              file=sys.stderr, disable=quiet) as bar:
        report = inspect_step(model, x.to(model.device, cdtype), t, positive, shot_frames=shot_frames, moga=cfg,
                              dense_layers=parse_layers(args.dense_layers) if args.dense_layers else (),
                              queries=args.queries, seed=args.seed, stream=args.stream,
                              progress=lambda done, total: bar.update(done - bar.n))
    print(f"{args.checkpoint}: step {args.at} of {args.steps}; text: {source}")
    print(report.table())
    if args.json:
        from .outputs import write_json
        write_json(args.json, dict(report.to_dict(), checkpoint=str(args.checkpoint), step=args.at,
                                   steps=args.steps, text=source))
    return 0


__all__ = ["inspect_step", "InspectReport", "LayerReport", "attention_recall", "RecallStats", "branch_masks",
           "relative_error", "attention_flops", "FlopCount", "add_arguments", "main"]
