"""The sparse attention users would pick instead of MoGA, as drop-in replacements of a dense model's attention,
for the long-story comparison (benchmarks/long_stories.py).

- `topk_block_attention`: SLA-style top-k block attention, a simple reference. Tokens are cut into blocks of
  `block` (64: one latent frame of the demo model); each query block scores every key block by the dot product
  of their mean query and mean key, keeps its own block and the best others up to `keep` of all key blocks,
  and runs exact attention over the kept blocks' tokens only (one softmax, no tail term).
- `sol_attention`: comfy-kitchen's public `sol_attn` (optional dependency; head dim padded to its 128 with zeros,
  which changes no score, the scale passed explicitly). `sol_exact_blocks` re-derives which key blocks it
  attends exactly (from its documented rule: a key block is exact when the query block's mean score on it clears
  tau standard deviations of the proxy row; the diagonal +-1 always), to count its FLOPs;
  `sol_reference` is our float64 reading of the whole method, which tests hold against the package.
- `override_attention`: every self-attention call of a dense model (`moga.attention.layer.dense_attention`)
  goes through one of them for the sampling steps after a dense warm-up, counting FLOPs.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

BLOCK = 64
LOG2E = 1.0 / math.log(2.0)


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[T, ...] -> [ceil(T / block), ...] block means (a short last block averages its own rows)."""
    t = x.shape[0]
    n = -(-t // block)
    pad = n * block - t
    sums = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)).reshape(n, block, *x.shape[1:]).sum(1)
    counts = torch.full((n,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return sums / counts.view(n, *([1] * (x.dim() - 1)))


def keep_count(blocks: int, keep: float) -> int:
    """Key blocks a query block keeps at ratio `keep` (its own included): round(keep * blocks), in [1, blocks]."""
    return max(1, min(blocks, round(keep * blocks)))


def topk_blocks(q: torch.Tensor, k: torch.Tensor, keep: float, block: int = BLOCK) -> torch.Tensor:
    """q, k [T, H, D] -> bool [H, nq, nk]: the key blocks each query block keeps (its own always)."""
    qm, km = _pool(q.float(), block), _pool(k.float(), block)          # [n, H, D]
    scores = torch.einsum("qhd,khd->hqk", qm, km)
    n = scores.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(eye, float("inf"))                      # the own block first
    idx = scores.topk(keep_count(n, keep), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def _block_mask_to_tokens(mask: torch.Tensor, t: int, block: int) -> torch.Tensor:
    """bool [H, nq, nk] -> [H, T, T]."""
    return mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :t, :t]


def topk_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: float, block: int = BLOCK,
                         chunk: int = 16) -> tuple[torch.Tensor, int]:
    """q, k, v [B, T, H, D] -> (out [B, T, H, D], attended query-key pairs summed over batch and heads).
    Query blocks run `chunk` at a time, each over its kept key blocks gathered (memory ~ chunk x kept keys)."""
    b, t, h, d = q.shape
    n = -(-t // block)
    pad = n * block - t
    out = torch.empty_like(q)
    pairs = 0
    for i in range(b):
        mask = topk_blocks(q[i], k[i], keep, block)                    # [H, n, n]
        sizes = torch.full((n,), block, dtype=torch.long, device=q.device)
        sizes[-1] = t - (n - 1) * block
        pairs += int((mask.long() * sizes.view(1, -1, 1) * sizes.view(1, 1, -1)).sum())
        # gather kept blocks: every query block keeps the same count, so the gather is rectangular
        sel = mask.float().argsort(dim=-1, descending=True, stable=True)[..., :keep_count(n, keep)]  # [H, n, kk]
        qp, kp, vp = (F.pad(x[i], (0, 0, 0, 0, 0, pad)).view(n, block, h, d).permute(2, 0, 1, 3)
                      for x in (q, k, v))                               # [H, n, block, D]
        valid = torch.ones(n * block, dtype=torch.bool, device=q.device)
        if pad:
            valid[t:] = False
        valid = valid.view(n, block)
        res = torch.empty(h, n, block, d, dtype=q.dtype, device=q.device)
        for lo in range(0, n, chunk):
            s = sel[:, lo:lo + chunk]                                   # [H, c, kk]
            keys = torch.stack([kp[j][s[j]] for j in range(h)]).flatten(2, 3)   # [H, c, kk*block, D]
            vals = torch.stack([vp[j][s[j]] for j in range(h)]).flatten(2, 3)
            live = valid[s].flatten(2, 3)                               # [H, c, kk*block]
            res[:, lo:lo + chunk] = F.scaled_dot_product_attention(qp[:, lo:lo + chunk], keys, vals,
                                                                   attn_mask=live[:, :, None, :])
        out[i] = res.permute(1, 2, 0, 3).reshape(n * block, h, d)[:t]
    return out, pairs


def topk_reference(q, k, v, keep: float, block: int = BLOCK) -> torch.Tensor:
    """Float64 dense attention under the same block mask (for tests)."""
    b, t, h, d = q.shape
    outs = []
    for i in range(b):
        allowed = _block_mask_to_tokens(topk_blocks(q[i], k[i], keep, block), t, block)   # [H, T, T]
        s = torch.einsum("qhd,khd->hqk", q[i].double(), k[i].double()) / math.sqrt(d)
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, v[i].double()))
    return torch.stack(outs)


# ---- Sol-Attn ------------------------------------------------------------------------------------

def sol_available() -> tuple[object | None, str]:
    """(comfy_kitchen.sol_attn, '') or (None, why not)."""
    try:
        import comfy_kitchen
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
        return None, f"comfy-kitchen is not importable ({type(exc).__name__}: {exc}); pip install comfy-kitchen>=0.2.40"
    fn = getattr(comfy_kitchen, "sol_attn", None)
    if fn is None:
        return None, "the installed comfy-kitchen has no sol_attn (it came in 0.2.40): pip install -U comfy-kitchen"
    return fn, ""


def sol_fused(device) -> bool:
    """Whether comfy-kitchen's compiled Sol-Attn kernels run on `device` (else its eager reference)."""
    try:
        import comfy_kitchen
        return torch.device(device).type == "cuda" and bool(comfy_kitchen.sol_attn_is_available(torch.device(device)))
    except Exception:  # noqa: BLE001 - not installed / no kernels: the eager path
        return False


def sol_exact_blocks(q: torch.Tensor, k: torch.Tensor, tau: float, scale: float | None = None,
                     block: int = BLOCK) -> torch.Tensor:
    """q, k [T, H, D] -> bool [H, nq, nk]: the key blocks Sol-Attn attends exactly at threshold `tau`."""
    d = q.shape[-1]
    log2s = (scale if scale is not None else d ** -0.5) * LOG2E
    qm, km = _pool(q.double(), block), _pool(k.double(), block)        # [n, H, D]
    kc = km - km.mean(0, keepdim=True)
    colmean = torch.einsum("qhd,khd->hqk", qm, kc) * log2s             # = the block mean of the rows' scores
    var = torch.einsum("qhd,hd->hq", qm.pow(2), kc.pow(2).mean(0))     # spread of the proxy row
    thr = tau * torch.sqrt(var * log2s * log2s + 1e-6)
    exact = colmean > thr.unsqueeze(-1)
    n = exact.shape[-1]
    idx = torch.arange(n, device=q.device)
    return exact | ((idx.view(1, -1) - idx.view(-1, 1)).abs() <= 1)


def sol_pairs(q: torch.Tensor, k: torch.Tensor, tau: float, block: int = BLOCK, extra_tokens: int = 0) -> int:
    """Query-key pairs Sol-Attn spends on [B, T, H, D]: exact token pairs + one pooled term per query row and
    non-exact key block + the proxy scores (one per query block and key block) + `extra_tokens` per query row
    (the fused kernels' token_aug routes up to that many single tokens exactly; the eager reference none)."""
    b, t, h, _ = q.shape
    total = 0
    for i in range(b):
        exact = sol_exact_blocks(q[i], k[i], tau, block=block)         # [H, nq, nk]
        n = exact.shape[-1]
        sizes = torch.full((n,), block, dtype=torch.long, device=q.device)
        sizes[-1] = t - (n - 1) * block
        tok = int((exact.long() * sizes.view(1, 1, -1) * sizes.view(1, -1, 1)).sum())
        pooled = int(((~exact).long() * sizes.view(1, -1, 1)).sum())
        total += tok + pooled + h * n * n + h * t * extra_tokens
    return total


def sol_attention(q, k, v, tau: float = 1.3, token_aug: int = 256, fn=None) -> torch.Tensor:
    """comfy-kitchen's sol_attn on [B, T, H, D] (any head dim up to 128: zero-padded; one head at a time on the
    CPU, where its eager reference builds a [T, T] score matrix per head)."""
    fn = fn or sol_available()[0]
    if fn is None:
        raise RuntimeError(sol_available()[1])
    d = q.shape[-1]
    if d > 128:
        raise ValueError(f"sol_attn takes head dim 128; this model has {d}")
    pad = lambda x: F.pad(x, (0, 128 - d)) if d < 128 else x  # noqa: E731
    if sol_fused(q.device):  # the kernels take bf16 / fp16 (ComfyUI runs Wan in bf16)
        half = lambda x: pad(x).to(torch.bfloat16) if x.dtype not in (torch.float16, torch.bfloat16) else pad(x)  # noqa: E731
        return fn(half(q), half(k), half(v), tau=tau, scale=d ** -0.5, token_aug=token_aug)[..., :d].to(q.dtype)
    outs = [fn(pad(q[i:i + 1, :, j:j + 1]), pad(k[i:i + 1, :, j:j + 1]), pad(v[i:i + 1, :, j:j + 1]), tau=tau,
               scale=d ** -0.5, token_aug=token_aug)[..., :d]
            for i in range(q.shape[0]) for j in range(q.shape[2])]
    return torch.cat([torch.cat(outs[i * q.shape[2]:(i + 1) * q.shape[2]], 2) for i in range(q.shape[0])], 0)


def sol_reference(q, k, v, tau: float, block: int = BLOCK) -> torch.Tensor:
    """Float64 Sol-Attn as we read it (for tests against the package): exact scores on the exact blocks, one
    pooled term per other block (logit = the query block's mean score on it, weight = the block's rows,
    value = the block's mean value), one softmax over both."""
    b, t, h, d = q.shape
    scale = d ** -0.5
    outs = []
    for i in range(b):
        exact = sol_exact_blocks(q[i], k[i], tau, block=block)         # [H, n, n]
        n = exact.shape[-1]
        qd, kd, vd = q[i].double(), k[i].double(), v[i].double()
        qm, km, vm = _pool(qd, block), _pool(kd, block), _pool(vd, block)
        kbar = km.mean(0, keepdim=True)  # keys centred by the mean block key (both branches, as the method does)
        kd, km = kd - kbar, km - kbar
        sizes = torch.full((n,), float(block), dtype=torch.float64)
        sizes[-1] = t - (n - 1) * block
        qblk = torch.arange(t) // block
        s_tok = torch.einsum("qhd,khd->hqk", qd, kd) * scale
        keep = _block_mask_to_tokens(exact, t, block)
        s_tok = s_tok.masked_fill(~keep, float("-inf"))
        # pooled logit: the query block's mean score on the block (the same for every row of the block)
        s_blk = (torch.einsum("qhd,khd->hqk", qm, km) * scale)[:, qblk]   # [H, T, n]
        s_blk = s_blk.masked_fill(exact[:, qblk], float("-inf")) + sizes.log().view(1, 1, -1)
        logits = torch.cat([s_tok, s_blk], -1)
        p = logits.softmax(-1)
        out = torch.einsum("hqk,khd->qhd", p[..., :t], vd) + torch.einsum("hqn,nhd->qhd", p[..., t:], vm)
        outs.append(out)
    return torch.stack(outs)


# ---- running a dense model through them ----------------------------------------------------------

class Counter:
    def __init__(self):
        self.pairs = 0.0       # query-key pairs attended (x 4 x head_dim = FLOPs per head)
        self.dense_pairs = 0.0
        self.per_pair = 0.0
        self.step = 0

    @property
    def flops(self) -> float:
        return self.pairs * self.per_pair

    @property
    def dense_flops(self) -> float:
        return self.dense_pairs * self.per_pair


@contextlib.contextmanager
def override_attention(kind: str, dense_steps: int = 0, keep: float = 0.25, tau: float = 1.3,
                       token_aug: int = 256):
    """Inside: every dense self-attention call runs `kind` ('topk' | 'sol' | 'dense') once `counter.step`
    (set by the sampler's callback) reaches `dense_steps`; yields the Counter (pairs, FLOPs)."""
    from ..attention import layer

    original = layer.dense_attention
    counter = Counter()
    fn = sol_available()[0] if kind == "sol" else None
    if kind == "sol" and fn is None:
        raise RuntimeError(sol_available()[1])

    def attend(q, k, v):
        b, t, h, d = q.shape
        counter.per_pair = 4.0 * d
        counter.dense_pairs += b * h * t * t
        if kind == "dense" or counter.step < dense_steps:
            counter.pairs += b * h * t * t
            return original(q, k, v)
        if kind == "topk":
            out, pairs = topk_block_attention(q, k, v, keep)
            counter.pairs += pairs
            return out
        counter.pairs += sol_pairs(q, k, tau, extra_tokens=token_aug if sol_fused(q.device) else 0)
        return sol_attention(q, k, v, tau, token_aug, fn=fn)

    layer.dense_attention = attend
    try:
        yield counter
    finally:
        layer.dense_attention = original
