"""Item encoders: ItemBatch -> one vector per distinct item of the batch, [U, dim] in the order of `ids`.

An item encoder is built from the ModelConfig; registering a class under a name makes it selectable
as `model.item_encoder`. Its `mode` says how the data routes the rows of an ItemBatch (item_store.ITEM_MODES).
"""
from __future__ import annotations

import torch
from torch import nn

from transrec.config import ModelConfig
from transrec.batch import IMAGE, TEXT, ItemBatch
from transrec.models.frozen_cache import FrozenOutputCache
from transrec.models.image_encoder import ImageItemEncoder
from transrec.models.text_encoder import TextItemEncoder
from transrec.models.video_encoder import VideoItemEncoder
from transrec.registry import Registry

ITEM_ENCODERS: Registry[type[nn.Module]] = Registry("item encoder")


@ITEM_ENCODERS.register("id")
class IDItemEncoder(nn.Module):
    """The non-transferable baseline: one learned vector per global item index."""

    mode = "id"

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
    """Mixture of modalities: text items through the text tower, image items through the image tower, video items
    through the video tower (their frames through the image tower, pooled over time).

    Each tower is called on every step, on all of its rows, even when it has none (the image tower twice: images,
    then frames): under DeepSpeed ZeRO-3 every rank must run the same submodules in the same order, and an empty
    call also gives the tower's parameters (zero) gradients on every rank.
    """

    modalities: tuple[str, ...] = ("text", "image", "video")
    mode = "mom"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Only the towers this variant uses exist, so a text-only model holds no image parameters.
        self.text = TextItemEncoder(cfg.text, cfg.dim) if "text" in self.modalities else None
        visual = {"image", "video"} & set(self.modalities)  # a video's frames are images
        self.image = ImageItemEncoder(cfg.image, cfg.dim) if visual else None
        self.video = VideoItemEncoder(cfg) if "video" in self.modalities else None
        self.catalogue = ""  # that of the items the frozen-part caches hold

    def forward(self, items: ItemBatch) -> torch.Tensor:
        if items.catalogue != self.catalogue:  # the caches key items by id, and an id means one catalogue's item
            for cache in self.frozen_caches():
                cache.clear()
            self.catalogue = items.catalogue
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.text is not None:
            parts.append((items.text_rows, self.text(items.input_ids, items.attention_mask, items.ids[items.text_rows])))
        if "image" in self.modalities:
            images = items.images
            if images is None:  # no image item in this batch, so nothing was decoded
                if items.image_rows.numel():
                    raise ValueError("ItemBatch has image rows but no decoded images")
                images = torch.zeros(0, 3, *self.image.input_size, device=items.ids.device)
            parts.append((items.image_rows, self.image(images, items.ids[items.image_rows])))
        if self.video is not None:
            clips = items.clips
            if clips is None:  # no video item in this batch, so nothing was decoded
                if items.video_rows.numel():
                    raise ValueError("ItemBatch has video rows but no decoded clips")
                clips = torch.zeros(0, self.video.frames, 3, *self.image.input_size, device=items.ids.device)
            parts.append((items.video_rows, self.video(clips, self.image, items.ids[items.video_rows],
                                                       items.frame_indices)))
        if sum(rows.numel() for rows, _ in parts) != items.ids.numel():
            raise ValueError(f"item encoder {self.modalities} does not cover every row of the ItemBatch")
        # Out-of-place index_copy keeps the scatter differentiable with respect to each tower's output.
        vectors = parts[0][1].new_zeros(items.ids.numel(), parts[0][1].size(1))
        for rows, part in parts:
            vectors = vectors.index_copy(0, rows, part.to(vectors.dtype))
        return vectors

    def frozen_caches(self) -> list[FrozenOutputCache]:
        caches = [tower.frozen_cache for tower in (self.text, self.image) if tower is not None]
        return caches + ([self.video.frame_cache] if self.video is not None else [])

    @property
    def feature_width(self) -> int:
        """Width of `features`: the widest tower's output before its projection."""
        return max(tower.proj.in_features for tower in (self.text, self.image) if tower is not None)

    @torch.no_grad()
    def features(self, items: ItemBatch) -> torch.Tensor:
        """[U, feature_width] float32: each item's pooled tower output before its projection (the input of a
        two-stage model), zero-padded to the widest tower; no cache, no autograd."""
        out = torch.zeros(items.ids.numel(), self.feature_width)
        if self.text is not None and items.text_rows.numel():
            text = self.text.features(items.input_ids, items.attention_mask)
            out[items.text_rows, :text.shape[1]] = text.float().cpu()
        if "image" in self.modalities and items.image_rows.numel():
            image = self.image.features(items.images)
            out[items.image_rows, :image.shape[1]] = image.float().cpu()
        if self.video is not None and items.video_rows.numel():
            video = self.video.features(items.clips, self.image)
            out[items.video_rows, :video.shape[1]] = video.float().cpu()
        return out


@ITEM_ENCODERS.register("features")
class FeaturesItemEncoder(nn.Module):
    """MoRec's two-stage: each item's frozen-tower features, computed once per catalogue by `transrec features`,
    through a trained projection per modality (`model.features_head`); no tower runs in the training step. The
    features are data, not weights: `load_features` takes them from the data set, and checkpoints and exports
    leave them out."""

    mode = "id"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.features_width <= 0:
            raise ValueError("the features item encoder needs model.features_width (set from the data set's features)")
        self.register_buffer("table", torch.zeros(0, cfg.features_width), persistent=False)
        self.register_buffer("modality", torch.zeros(0, dtype=torch.int8), persistent=False)
        self.proj = nn.ModuleList(self._projection(cfg) for _ in (TEXT, IMAGE))

    @staticmethod
    def _projection(cfg: ModelConfig) -> nn.Module:
        """Features -> item vector: one linear layer, or MoRec's DNN (its hidden layer as wide as the vector)."""
        if cfg.features_head == "mlp":
            return nn.Sequential(nn.Linear(cfg.features_width, cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.dim, cfg.dim))
        return nn.Linear(cfg.features_width, cfg.dim)

    def load_features(self, table: torch.Tensor, modality: torch.Tensor) -> None:
        """[N, features_width] features and [N] modality codes of the catalogue."""
        if table.shape[1] != self.table.shape[1]:
            raise ValueError(f"features of width {table.shape[1]}, the model was built for {self.table.shape[1]}")
        weight = next(self.proj.parameters())
        self.table = table.to(weight)
        self.modality = modality.to(device=weight.device, dtype=torch.int8)

    def forward(self, items: ItemBatch) -> torch.Tensor:
        if not self.table.numel():
            raise ValueError("no item features loaded (FeaturesItemEncoder.load_features)")
        features = self.table[items.ids]
        # a clip's features are its frames' image features: images and videos share the image projection
        is_visual = (self.modality[items.ids] != TEXT)[:, None]
        return torch.where(is_visual, self.proj[IMAGE](features), self.proj[TEXT](features))


@ITEM_ENCODERS.register("text")
class TextOnlyItemEncoder(MoMItemEncoder):
    """Every item as text: the loader puts every row in `text_rows`."""

    modalities = ("text",)
    mode = "text"


@ITEM_ENCODERS.register("image")
class ImageOnlyItemEncoder(MoMItemEncoder):
    """Every item as an image: the loader puts every row in `image_rows`."""

    modalities = ("image",)
    mode = "image"


@ITEM_ENCODERS.register("video")
class VideoOnlyItemEncoder(MoMItemEncoder):
    """Every item as a video (MicroLens' end-to-end video recommender): the loader puts every row in `video_rows`."""

    modalities = ("video",)
    mode = "video"


class IDPlusContentItemEncoder(MoMItemEncoder):
    """MoRec's ID+content: an item's content vector plus a learned vector of its own. Not transferable (the ID
    table belongs to one catalogue); it shows what content adds to IDs, and IDs to content."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.ids = IDItemEncoder(cfg)

    def forward(self, items: ItemBatch) -> torch.Tensor:
        content = super().forward(items)
        return content + self.ids(items).to(content.dtype)


@ITEM_ENCODERS.register("id+text")
class IDPlusTextItemEncoder(IDPlusContentItemEncoder):
    modalities = ("text",)
    mode = "text"


@ITEM_ENCODERS.register("id+mom")
class IDPlusMoMItemEncoder(IDPlusContentItemEncoder):
    modalities = ("text", "image", "video")
    mode = "mom"
