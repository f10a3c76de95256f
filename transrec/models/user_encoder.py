"""User encoders: item vectors of a left-padded history [B, T, d] -> hidden states [B, T, d]."""
from __future__ import annotations

import torch
from torch import nn

from transrec.config import ModelConfig
from transrec.registry import Registry

USER_ENCODERS: Registry[type[nn.Module]] = Registry("user encoder")


@USER_ENCODERS.register("transformer")
class TransformerUserEncoder(nn.Module):
    """Pre-norm Transformer over the history; the hidden state at T-1 (the newest item) is the user."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.attention == "causal"
        self.heads = cfg.heads
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        nn.init.normal_(self.positions.weight, std=0.02)  # on the scale of the item vectors it is added to
        self.norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # norm_first leaves the last layer's output unnormalized: the final LayerNorm does that.
        self.encoder = nn.TransformerEncoder(
            layer, cfg.layers, norm=nn.LayerNorm(cfg.dim), enable_nested_tensor=False
        )

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = item_vectors.shape
        # Positions count back from the newest item, so left padding does not shift them: a padded
        # and an unpadded copy of one history see the same position embeddings.
        age = torch.arange(T - 1, -1, -1, device=item_vectors.device)
        x = self.dropout(self.norm(item_vectors + self.positions(age)))
        allowed = mask[:, None, :].expand(B, T, T)  # query t may look at key s where s holds an item
        if self.causal:
            allowed = allowed.tril()
        # Every query also sees itself, so a padding position never has all keys masked: its softmax
        # would be NaN, and NaN values leak into valid positions of the next layer (0 * NaN = NaN).
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=mask.device)
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)  # [B * heads, T, T], True = masked
        return self.encoder(x, mask=blocked)
