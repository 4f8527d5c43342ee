"""The demo model's text encoder: word embeddings over the world's caption vocabulary, a small
transformer, trained together with the DiT.

`encode(list[str]) -> list[Tensor [1, L, dim]]` (the interface of docs/interfaces.md): L = 1 + the
caption's words (a leading <bos>, so an empty caption still has one token for the unconditional
pass). Words outside the vocabulary become <unk> with a warning: the demo model only knows its
world. Batched training calls `forward(ids, lengths)`, whose padding rows are zero, the same
zeros the DiT pads every caption with.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .world import VOCAB, tokenize

PAD, BOS, UNK = 0, 1, 2


class DemoTextEncoder(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 16,
                 vocab: tuple[str, ...] = VOCAB):
        super().__init__()
        self.dim, self.layers, self.heads, self.max_len = dim, layers, heads, max_len
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self._warned: set[str] = set()

    def config(self) -> dict:
        return {"dim": self.dim, "layers": self.layers, "heads": self.heads, "max_len": self.max_len,
                "vocab": list(self.vocab)}

    def token_ids(self, caption: str) -> list[int]:
        words = tokenize(caption)
        unknown = [w for w in words if w not in self.index]
        new = [w for w in unknown if w not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"the demo text encoder does not know {new}: they are read as <unk>; it "
                          f"knows: {' '.join(self.vocab[3:])}", stacklevel=3)
        ids = [BOS] + [self.index.get(w, UNK) for w in words]
        if len(ids) > self.max_len:
            warnings.warn(f"caption {caption!r} has {len(ids) - 1} words; the demo text encoder reads "
                          f"the first {self.max_len - 1}", stacklevel=3)
            ids = ids[: self.max_len]
        return ids

    def batch_ids(self, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, Lmax] (PAD-filled), lengths [B]."""
        rows = [self.token_ids(c) for c in captions]
        lmax = max(len(r) for r in rows)
        ids = torch.full((len(rows), lmax), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return ids.to(device or self.pos.device), lengths.to(device or self.pos.device)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, dim]; rows past each caption's length are exactly zero."""
        b, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the text encoder's {self.max_len}")
        keep = torch.arange(length, device=ids.device)[None] < lengths[:, None]  # [B, L]
        x = self.embed(ids) + self.pos[:length]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~keep)
        return self.norm(x) * keep[..., None].to(x.dtype)

    def encode_batch(self, captions: list[str]) -> torch.Tensor:
        ids, lengths = self.batch_ids(captions)
        return self.forward(ids, lengths)

    @torch.no_grad()
    def encode(self, captions) -> list[torch.Tensor]:
        """One [1, L, dim] float32 embedding per caption (L = its own token count)."""
        if isinstance(captions, str):
            captions = [captions]
        out = []
        for c in captions:
            ids, lengths = self.batch_ids([c])
            out.append(self.forward(ids, lengths).float())
        return out


def extend_vocab(text: DemoTextEncoder, vocab: tuple[str, ...]) -> DemoTextEncoder:
    """A copy of `text` over `vocab` (its own vocabulary followed by new words): the known words keep their rows,
    each new word starts as the <unk> row (what the encoder read it as before), so the extended encoder first
    computes what the old one did."""
    vocab = tuple(vocab)
    if vocab[:len(text.vocab)] != text.vocab:
        raise ValueError(f"the new vocabulary must begin with the encoder's own {len(text.vocab)} words "
                         f"(the old ids must not move); it begins {vocab[:len(text.vocab)][-3:]}")
    if vocab == text.vocab:
        return text
    out = DemoTextEncoder(text.dim, text.layers, text.heads, text.max_len, vocab=vocab)
    load_text_state(out, text.state_dict())
    return out.to(text.pos.device)


def load_text_state(text: DemoTextEncoder, state: dict) -> None:
    """Load a text encoder's weights into `text`, whose vocabulary may extend the saved one (the shipped
    model's 26 words into a long-story encoder): the extra rows become the saved <unk> row."""
    state = dict(state)
    saved = state.get("embed.weight")
    own = text.embed.weight
    if saved is not None and saved.shape[0] < own.shape[0] and saved.shape[1:] == own.shape[1:]:
        extra = saved[UNK:UNK + 1].expand(own.shape[0] - saved.shape[0], -1)
        state["embed.weight"] = torch.cat([saved, extra.to(saved.dtype)])
    text.load_state_dict(state)
