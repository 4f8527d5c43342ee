"""MoGA's three branches and their fusion, on q, k, v [B, N, H, D] in natural (frame-major) order.

- routed: every token attends to the tokens of its router group (per batch element). Stable sort
  by (batch, group), one varlen call over the packed groups, unsort.
- window: the latent frames are cut into chunks (a whole shot when window[0] == 0, else runs of
  window[0] frames inside a shot); every frame into a rows x cols grid (ragged cells when the grid
  does not divide the frame: cell edges at floor(i * size / n)). A window group is one cell over
  the frames of one chunk; its keys/values add the same cell in `context_frames` latent frames of
  the previous and of the next chunk (fewer where that chunk is shorter; none past the video's
  ends). Query and key sets differ, so q and k have their own cumulative lengths.
- per_frame: all tokens of one latent frame (contiguous in token order: no gather).

With cfg.capacity the routed groups are first cut to the capacity (router.cap_routing: runs of
consecutive tokens, or round-robin parts with cfg.capacity_split "stride"), so every backend, and every
rank under sequence parallelism, sees the same capped groups; the gate stays the router's probability of
the token's group.

Fusion "mean" (the paper): mean over the active branches of (routed * gate, window, per_frame).
Fusion "lse": each branch also returns its log-sum-exp and the outputs merge as one softmax over
the union of the branches' key sets, weights exp(lse_b - logsumexp_b lse_b); no gate. A key that
lies in two branches of a query (e.g. its own frame is in its window group and its frame group)
counts twice in that softmax, as if it appeared twice in the key list.

Where the permutation happens is argued in docs/attention.md: after the projections, per branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoGAConfig
from .kernels import (LSE_HAS_GRAD, _triton_merge, fused_merge, resolve_backend, take_rows,
                      varlen_attention)
from .layout import TokenLayout
from .router import Routing, cap_routing


@dataclass(frozen=True)
class Segments:
    """Static packed index set of one branch for a batch: gathers and cumulative lengths."""

    q_idx: torch.Tensor | None   # [Tq] rows of the flattened [B*N] tokens, None = identity
    k_idx: torch.Tensor | None   # [Tk]
    inv_q: torch.Tensor | None   # [B*N] packed row of each token (q_idx's inverse)
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pairs: int                   # query-key pairs, summed over segments (for FLOP counts)


FUSE_ON_CPU = False  # tests: the Triton merge on the CPU (needs TRITON_INTERPRET=1)
FUSED_MERGE = True   # False: always merge with plain torch ops (benchmarks compare both)
_CACHE: dict = {}
_CACHE_SIZE = 32


def _cached(key, build):
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        with torch.inference_mode(False):  # cached index tensors may later feed autograd (training)
            hit = _CACHE[key] = build()
    return hit


def _edges(size: int, parts: int) -> list[int]:
    return [(i * size) // parts for i in range(parts + 1)]


def window_chunks(layout: TokenLayout, frames: int) -> list[tuple[int, int]]:
    """[start, end) latent-frame chunks: whole shots (frames == 0) or runs of `frames` in a shot."""
    chunks = []
    for a, b in layout.shot_ranges:
        step = (b - a) if frames == 0 else frames
        chunks += [(s, min(s + step, b)) for s in range(a, b, step)]
    return chunks


def window_groups(layout: TokenLayout, window, context_frames: int):
    """Per window group: (query token ids, key token ids), natural token order, batch of one."""
    wf, rows, cols = window
    hh, ww, tpf = layout.height, layout.width, layout.tokens_per_frame
    re, ce = _edges(hh, rows), _edges(ww, cols)
    chunks = window_chunks(layout, wf)
    groups = []
    for j, (a, b) in enumerate(chunks):
        own = list(range(a, b))
        before = list(range(max(chunks[j - 1][0], a - context_frames), a)) if j > 0 else []
        after = (list(range(b, min(chunks[j + 1][1], b + context_frames)))
                 if j + 1 < len(chunks) else [])
        for r in range(rows):
            for c in range(cols):
                rr = torch.arange(re[r], re[r + 1])
                cc = torch.arange(ce[c], ce[c + 1])
                if rr.numel() == 0 or cc.numel() == 0:
                    continue  # a grid finer than the frame leaves empty cells
                cell = (rr[:, None] * ww + cc[None, :]).flatten()
                qf, kf = torch.tensor(own), torch.tensor(before + own + after)
                groups.append(((qf[:, None] * tpf + cell).flatten(),
                               (kf[:, None] * tpf + cell).flatten()))
    return groups


def _cu(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return out


def _window_segments(layout: TokenLayout, window, context_frames: int, batch: int,
                     device) -> Segments:
    def build():
        groups = window_groups(layout, window, context_frames)
        n = layout.num_tokens
        q_idx = torch.cat([g[0] for g in groups])
        k_idx = torch.cat([g[1] for g in groups])
        lq = [len(g[0]) for g in groups] * batch
        lk = [len(g[1]) for g in groups] * batch
        offs = torch.arange(batch)[:, None] * n
        q_all = (q_idx[None] + offs).flatten()
        k_all = (k_idx[None] + offs).flatten()
        inv = torch.empty_like(q_all)
        inv[q_all] = torch.arange(q_all.numel())
        to = lambda t: t.to(device)  # noqa: E731
        return Segments(to(q_all), to(k_all), to(inv), to(_cu(lq)), to(_cu(lk)), max(lq), max(lk),
                        sum(a * b for a, b in zip(lq, lk)))
    key = ("window", layout, tuple(window), context_frames, batch, str(device))
    return _cached(key, build)


def _frame_segments(layout: TokenLayout, batch: int, device) -> Segments:
    def build():
        tpf = layout.tokens_per_frame
        cu = torch.arange(0, batch * layout.num_tokens + 1, tpf, dtype=torch.int32).to(device)
        return Segments(None, None, None, cu, cu, tpf, tpf, batch * layout.frames * tpf * tpf)
    return _cached(("frame", layout, batch, str(device)), build)


def _routed_segments(group_ids: torch.Tensor, num_groups: int):
    """(order, inverse, cu, max_len, pairs) for the routed branch; one host sync for the sizes."""
    b, n = group_ids.shape
    ids = group_ids.long()
    offs = torch.arange(b, device=ids.device)[:, None] * num_groups
    key = (ids.clamp(0, num_groups - 1) + offs).flatten()
    counts = torch.bincount(key, minlength=b * num_groups)
    stats = torch.cat([counts, ids.min().view(1), ids.max().view(1)]).tolist()
    lo, hi = stats[-2], stats[-1]
    if lo < 0 or hi >= num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups}), got values in [{lo}, {hi}]")
    sizes = [c for c in stats[:-2] if c > 0]  # empty groups make no segment
    order = torch.argsort(key, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    cu = _cu(sizes).to(ids.device)
    return order, inv, cu, max(sizes), sum(c * c for c in sizes)


def group_attention(q, k, v, group_ids, num_groups: int | None = None, backend: str = "auto",
                    return_lse: bool = False):
    """Each token attends to exactly the tokens of its own group (per batch element).

    q, k, v [B, N, H, D]; group_ids [B, N] in [0, num_groups). Returns out [B, N, H, D]
    (and lse [B, N, H] float32 with return_lse).
    """
    _check_qkv(q, k, v)
    b, n, h, d = q.shape
    if tuple(group_ids.shape) != (b, n):
        raise ValueError(f"group ids {tuple(group_ids.shape)} do not match q's [batch, tokens] "
                         f"{(b, n)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group ids must be an integer tensor, got {group_ids.dtype}")
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 1
    order, inv, cu, mx, _ = _routed_segments(group_ids, num_groups)
    pack = lambda t: take_rows(t.reshape(b * n, h, d), order)  # noqa: E731
    res = varlen_attention(pack(q), pack(k), pack(v), cu, cu, mx, mx, backend, return_lse)
    return _unpack(res, inv, b, n, return_lse)


def _unpack(res, inv, b, n, return_lse):
    out, lse = (res if return_lse else (res, None))
    if inv is not None:
        out = take_rows(out, inv)
        lse = None if lse is None else take_rows(lse, inv)
    out = out.reshape(b, n, *out.shape[1:])
    return (out, lse.reshape(b, n, -1)) if return_lse else out


def _run_packed(q, k, v, q_idx, k_idx, cu_q, cu_k, max_q, max_k, backend, return_lse):
    """Gather q (and k, v) rows into packed segment order (None: already packed) and attend."""
    b, n, h, d = q.shape
    flat = [t.reshape(b * n, h, d) for t in (q, k, v)]
    qq = flat[0] if q_idx is None else take_rows(flat[0], q_idx)
    kk, vv = flat[1], flat[2]
    if k_idx is not None:
        kk, vv = take_rows(kk, k_idx), take_rows(vv, k_idx)
    return varlen_attention(qq, kk, vv, cu_q, cu_k, max_q, max_k, backend, return_lse)


def _check_qkv(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, tokens, heads, head_dim] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _check_routing(routing: Routing, b: int, n: int):
    ids, gate, probs = routing.group_ids, routing.gate, routing.probs
    if tuple(ids.shape) != (b, n) or tuple(gate.shape) != (b, n) or probs.shape[:2] != (b, n):
        raise ValueError(
            f"routing (group ids {tuple(ids.shape)}, gate {tuple(gate.shape)}, probs "
            f"{tuple(probs.shape)}) does not match q's [batch, tokens] {(b, n)}: route the same tokens")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"group ids must be an integer tensor, got {ids.dtype}")


def moga_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing | None,
                   layout: TokenLayout, cfg: MoGAConfig) -> torch.Tensor:
    """The MoGA layer's attention: q, k, v [B, N, H, D] (RoPE applied), routing over the same N
    tokens (None when cfg.routed is off). Returns [B, N, H, D] in q's dtype."""
    _check_qkv(q, k, v)
    b, n, h, d = q.shape
    layout.check_tokens(n)
    backend = resolve_backend(cfg.backend, q.device, q.dtype)
    branches = [name for name, on in (("routed", cfg.routed), ("window", cfg.windowed),
                                      ("frame", cfg.per_frame)) if on]
    if cfg.routed:
        if routing is None:
            raise ValueError("the routed branch is on but no routing was given: pass the router's "
                             "Routing, or set routed=False in the MoGAConfig")
        _check_routing(routing, b, n)
        # group capacity: from the whole sequence's routing (after the SP all-gather), same on every rank
        routing = cap_routing(routing, cfg.capacity, cfg.capacity_split)
    use_lse = cfg.fusion == "lse" and len(branches) > 1  # one branch: its own softmax is the union
    if (use_lse and not LSE_HAS_GRAD[backend] and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v))):
        raise ValueError(f"fusion 'lse' needs the log-sum-exp's gradient, which backend {backend!r} "
                         f"does not give: train with backend 'fa4', 'sdpa' or 'reference'")
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (q, k, v)) or (cfg.routed and routing.gate.requires_grad))
    # CUDA inference: branches stay packed and one Triton pass unsorts, gates and merges them.
    fused = (FUSED_MERGE and (q.is_cuda or FUSE_ON_CPU) and not needs_grad and cfg.backend != "reference"
             and _triton_merge() is not None)
    outs, lses, invs = [], [], []
    for name in branches:
        if name == "routed":
            order, inv, cu, mx, _ = _routed_segments(routing.group_ids, routing.num_groups)
            res = _run_packed(q, k, v, order, order, cu, cu, mx, mx, backend, use_lse)
        elif name == "window":
            seg = _window_segments(layout, cfg.window, cfg.context_frames, b, q.device)
            inv = seg.inv_q
            res = _run_packed(q, k, v, seg.q_idx, seg.k_idx, seg.cu_q, seg.cu_k, seg.max_q,
                              seg.max_k, backend, use_lse)
        else:
            seg = _frame_segments(layout, b, q.device)
            inv = None
            res = _run_packed(q, k, v, None, None, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k,
                              backend, use_lse)
        out, lse = res if use_lse else (res, None)
        if not fused:
            out, lse = (t if t is None or inv is None else take_rows(t, inv) for t in (out, lse))
            out = out.reshape(b, n, h, d)
            lse = None if lse is None else lse.reshape(b, n, h)
        outs.append(out)
        lses.append(lse)
        invs.append(inv)
    if fused:
        gate = routing.gate.reshape(-1) if cfg.routed and cfg.fusion == "mean" else None
        merged = fused_merge(outs, invs, b * n, gate=gate, lses=lses if use_lse else None,
                             dtype=q.dtype)
        return merged.view(b, n, h, d)
    if use_lse:
        return _lse_merge(outs, lses, q.dtype)
    if cfg.fusion == "lse":  # a single branch: its own softmax, no gate
        return outs[0]
    return _mean_merge(outs, branches, routing, q.dtype)


def _mean_merge(outs, branches, routing, dtype):
    grad = torch.is_grad_enabled() and (any(o.requires_grad for o in outs) or (
        "routed" in branches and routing.gate.requires_grad))
    work = _work(dtype)
    if "routed" in branches:
        gate = routing.gate.to(work)[..., None, None]
        first = outs[0].to(work)
        outs = [first * gate if grad else first.mul_(gate)] + outs[1:]
    if len(outs) == 1:
        return outs[0].to(dtype)
    if grad:
        acc = outs[0].to(work)
        for o in outs[1:]:
            acc = acc + o.to(work)
        return (acc / len(outs)).to(dtype)
    acc = outs[0].to(work)
    for o in outs[1:]:
        acc.add_(o)
    return acc.div_(len(outs)).to(dtype)


def _work(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_merge(outs, lses, dtype):
    work = _work(dtype)
    lse = torch.stack(lses).to(work)              # [branches, B, N, H]
    total = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - total)                    # each branch's share of the union's mass
    acc = sum(o.to(work) * wi[..., None] for o, wi in zip(outs, w))
    return acc.to(dtype)


def attention_pairs(layout: TokenLayout, cfg: MoGAConfig, group_sizes=None, batch: int = 1):
    """Query-key pairs each active branch computes (FLOPs = 4 * pairs * heads * head_dim).

    group_sizes: token count of every routed group (all batch elements), needed for `routed`.
    Returns {"routed": .., "window": .., "frame": .., "dense": ..}."""
    n = layout.num_tokens
    out = {"dense": batch * n * n}
    if cfg.routed:
        if group_sizes is None:
            raise ValueError("attention_pairs needs the routed group sizes")
        out["routed"] = int(sum(int(s) ** 2 for s in group_sizes))
    if cfg.windowed:
        groups = window_groups(layout, cfg.window, cfg.context_frames)
        out["window"] = batch * sum(len(qi) * len(ki) for qi, ki in groups)
    if cfg.per_frame:
        out["frame"] = batch * layout.frames * layout.tokens_per_frame ** 2
    return out
