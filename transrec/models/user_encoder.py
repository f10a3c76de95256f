"""User encoders (NineRec's zoo): item vectors of a left-padded history [B, T, d] -> hidden states [B, T, d].

Each one is causal unless said (the state at t has seen the items up to t), gives a padded and an unpadded
copy of a history the same states at its items, and lists its `blocks` (each returns [B, T, d], or a tuple
starting with it) for adapters.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from transrec.config import ModelConfig
from transrec.registry import Registry

USER_ENCODERS: Registry[type[nn.Module]] = Registry("user encoder")


@USER_ENCODERS.register("sasrec")
class TransformerUserEncoder(nn.Module):
    """SASRec: a pre-norm Transformer over the history (causal attention; `model.attention: bidirectional`
    lets every position see the whole history); the hidden state at T-1 (the newest item) is the user."""

    cloze = False

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
        if B == 0:  # an empty batch still runs (ranks step together); torch cannot reshape a [0, T, T] mask
            blocked = allowed.new_zeros(T, T)
        return self.encoder(x, mask=blocked)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.layers)


@USER_ENCODERS.register("bert4rec")
class BERT4RecUserEncoder(TransformerUserEncoder):
    """BERT4Rec (Sun et al. 2019): a bidirectional Transformer trained by cloze. A share of each training
    window's items (`model.cloze_prob`, chosen by the data: `Batch.cloze`) is replaced by a learned mask vector
    and predicted from both sides; a user is the state of a mask vector appended after its history."""

    cloze = True

    def __init__(self, cfg: ModelConfig):
        # one position more than the history: the appended mask (or a window's last target, in training)
        super().__init__(replace(cfg, attention="bidirectional", max_seq_len=cfg.max_seq_len + 1))
        self.mask_vector = nn.Parameter(torch.randn(cfg.dim) * 0.02)

    def masked(self, item_vectors: torch.Tensor, cloze: torch.Tensor) -> torch.Tensor:
        """[B, T, d] with the positions where `cloze` is True replaced by the mask vector."""
        return torch.where(cloze[..., None], self.mask_vector.to(item_vectors.dtype), item_vectors)

    def append_mask(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The history followed by a mask vector, whose state is the user."""
        B = item_vectors.shape[0]
        appended = self.mask_vector.to(item_vectors.dtype).expand(B, 1, -1)
        return torch.cat([item_vectors, appended], 1), torch.cat([mask, mask.new_ones(B, 1)], 1)


def _realign(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rolls each row b of [B, T, d] left by shift[b] positions (right by -shift[b])."""
    T = x.shape[1]
    index = (torch.arange(T, device=x.device)[None] + shift[:, None]) % T
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@USER_ENCODERS.register("gru4rec")
class GRUUserEncoder(nn.Module):
    """GRU4Rec (Hidasi et al.; NineRec's and RecBole's shape): stacked GRU layers over the history. Each history
    is moved to the left of its row first, so its padding comes after its items and never enters their states."""

    causal, cloze = True, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(nn.GRU(cfg.dim, cfg.dim, batch_first=True) for _ in range(cfg.layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = mask.shape[1] - mask.sum(1)
        x = self.dropout(_realign(item_vectors, padding))
        for gru in self.layers:
            x = self.dropout(gru(x)[0])
        return self.norm(_realign(x, -padding)) * mask[..., None]

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.layers)


class _DilatedResidualBlock(nn.Module):
    """NextItNet's residual block: two causal 1-D convolutions (dilations d and 2d), each after LayerNorm and
    ReLU, added to the input. Padding positions enter the convolutions as zeros, as the convolutions' own
    left padding does, so a padded history gets the states of the unpadded one."""

    def __init__(self, dim: int, kernel: int, dilation: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, dilation=d) for d in (dilation, 2 * dilation))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = torch.relu(norm(h)) * mask[..., None]
            reach = (conv.kernel_size[0] - 1) * conv.dilation[0]
            h = conv(nn.functional.pad(h.transpose(1, 2), (reach, 0))).transpose(1, 2)
        return x + h


@USER_ENCODERS.register("nextitnet")
class NextItNetUserEncoder(nn.Module):
    """NextItNet (Yuan et al. 2019): `model.layers` residual blocks of dilated causal convolutions, kernel 3,
    dilations (1, 2), (4, 8), (1, 2), ... as in the paper's {1, 2, 4, 8} stacks."""

    causal, cloze = True, False
    KERNEL = 3

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(_DilatedResidualBlock(cfg.dim, self.KERNEL, 4 ** (i % 2))
                                    for i in range(cfg.layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(item_vectors) * mask[..., None]
        for block in self.layers:
            x = block(x, mask)
        return self.norm(x) * mask[..., None]

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.layers)
