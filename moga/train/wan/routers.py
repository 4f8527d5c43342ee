"""The routers a run trains: which layers have one, new ones (random or given), and the group-balancing
loss with the group-size ratio the log reports, read from each layer's last forward."""
from __future__ import annotations

import math

import torch

from ...attention.loss import balance_loss
from ...attention.router import Router
from .draws import seed_of


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
    g = torch.Generator().manual_seed(seed_of(seed, 7))
    dim = model.config.dim
    return {i: torch.randn(num_groups, dim, generator=g) / math.sqrt(dim) for i in range(len(model.blocks))}


__all__ = ["routed_layers", "balance_terms", "add_routers", "random_routers"]
