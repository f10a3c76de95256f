"""Text tower: a transformers text model (an encoder such as BERT, or a decoder-only LLM such as OPT or Llama), its
token states pooled and projected to the model width."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from transrec.config import TextEncoderConfig
from transrec.dataloading import resolve_pretrained_path
from transrec.models.frozen_cache import FrozenOutputCache
from transrec.models.text_families import TEXT_FAMILIES, TextFamily

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel


def _load_body(cfg: TextEncoderConfig) -> tuple[PreTrainedModel, TextFamily]:
    """The transformers model (pretrained weights, or random ones from `cfg.config`) and its family's runner."""
    from transformers import AutoConfig, AutoModel  # (here: a model without text never pays its seconds of import)

    if cfg.pretrained:
        path = resolve_pretrained_path(cfg.pretrained)
        hf_config = AutoConfig.from_pretrained(path)
        build = partial(AutoModel.from_pretrained, path, config=hf_config)
    else:
        fields = dict(cfg.config)
        hf_config = AutoConfig.for_model(fields.pop("model_type", "bert"), **fields)
        build = partial(AutoModel.from_config, hf_config)
    family = TEXT_FAMILIES.get(hf_config.model_type)()
    return build(**family.model_kwargs), family


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

    @property
    def first(self) -> torch.Tensor:
        """[n] the index (into the token list) of each item's first token."""
        return torch.cumsum(self.lengths, 0) - self.lengths

    def additive_mask(self, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
        """[rows, 1, width, width]: 0 where a token may attend (its own item's tokens; `causal`: those up to
        itself), the dtype's min elsewhere. An empty slot attends only itself, so no softmax row is all masked."""
        segment = self.grid(self.item + 1).view(self.rows, self.width)  # 0 = empty slot
        allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0)
        if causal:  # an item's tokens sit in consecutive columns, in order
            allowed &= torch.ones(self.width, self.width, dtype=torch.bool, device=segment.device).tril()
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


def _mean(states: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    pooled = states.new_zeros(layout.lengths.numel(), states.shape[1]).index_add(0, layout.item, states)
    return pooled / layout.lengths.clamp_min(1)[:, None].to(states.dtype)


# model.text.pooling: [tokens, width] token states (item by item) -> [n, width], one vector per item
POOLINGS: dict[str, Callable[[torch.Tensor, TokenLayout], torch.Tensor]] = {
    "mean": _mean,
    "cls": lambda states, layout: states[layout.first],
    "last": lambda states, layout: states[layout.first + layout.lengths - 1],
}


def append_token(tokens: torch.Tensor, lengths: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, lengths) of items listed item by item, with `token` after each item's own."""
    lengths = lengths + 1
    out = tokens.new_full((tokens.numel() + lengths.numel(),), token)
    own = torch.ones(out.numel(), dtype=torch.bool, device=out.device)
    own[torch.cumsum(lengths, 0) - 1] = False
    out[own] = tokens
    return out, lengths


def _is_peft_model(body: nn.Module) -> bool:
    """Whether `body` is wrapped by peft, which only runs that use it import (it takes seconds a process)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(body, peft.PeftModel)


class TextItemEncoder(nn.Module):
    """input_ids, attention_mask [n, L] (padded on either side) -> item vectors [n, dim].

    The items' tokens are packed into rows of `pack_width` slots (TokenLayout) unless it is 0, and run through
    the body's pieces (text_families.py): its embeddings and the layers below the top `trainable_blocks` without
    autograd (with `cache_frozen`, once per item), the rest with it."""

    def __init__(self, cfg: TextEncoderConfig, dim: int):
        super().__init__()
        self.pooling, self.pack_width, self.item_token = cfg.pooling, cfg.pack_width, cfg.item_token
        self.body, self.family = _load_body(cfg)
        self.pretrained = bool(cfg.pretrained)  # pretrained weights train at encoder_lr, random ones at lr
        self.proj = nn.Linear(self.family.width(self.body.config), dim)
        layers = self.layers
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
    def transformer(self) -> PreTrainedModel:
        """The transformers model: the body, or the model inside its peft wrapper."""
        return self.body.get_base_model() if _is_peft_model(self.body) else self.body

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.transformer)

    @property
    def peft_config(self) -> PeftConfig | None:
        return self.body.active_peft_config if _is_peft_model(self.body) else None

    def add_peft(self, config: PeftConfig) -> None:
        """Wraps the body in a peft adapter (LoRA, ...: peft.get_peft_model), which then trains in place of the
        body's own weights. Only the layers that run with autograd take it: the frozen ones below stay a fixed
        function of the tokens (and may be cached)."""
        if not self.all_trainable:
            layers = self.layers
            path = next(name for name, module in self.transformer.named_modules() if module is layers)
            config = dataclasses.replace(config, layers_to_transform=list(range(self.first_trainable, len(layers))),
                                         layers_pattern=path.rsplit(".", 1)[-1])
        from peft import get_peft_model

        self.body = get_peft_model(self.body, config)

    def load_peft(self, directory: str | Path) -> None:
        """Wraps the body in the adapter saved in `directory` (peft's format), which goes on training."""
        from peft import PeftModel

        self.body = PeftModel.from_pretrained(self.body, str(directory), is_trainable=True)

    def merge_peft(self) -> None:
        """Folds the adapter into the body's weights (peft's merge_and_unload): a plain transformers model again."""
        self.body = self.body.merge_and_unload()

    @property
    def real_token_share(self) -> float:
        """Of the token slots the layers computed in the last call, the share that held a real token."""
        real, slots = self.layer_tokens
        return real / slots if slots else 1.0

    def _run_layers(self, layers: nn.ModuleList, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        mask = layout.additive_mask(hidden.dtype, self.family.causal)
        context = self.family.layer_context(self.transformer, hidden, layout.grid(layout.position))
        for layer in layers:
            hidden = self.family.run_layer(layer, hidden, mask, context)
        self.layer_tokens[0] += layout.tokens * len(layers)
        self.layer_tokens[1] += layout.rows * layout.width * len(layers)
        return hidden

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: it gives the trainable top layers gradients even though their input (the frozen layers'
        # output) does not require grad, and it works under DeepSpeed ZeRO-3, frozen weights inside checkpointed
        # layers (LoRA's) included: DeepSpeed 0.19.8 no longer crashes on them (transformers#47254).
        self.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def frozen_modules(self) -> list[nn.Module]:
        if self.all_trainable:
            return []
        return [*self.family.embedding_modules(self.transformer), *self.layers[: self.first_trainable]]

    def _embed(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """[rows, width, hidden]: the embeddings of the laid-out tokens, positions counted within each item."""
        return self.family.embed(self.transformer, layout.grid(tokens), layout.grid(layout.position))

    @torch.no_grad()
    def _frozen_forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """[tokens, hidden]: embeddings and frozen layers, without autograd or dropout (frozen means fixed)."""
        frozen = self.frozen_modules()
        for module in frozen:
            module.eval()
        hidden = self._run_layers(self.layers[: self.first_trainable], self._embed(tokens, layout), layout)
        for module in frozen:
            module.train(self.training)
        return hidden.flatten(0, 1)[layout.slot]

    def _frozen_cached(self, tokens: torch.Tensor, layout: TokenLayout, item_ids: torch.Tensor) -> torch.Tensor:
        """As _frozen_forward, each item's states computed on its first encoding only."""
        starts = layout.first

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
        """[n, width]: the pooled token states, before the projection (what a two-stage model starts from)."""
        n = input_ids.size(0)
        if n == 0:
            # BERT cannot reshape an empty batch; run one 1-token dummy row instead, so every rank still
            # calls the same submodules (ZeRO-3 gathers parameters per call) and gets zero grads.
            input_ids, attention_mask, item_ids = input_ids.new_zeros(1, 1), attention_mask.new_ones(1, 1), None
        states, layout = self.token_states(input_ids, attention_mask, item_ids)
        return POOLINGS[self.pooling](states, layout)[:n]

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     item_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenLayout]:
        """[tokens, width]: the body's last states of every item's tokens (item by item, in order, `item_token`
        last), and their layout."""
        lengths, tokens = attention_mask.sum(1), input_ids[attention_mask.bool()]  # item by item
        if self.item_token >= 0:
            tokens, lengths = append_token(tokens, lengths, self.item_token)
        layout = TokenLayout.build(lengths, self.pack_width)
        self.layer_tokens = [0, 0]
        if self.all_trainable:
            hidden = self._embed(tokens, layout)
        else:
            if self.cache_frozen and item_ids is not None:
                states = self._frozen_cached(tokens, layout, item_ids)
            else:
                states = self._frozen_forward(tokens, layout)
            hidden = layout.grid(states.to(self.proj.weight.dtype))
        hidden = self._run_layers(self.layers[self.first_trainable :], hidden, layout)
        hidden = self.family.finish(self.transformer, hidden)
        return hidden.flatten(0, 1)[layout.slot], layout
