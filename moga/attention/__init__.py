"""The MoGA attention engine: token layout, router, varlen kernels, the three-branch layer, balance loss.

Knows no model: everything here works on [batch, tokens, heads, head_dim] tensors and a TokenLayout.
"""
from .config import MoGAConfig
from .kernels import varlen_attention
from .layout import TokenLayout
from .layer import MoGAAttention, RMSNorm, apply_rope, dense_attention
from .loss import balance_loss
from .mixture import group_attention, moga_attention
from .router import Router, Routing

__all__ = ["MoGAConfig", "TokenLayout", "MoGAAttention", "RMSNorm", "apply_rope", "dense_attention",
           "Router", "Routing", "varlen_attention", "group_attention", "moga_attention",
           "balance_loss"]
