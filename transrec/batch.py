"""The batch the loader hands the trainer: every field is documented here, in one place.

A training batch names each distinct item once (`ItemBatch`), split by modality, and refers to items
everywhere else by their row in `ItemBatch.ids`, so the model encodes each item once per step and
scatters the vectors back into sequence order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

TEXT, IMAGE, VIDEO = 0, 1, 2  # modality codes of the item store


@dataclass
class ItemBatch:
    ids: torch.Tensor  # int64 [U]: global item indices of the distinct items of the batch
    text_rows: torch.Tensor  # int64 [Ut]: rows of `ids` that are text items
    input_ids: torch.Tensor  # int64 [Ut, L]: token ids, L = longest title in the batch
    attention_mask: torch.Tensor  # int64 [Ut, L]
    image_rows: torch.Tensor  # int64 [Ui]: rows of `ids` that are image items
    images: torch.Tensor | None  # float [Ui, 3, H, W], normalized; None until decoded
    jpegs: list[np.ndarray] | None = None  # encoded bytes of the image items, before decoding
    video_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # int64 [Uv]
    # int64 [Uv, K]: the frames of each clip that `clips` holds, sorted; None until decoded (videos.sample_frames)
    frame_indices: torch.Tensor | None = None
    clips: torch.Tensor | None = None  # float [Uv, K, 3, H, W], normalized; None until decoded
    encoded_clips: list[np.ndarray] | None = None  # the video items' clips (WebM bytes), before decoding
    catalogue: str = ""  # the item store that `ids` index (its directory): an id means an item of this one only

    def to(self, device: torch.device | str) -> "ItemBatch":
        return _to(self, device)

    def select(self, rows: torch.Tensor) -> "ItemBatch":
        """The items at `rows` (of `ids`), in that order, with their content (tokens cut to the longest kept)."""
        rows = rows.to(self.ids.device)
        modality_rows = {}
        for name in ("text_rows", "image_rows", "video_rows"):
            position = torch.full_like(self.ids, -1)  # row of ids -> index into this modality's content
            own = getattr(self, name)
            position[own] = torch.arange(own.numel(), device=own.device)
            kept = position[rows]
            modality_rows[name] = ((kept >= 0).nonzero().squeeze(1), kept[kept >= 0])
        text_rows, text_index = modality_rows["text_rows"]
        image_rows, image_index = modality_rows["image_rows"]
        video_rows, video_index = modality_rows["video_rows"]
        attention_mask = self.attention_mask[text_index]
        width = int(attention_mask.sum(1).max()) if text_index.numel() else self.attention_mask.shape[1]

        def pick(content: torch.Tensor | list | None, index: torch.Tensor):
            if content is None:
                return None
            return [content[i] for i in index.tolist()] if isinstance(content, list) else content[index]

        return ItemBatch(
            ids=self.ids[rows], text_rows=text_rows, input_ids=self.input_ids[text_index, :width],
            attention_mask=attention_mask[:, :width], image_rows=image_rows,
            images=pick(self.images, image_index), jpegs=pick(self.jpegs, image_index), video_rows=video_rows,
            frame_indices=pick(self.frame_indices, video_index), clips=pick(self.clips, video_index),
            encoded_clips=pick(self.encoded_clips, video_index), catalogue=self.catalogue,
        )


@dataclass
class Batch:
    items: ItemBatch  # the items this process encodes: every row of `row_ids`, unless ranks share them
    # int64 [R]: global item index of each row that history, targets and negatives refer to (sorted, distinct):
    # `items.ids`, or, once ranks share their items (trainer/item_sharing.py), those of every rank's batch
    row_ids: torch.Tensor
    users: torch.Tensor  # int64 [S]: the user of each sequence of the batch (a sequence gives 1+ rows: windows)
    history: torch.Tensor  # int64 [B, T]: rows of row_ids; left-padded, padding = 0
    history_mask: torch.Tensor  # bool [B, T]: True where history holds an item
    targets: torch.Tensor  # int64 [B, T]: row of the item that follows each history position
    target_mask: torch.Tensor  # bool [B, T]: True where a position has a target to predict
    negatives: torch.Tensor  # int64 [B, T, K]: rows of sampled negatives (K may be 0)
    # bool [B, T+1] (bert4rec's cloze): the masked positions of each window, laid out as its history followed by
    # its last target; None: every target position predicts its next item
    cloze: torch.Tensor | None = None
    # bad_data.BadRecord of every sequence or sample dropped from this batch and every image or clip blanked in it
    skipped: list = field(default_factory=list)
    stream_samples: int = 0  # train samples (blocks of sequences) this batch was made of: the loader's step

    def to(self, device: torch.device | str) -> "Batch":
        return _to(self, device)


@dataclass
class EvalBatch:
    users: torch.Tensor  # int64 [B]
    history: torch.Tensor  # int64 [B, T]: global item indices, left-padded with 0
    history_mask: torch.Tensor  # bool [B, T]
    seen: torch.Tensor  # int64 [B, S]: every item of the user's history (all of it, not cut to T), -1 = pad
    target: torch.Tensor  # int64 [B]: the held-out item
    valid: torch.Tensor  # bool [B]: False for padding rows added to balance ranks

    def to(self, device: torch.device | str) -> "EvalBatch":
        return _to(self, device)


def _to(obj, device):
    values = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        elif hasattr(value, "to") and not isinstance(value, (list, np.ndarray)):
            value = value.to(device)
        values[f.name] = value
    return type(obj)(**values)
