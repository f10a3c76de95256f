"""How a transformers text model runs layer by layer, per family (its `model_type`).

The text tower does not call a body's own forward: it packs several items into one row (a block-diagonal
mask, positions counted within each item), runs the frozen bottom layers apart from the trainable top ones
(without autograd, cached per item) and pools the states itself. So it needs each family's pieces: the token
and position embeddings, the list of layers, one layer run under an additive [rows, 1, width, width] mask, and
what follows the last layer (a final norm, a projection). Every family registered here is checked against the
model's own forward in tests/test_text_families.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from transrec.registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class TextFamily:
    """The pieces of one family's model, given the model (they hold no state of their own)."""

    causal = False  # a token sees only its own item's earlier tokens (decoder-only models)
    model_kwargs: dict = {}  # for AutoModel when the tower builds its body

    def width(self, config: PretrainedConfig) -> int:
        """Features of each token's state after `finish`."""
        return config.hidden_size

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        raise NotImplementedError

    def embedding_modules(self, model: PreTrainedModel) -> list[nn.Module]:
        """What runs before the first layer: frozen with the bottom layers."""
        raise NotImplementedError

    def final_modules(self, model: PreTrainedModel) -> list[nn.Module]:
        """What runs after the last layer, in order: trained with the top layers."""
        return []

    def embed(self, model: PreTrainedModel, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[rows, width] token ids and their positions within their items -> [rows, width, hidden]."""
        raise NotImplementedError

    def layer_context(self, model: PreTrainedModel, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """Inputs every layer of one forward takes besides the states and the mask."""
        return {}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, context: dict) -> torch.Tensor:
        output = layer(hidden, attention_mask=mask, **context)
        return output[0] if isinstance(output, tuple) else output  # (some families return (states, ...))

    def finish(self, model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.final_modules(model):
            hidden = module(hidden)
        return hidden


TEXT_FAMILIES: Registry[type[TextFamily]] = Registry("transformers text model family")


@TEXT_FAMILIES.register("bert")
class BertFamily(TextFamily):
    model_kwargs = {"add_pooling_layer": False}  # the tower pools; an unused trainable pooler would get no gradients

    def layers(self, model):
        return model.encoder.layer

    def embedding_modules(self, model):
        return [model.embeddings]

    def embed(self, model, input_ids, positions):
        return model.embeddings(input_ids=input_ids, position_ids=positions)


@TEXT_FAMILIES.register("roberta")
@TEXT_FAMILIES.register("xlm-roberta")
class RobertaFamily(BertFamily):
    def embed(self, model, input_ids, positions):
        # RoBERTa counts positions from its padding index + 1
        return super().embed(model, input_ids, positions + model.embeddings.padding_idx + 1)


@TEXT_FAMILIES.register("opt")
class OPTFamily(TextFamily):
    causal = True

    def width(self, config):
        return config.word_embed_proj_dim  # project_out maps the last states to it (OPT-350M: 1024 -> 512)

    def layers(self, model):
        return model.decoder.layers

    def embedding_modules(self, model):
        decoder = model.decoder
        return [m for m in (decoder.embed_tokens, decoder.embed_positions, decoder.project_in) if m is not None]

    def final_modules(self, model):
        return [m for m in (model.decoder.final_layer_norm, model.decoder.project_out) if m is not None]

    def embed(self, model, input_ids, positions):
        decoder = model.decoder
        tokens = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            tokens = decoder.project_in(tokens)
        return tokens + decoder.embed_positions(None, position_ids=positions)  # (it adds OPT's offset of 2)


@TEXT_FAMILIES.register("gpt2")
class GPT2Family(TextFamily):
    causal = True

    def layers(self, model):
        return model.h

    def embedding_modules(self, model):
        return [model.wte, model.wpe, model.drop]

    def final_modules(self, model):
        return [model.ln_f]

    def embed(self, model, input_ids, positions):
        return model.drop(model.wte(input_ids) + model.wpe(positions))


@TEXT_FAMILIES.register("llama")
@TEXT_FAMILIES.register("mistral")
@TEXT_FAMILIES.register("qwen2")
@TEXT_FAMILIES.register("qwen3")
class RotaryDecoderFamily(TextFamily):
    """Llama and the families built like it: rotary positions, applied inside every layer's attention."""

    causal = True

    def layers(self, model):
        return model.layers

    def embedding_modules(self, model):
        return [model.embed_tokens]

    def final_modules(self, model):
        return [model.norm]

    def embed(self, model, input_ids, positions):
        return model.embed_tokens(input_ids)

    def layer_context(self, model, hidden, positions):
        return {"position_embeddings": model.rotary_emb(hidden, positions)}
