"""Variable-length attention behind one dispatcher.

`varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="auto", return_lse=False)` takes packed
q [Tq, H, D] and k, v [Tk, H, D]; segment i is queries cu_q[i]:cu_q[i+1] attending to keys
cu_k[i]:cu_k[i+1] (query and key sets may differ). It returns out [Tq, H, D], and with
`return_lse` also lse [Tq, H] float32 (float64 for float64 inputs): the natural log of the sum
over the segment's keys of exp(scale * q.k), scale = 1/sqrt(D). A query whose segment has no keys
gets out 0 and lse -inf.

Backends (BACKENDS; "auto" = the fastest importable one for the device and dtype):
  fa4        flash_attn.cute.flash_attn_varlen_func (package flash-attn-4; CUDA, Hopper/Blackwell,
             fp16/bf16). Fastest on an H100. Backward: yes, the lse's gradient included.
  flash_attn flash_attn.flash_attn_varlen_func (FlashAttention 2; CUDA, fp16/bf16).
             Backward: yes for the output; its lse carries NO gradient.
  torch      torch.nn.attention.varlen.varlen_attn (CUDA only, fp16/bf16; PyTorch >= 2.10).
             Backward: yes for the output; its lse carries NO gradient.
  sdpa       any device and dtype (the CPU default): segments of equal length are batched into one
             F.scaled_dot_product_attention call; with return_lse a chunked explicit softmax (never
             more than one batch of segments' scores at a time). Backward: yes, lse included.
  reference  one dense masked softmax over all Tq x Tk scores in float32 (float64 for float64
             inputs). Tests only. Backward: yes, lse included.
So training through `fusion="lse"` (which differentiates the lse) needs fa4, sdpa or reference;
mixture.py refuses the other two when gradients are on.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..lazy_triton import triton_kernels

BACKENDS = ("fa4", "flash_attn", "torch", "sdpa", "reference")
LSE_HAS_GRAD = {"fa4": True, "flash_attn": False, "torch": False, "sdpa": True, "reference": True}
_HALF = (torch.float16, torch.bfloat16)
_PACKAGE = {
    "fa4": "flash-attn-4 (`pip install moga-video[fa4]`; import flash_attn.cute)",
    "flash_attn": "flash-attn (`pip install moga-video[flash]`; import flash_attn)",
    "torch": "PyTorch >= 2.10 with torch.nn.attention.varlen",
}


@lru_cache(maxsize=None)
def _import(name: str):
    """The backend's callable, or the ImportError explaining why not."""
    try:
        if name == "fa4":
            from flash_attn.cute import flash_attn_varlen_func
            return flash_attn_varlen_func
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func
            return flash_attn_varlen_func
        if name == "torch":
            from torch.nn.attention.varlen import AuxRequest, varlen_attn
            return (varlen_attn, AuxRequest)
    except Exception as err:  # a broken install counts as missing
        return err
    raise KeyError(name)


def backend_problem(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `name` cannot run on this device/dtype (None when it can)."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {('auto',) + BACKENDS}"
    if name in ("sdpa", "reference"):
        return None
    if name == "torch" and device.type != "cuda":  # (importing torch's varlen module takes seconds)
        return f"attention backend 'torch' runs on CUDA only (this tensor is on {device}); use 'sdpa'"
    got = _import(name)
    if isinstance(got, Exception):
        return f"attention backend {name!r} needs {_PACKAGE[name]}, which is not importable: {got}"
    if device.type != "cuda":
        return f"attention backend {name!r} runs on CUDA only (this tensor is on {device}); use 'sdpa'"
    if dtype not in _HALF:
        return f"attention backend {name!r} needs float16 or bfloat16 inputs, got {dtype}; use 'sdpa'"
    if name == "fa4" and torch.cuda.get_device_capability(device)[0] < 9:
        return "attention backend 'fa4' needs a Hopper or Blackwell GPU; use 'flash_attn' or 'torch'"
    return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' -> the fastest backend that runs here; a named one is checked (ValueError if not)."""
    if backend == "auto":
        order = ("fa4", "flash_attn", "torch", "sdpa") if device.type == "cuda" else ("sdpa",)
        return next(b for b in order if backend_problem(b, device, dtype) is None)
    problem = backend_problem(backend, device, dtype)
    if problem:
        raise ValueError(problem)
    return backend


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, backend: str = "auto",
                     return_lse: bool = False, scale: float | None = None):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen attention takes packed [tokens, heads, dim] tensors, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match: "
                         f"k and v need the same shape, and q the same heads and head dim")
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 1:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must be 1-D of "
                         f"equal length (segments + 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    name = resolve_backend(backend, q.device, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if name in ("sdpa", "reference"):
        lq = torch.diff(cu_q.to("cpu", torch.long)).tolist()
        lk = torch.diff(cu_k.to("cpu", torch.long)).tolist()
        if (min(lq + lk + [0]) < 0 or sum(lq) != q.shape[0] or sum(lk) != k.shape[0]
                or int(cu_q[0]) != 0 or int(cu_k[0]) != 0):
            raise ValueError(f"cu_q/cu_k must rise from 0 to the token counts ({q.shape[0]}, "
                             f"{k.shape[0]})")
        fn = _sdpa if name == "sdpa" else _reference
        return fn(q, k, v, lq, lk, return_lse, scale)
    cu_q = cu_q.to(q.device, torch.int32)
    cu_k = cu_k.to(q.device, torch.int32)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if name == "fa4":
        out, lse = _import("fa4")(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  max_seqlen_q=int(max_q), max_seqlen_k=int(max_k),
                                  softmax_scale=scale, return_lse=return_lse)
        return (out, lse.transpose(0, 1)) if return_lse else out  # fa4's lse is [H, Tq]
    if name == "flash_attn":
        res = _import("flash_attn")(q, k, v, cu_q, cu_k, int(max_q), int(max_k),
                                    softmax_scale=scale, return_attn_probs=return_lse)
        if not return_lse:
            return res
        out, lse = res[0], res[1]
        return out, lse[:, : q.shape[0]].transpose(0, 1)  # [H, Tq] -> [Tq, H]
    varlen_attn, AuxRequest = _import("torch")
    kw = {} if scale == 1.0 / math.sqrt(q.shape[-1]) else {"scale": scale}  # older: no `scale`
    if not return_lse:
        return varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kw)
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kw,
                           return_aux=AuxRequest(lse=True))
    if lse.shape[0] != q.shape[0] and lse.shape[-1] == q.shape[0]:
        lse = lse.transpose(0, 1)  # the FA2-style [H, Tq] layout
    return out, lse


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0 as one 2-D row gather (3-D index_select is ~100x slower on the CPU)."""
    return t.reshape(t.shape[0], -1).index_select(0, idx).view(idx.shape[0], *t.shape[1:])


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference(q, k, v, lq, lk, return_lse, scale):
    """Dense masked softmax over all scores: exact and simple, O(Tq x Tk) memory."""
    work = _lse_dtype(q.dtype)
    seg_q = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq, dtype=torch.long))
    seg_k = torch.repeat_interleave(torch.arange(len(lk)), torch.tensor(lk, dtype=torch.long))
    mask = (seg_q[:, None] == seg_k[None, :]).to(q.device)  # [Tq, Tk]
    s = torch.einsum("qhd,khd->hqk", q.to(work), k.to(work)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Tq]; -inf for a query without keys
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("hqk,khd->qhd", p, v.to(work)).to(q.dtype)
    return (out, lse.transpose(0, 1)) if return_lse else out


# More distinct (query, key) length pairs than this and `_sdpa` pads segments into length classes:
# routed groups come in dozens of sizes, and one small call per size is launch-bound on a GPU
# (and slower on a CPU) than a few padded calls with a key mask.
PAD_BUCKETS = 4


def length_class(n: int) -> int:
    """n rounded up to one of 4 sizes per octave (1..8 exact): at most 25% padding."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def _sdpa(q, k, v, lq, lk, return_lse, scale):
    """Segments bucketed by (query length, key length), one batched call per bucket; with more than
    PAD_BUCKETS buckets, by length class instead, padded rows masked out of the keys and dropped
    from the output."""
    tq, h, d = q.shape
    dev = q.device
    exact: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(zip(lq, lk)):
        if a > 0:
            exact.setdefault((a, b), []).append(i)
    if len(exact) == 1 and len(lq) > 0:  # uniform: plain views, no gather
        (nq, nk), segs = next(iter(exact.items()))
        s_ = len(segs)
        if s_ == len(lq) and nq * s_ == tq and nk * s_ == k.shape[0] and nk > 0:
            ob, lb = _attend(*(t.reshape(s_, -1, h, d) for t in (q, k, v)), None, return_lse, scale)
            out = ob.reshape(tq, h, d)
            return (out, lb.reshape(tq, h)) if return_lse else out
    padded = len(exact) > PAD_BUCKETS
    buckets: dict[tuple[int, int], list[int]] = {}
    for (a, b), segs in exact.items():
        key = (length_class(a), length_class(b)) if padded else (a, b)
        buckets.setdefault(key, []).extend(segs)
    len_q, len_k = torch.tensor(lq, dtype=torch.long), torch.tensor(lk, dtype=torch.long)
    start_q, start_k = len_q.cumsum(0) - len_q, len_k.cumsum(0) - len_k
    pieces, places, lses = [], [], []
    for (pq, pk), segs in buckets.items():
        seg = torch.tensor(segs, dtype=torch.long)
        nq, nk = len_q[seg][:, None], len_k[seg][:, None]
        pos_q = torch.arange(pq)[None]
        # padded query rows repeat the segment's last row: finite scores, outputs dropped below
        qidx = (start_q[seg][:, None] + torch.minimum(pos_q, nq - 1)).flatten()
        qb = take_rows(q, qidx.to(dev)).view(len(segs), pq, h, d)
        if pk == 0:  # keyless segments (length class 0 holds only them): out 0, lse -inf
            ob = q.new_zeros(len(segs), pq, h, d)
            lb = torch.full((len(segs), pq, h), float("-inf"), dtype=_lse_dtype(q.dtype), device=dev)
        else:
            pos_k = torch.arange(pk)[None]
            kidx = (start_k[seg][:, None] + torch.minimum(pos_k, nk - 1)).flatten().to(dev)
            kb = take_rows(k, kidx).view(len(segs), pk, h, d)
            vb = take_rows(v, kidx).view(len(segs), pk, h, d)
            mask = None if bool((nk == pk).all()) else (pos_k < nk).to(dev).view(len(segs), 1, 1, pk)
            ob, lb = _attend(qb, kb, vb, mask, return_lse, scale)
        keep = None if bool((nq == pq).all()) else (pos_q < nq).flatten().nonzero().flatten()
        rows = ob.reshape(-1, h, d)
        pieces.append(rows if keep is None else take_rows(rows, keep.to(dev)))
        places.append(qidx if keep is None else qidx[keep])
        if return_lse:
            lrows = lb.reshape(-1, h)
            lses.append(lrows if keep is None else take_rows(lrows, keep.to(dev)))
    if not pieces:  # no queries at all (tq == 0)
        out = q.new_zeros(tq, h, d)
        return (out, torch.zeros(tq, h, dtype=_lse_dtype(q.dtype), device=dev)) if return_lse else out
    order = torch.argsort(torch.cat(places)).to(dev)  # rows back to packed order
    out = take_rows(torch.cat(pieces), order)
    return (out, take_rows(torch.cat(lses), order)) if return_lse else out


def _attend(qb, kb, vb, mask, return_lse, scale):
    """[S, L, H, D] batches -> (out [S, Lq, H, D], lse [S, Lq, H] or None); mask [S, 1, 1, Lk]
    marks the keys each segment may see (None: all)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (qb, kb, vb))  # [S, H, L, D]
    if return_lse:
        ob, lb = _chunked_softmax(qt, kt, vt, scale, mask)
        return ob.transpose(1, 2), lb.transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2), None


def _chunked_softmax(q, k, v, scale, mask=None, budget=1 << 26):
    """Explicit softmax returning (out, lse) for [S, H, L, D] inputs, in query chunks so the
    score tensor stays under `budget` elements; mask [S, 1, 1, Lk] (True: key taken part)."""
    s_, h, nq, _ = q.shape
    nk = k.shape[2]
    work = _lse_dtype(q.dtype)
    step = max(1, budget // max(1, s_ * h * nk))
    kw, vw = k.to(work), v.to(work)
    outs, lses = [], []
    for a in range(0, nq, step):
        s = torch.matmul(q[:, :, a:a + step].to(work), kw.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vw))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


# ------------------------------------------------------------------------------------------------
# Fused branch merge (CUDA, Triton): unsort + gate + mean (or lse weighting) + cast in one pass.
# Unsorting each branch with index_select and then averaging in float32 with separate elementwise
# ops moves about six times the bytes of one read of every branch and one write of the result.
@triton_kernels
def _triton_merge(triton, tl):
    """The Triton merge kernel (`_triton_merge()`: None when Triton is not importable)."""
    @triton.jit
    def merge_kernel(out_ptr, a_ptr, b_ptr, c_ptr, ia_ptr, ib_ptr, ic_ptr, gate_ptr,
                     la_ptr, lb_ptr, lc_ptr, hd, heads, head_dim, inv_n,
                     HAS_B: tl.constexpr, HAS_C: tl.constexpr, IDX_A: tl.constexpr,
                     IDX_B: tl.constexpr, IDX_C: tl.constexpr, GATE: tl.constexpr,
                     LSE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < hd
        head = cols // head_dim
        ra = row
        if IDX_A:
            ra = tl.load(ia_ptr + row).to(tl.int64)
        va = tl.load(a_ptr + ra * hd + cols, mask=ok, other=0.0).to(tl.float32)
        if LSE:
            la = tl.load(la_ptr + ra * heads + head, mask=ok, other=0.0)
            top = la
        if HAS_B:
            rb = row
            if IDX_B:
                rb = tl.load(ib_ptr + row).to(tl.int64)
            vb = tl.load(b_ptr + rb * hd + cols, mask=ok, other=0.0).to(tl.float32)
            if LSE:
                lb = tl.load(lb_ptr + rb * heads + head, mask=ok, other=0.0)
                top = tl.maximum(top, lb)
        if HAS_C:
            rc = row
            if IDX_C:
                rc = tl.load(ic_ptr + row).to(tl.int64)
            vc = tl.load(c_ptr + rc * hd + cols, mask=ok, other=0.0).to(tl.float32)
            if LSE:
                lc = tl.load(lc_ptr + rc * heads + head, mask=ok, other=0.0)
                top = tl.maximum(top, lc)
        if LSE:
            wa = tl.exp(la - top)
            acc = wa * va
            norm = wa
            if HAS_B:
                wb = tl.exp(lb - top)
                acc += wb * vb
                norm += wb
            if HAS_C:
                wc = tl.exp(lc - top)
                acc += wc * vc
                norm += wc
            acc = acc / norm
        else:
            if GATE:
                va = va * tl.load(gate_ptr + row)
            acc = va
            if HAS_B:
                acc += vb
            if HAS_C:
                acc += vc
            acc = acc * inv_n
        tl.store(out_ptr + row * hd + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return merge_kernel


def fused_merge(outs, invs, rows: int, gate=None, lses=None, dtype=None):
    """Merge up to three packed branch outputs into natural order in one pass.

    outs: packed [T_b, H, D] tensors; invs: per branch None (already natural order) or [rows]
    long, the packed row of each token; gate: [rows] float32 multiplying the first branch
    (mean fusion); lses: per-branch [T_b, H] float32 (lse fusion: softmax weights, no gate and
    no mean). Without lses the result is the mean. Returns [rows, H, D] in `dtype`.
    """
    kernel = _triton_merge()
    if kernel is None:
        raise RuntimeError(f"fused_merge needs Triton: {_triton_merge.problem()}")
    if not 1 <= len(outs) <= 3:
        raise ValueError("fused_merge merges one to three branches")
    h, d = outs[0].shape[1:]
    outs = [o.contiguous() for o in outs] + [outs[0]] * (3 - len(outs))
    idx = list(invs) + [None] * (3 - len(invs))
    dummy = outs[0]
    out = torch.empty(rows, h, d, dtype=dtype or outs[0].dtype, device=outs[0].device)
    ls = ([l.float().contiguous() for l in lses] + [None] * (3 - len(lses))) if lses else [None] * 3
    block = min(1024, 1 << (h * d - 1).bit_length())
    grid = (rows, -(-(h * d) // block))
    kernel[grid](out, outs[0], outs[1], outs[2],
                 *(i if i is not None else dummy for i in idx),
                 gate.float().contiguous() if gate is not None else dummy,
                 *(l if l is not None else dummy for l in ls),
                 h * d, h, d, 1.0 / len(invs),
                 HAS_B=len(invs) > 1, HAS_C=len(invs) > 2, IDX_A=idx[0] is not None,
                 IDX_B=idx[1] is not None, IDX_C=idx[2] is not None, GATE=gate is not None,
                 LSE=bool(lses), BLOCK=block)
    return out
