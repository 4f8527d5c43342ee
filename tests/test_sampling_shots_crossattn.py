"""Per-shot conditioning: the model's per-shot cross-attention (one call per shot's token range) equals
dense cross-attention over every shot's text with a mask that lets each video token see only its own
shot's text, computed in float64 from the same weights. (tests/test_model.py checks the whole forward
against a per-shot reference; this checks the per-shot split itself against the masked dense form.)"""
import pytest
import torch

from moga.shots import ShotPlan
from moga.testing import random_inputs, tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder(torch.nn.Module):
    """Wraps a block's cross-attention; records every call's query tokens and output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def kv(self, context):
        return self.inner.kv(context)

    def forward(self, x, k, v):
        out = self.inner(x, k, v)
        self.calls.append((x.detach().clone(), out.detach().clone()))
        return out


def _masked_dense_reference(cross, x, contexts, text_len, text_mlp, token_shot):
    """x [B, N, dim] (the normed query tokens), contexts: per shot [B, L_s, text_dim]; float64."""
    keys, vals, text_shot = [], [], []
    for s, c in enumerate(contexts):
        c = torch.cat([c, c.new_zeros(c.shape[0], text_len - c.shape[1], c.shape[2])], dim=1)  # Wan pads
        k, v = cross.kv(text_mlp(c.double()))
        keys.append(k)
        vals.append(v)
        text_shot += [s] * k.shape[2]
    k, v = torch.cat(keys, dim=2), torch.cat(vals, dim=2)            # [B, H, sum L, D]
    b, n, _ = x.shape
    h, d = cross.num_heads, cross.head_dim
    q = cross.norm_q(cross.q(x.double())).view(b, n, h, d).transpose(1, 2)
    allowed = token_shot[:, None] == torch.tensor(text_shot)[None, :]  # [N, sum L]
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return cross.o(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("frames", [(5, 1, 9), (1, 1, 1, 1), (13,)])
def test_per_shot_cross_attention_equals_masked_dense(frames):
    plan = ShotPlan.from_prompts([f"shot {i}" for i in range(len(frames))], frames=list(frames))
    shot_frames = plan.latent_shot_frames()
    model = tiny_model(seed=3, num_layers=2)
    model.chunk_tokens = 5  # chunks that straddle shot boundaries must still pick the right text
    x, t, ctx = random_inputs(model.config, frames=sum(shot_frames), height=4, width=6, batch=2,
                              shots=len(shot_frames), seed=8, t=512.0)
    contexts = ctx if isinstance(ctx, list) else [ctx]
    recorders = []
    for block in model.blocks:
        block.cross_attn = Recorder(block.cross_attn)
        recorders.append(block.cross_attn)
    with torch.no_grad():
        model(x, t, contexts, shot_frames=shot_frames)
    layout = plan.token_layout(width=6 * 8, height=4 * 8)
    token_shot = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(layout.shot_token_ranges)])
    for rec in recorders:
        xs = torch.cat([c[0] for c in rec.calls], dim=1)     # the calls cover the tokens in order
        got = torch.cat([c[1] for c in rec.calls], dim=1)
        assert xs.shape[1] == layout.num_tokens
        with torch.no_grad():
            cross = rec.inner.double()
            want = _masked_dense_reference(cross, xs, contexts, model.config.text_len,
                                           lambda c: model.text_embedding.double()(c), token_shot)
            rec.inner.float()
            model.text_embedding.float()
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, err
    # and the text matters per shot: with one layer (self-attention runs before the cross-attention),
    # changing the last shot's text changes that shot's output and nothing before it
    if len(shot_frames) > 1:
        other = [c.clone() for c in contexts]
        other[-1] = torch.randn_like(other[-1])
        first = layout.shot_ranges[-1][0]
        model_one = tiny_model(seed=3, num_layers=1)
        with torch.no_grad():
            a1 = model_one(x, t, contexts, shot_frames=shot_frames)
            b1 = model_one(x, t, other, shot_frames=shot_frames)
        assert torch.allclose(a1[:, :, :first], b1[:, :, :first], atol=1e-6)
        assert (a1[:, :, first:] - b1[:, :, first:]).abs().max() > 1e-4
