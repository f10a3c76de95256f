"""Item encoders: ItemBatch -> one vector per distinct item of the batch, [U, dim] in the order of `ids`.

An item encoder is built from the ModelConfig; registering a class under a name makes it selectable
as `model.item_encoder`.
"""
from __future__ import annotations

import torch
from torch import nn

from transrec.config import ModelConfig
from transrec.batch import ItemBatch
from transrec.models.image_encoder import ImageItemEncoder
from transrec.models.text_encoder import TextItemEncoder
from transrec.registry import Registry

ITEM_ENCODERS: Registry[type[nn.Module]] = Registry("item encoder")


@ITEM_ENCODERS.register("id")
class IDItemEncoder(nn.Module):
    """The non-transferable baseline: one learned vector per global item index."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_items <= 0:
            raise ValueError("the id item encoder needs model.num_items (set from the dataset manifest)")
        self.embedding = nn.Embedding(cfg.num_items, cfg.dim)
        # Small, as BERT and SASRec start theirs: at N(0, 1) the first logits are ~dim in size, the softmax
        # saturates and Adam needs ~1/lr steps to shrink them (ml-100k: test NDCG@10 0.04 instead of 0.10).
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, items: ItemBatch) -> torch.Tensor:
        return self.embedding(items.ids)


@ITEM_ENCODERS.register("mom")
class MoMItemEncoder(nn.Module):
    """Mixture of modalities: text items through the text tower, image items through the image tower.

    Each tower is called exactly once per step, on all of its rows, even when it has none: under
    DeepSpeed ZeRO-3 every rank must run the same submodules in the same order, and an empty call
    also gives the tower's parameters (zero) gradients on every rank.
    """

    modalities: tuple[str, ...] = ("text", "image")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Only the towers this variant uses exist, so a text-only model holds no image parameters.
        self.text = TextItemEncoder(cfg.text, cfg.dim) if "text" in self.modalities else None
        self.image = ImageItemEncoder(cfg.image, cfg.dim) if "image" in self.modalities else None

    def forward(self, items: ItemBatch) -> torch.Tensor:
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.text is not None:
            parts.append((items.text_rows, self.text(items.input_ids, items.attention_mask, items.ids[items.text_rows])))
        if self.image is not None:
            images = items.images
            if images is None:  # no image item in this batch, so nothing was decoded
                if items.image_rows.numel():
                    raise ValueError("ItemBatch has image rows but no decoded images")
                images = torch.zeros(0, 3, *self.image.input_size, device=items.ids.device)
            parts.append((items.image_rows, self.image(images, items.ids[items.image_rows])))
        if sum(rows.numel() for rows, _ in parts) != items.ids.numel():
            raise ValueError(f"item encoder {self.modalities} does not cover every row of the ItemBatch")
        # Out-of-place index_copy keeps the scatter differentiable with respect to each tower's output.
        vectors = parts[0][1].new_zeros(items.ids.numel(), parts[0][1].size(1))
        for rows, part in parts:
            vectors = vectors.index_copy(0, rows, part.to(vectors.dtype))
        return vectors


@ITEM_ENCODERS.register("text")
class TextOnlyItemEncoder(MoMItemEncoder):
    """Every item as text: the loader puts every row in `text_rows`."""

    modalities = ("text",)


@ITEM_ENCODERS.register("image")
class ImageOnlyItemEncoder(MoMItemEncoder):
    """Every item as an image: the loader puts every row in `image_rows`."""

    modalities = ("image",)
