"""The group-balancing loss (the paper's Eq. 8, or the Switch Transformer's form)."""
from __future__ import annotations

import torch

FORMS = ("paper", "switch")


def balance_loss(probs: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                 weight: float = 0.1, form: str = "paper") -> torch.Tensor:
    """L = weight * M * sum_i F_i * P_i over all tokens of the batch.

    probs [..., M] router probabilities, group_ids [...] top-1 groups, M = num_groups.
    F_i: fraction of tokens routed to group i (no gradient).
    P_i, form "paper" (Eq. 8): (1/T) * sum of p(i|x) over the tokens routed to i only
         (so the gradient flows through each token's chosen probability);
    P_i, form "switch": mean of p(i|x) over all T tokens.
    Perfect balance with confident routing gives weight * 1 for both forms.
    """
    if form not in FORMS:
        raise ValueError(f"balance loss form must be one of {FORMS}, got {form!r}")
    if probs.shape[-1] != num_groups:
        raise ValueError(f"probs have {probs.shape[-1]} groups but num_groups is {num_groups}")
    if tuple(group_ids.shape) != tuple(probs.shape[:-1]):
        raise ValueError(f"group ids {tuple(group_ids.shape)} do not match probs "
                         f"{tuple(probs.shape)} without the group axis")
    p = probs.reshape(-1, num_groups)
    ids = group_ids.reshape(-1).long()
    t = ids.numel()
    if t == 0:
        raise ValueError("balance loss over zero tokens")
    if int(ids.min()) < 0 or int(ids.max()) >= num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups})")
    frac = torch.bincount(ids, minlength=num_groups).to(p.dtype) / t
    if form == "paper":
        chosen = p.gather(1, ids[:, None]).squeeze(1)
        share = p.new_zeros(num_groups).index_add(0, ids, chosen) / t
    else:
        share = p.mean(0)
    return weight * num_groups * (frac * share).sum()
