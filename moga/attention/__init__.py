"""The MoGA attention engine: token layout, router, varlen kernels, the three-branch layer, balance loss.

Knows no model: everything here works on [batch, tokens, heads, head_dim] tensors and a TokenLayout.
"""
from .config import MoGAConfig
from .layout import TokenLayout
from .layer import MoGAAttention, RMSNorm, apply_rope, dense_attention

__all__ = ["MoGAConfig", "TokenLayout", "MoGAAttention", "RMSNorm", "apply_rope", "dense_attention"]
