"""The batch the loader hands the trainer: every field is documented here, in one place.

A training batch names each distinct item once (`ItemBatch`), split by modality, and refers to items
everywhere else by their row in `ItemBatch.ids`, so the model encodes each item once per step and
scatters the vectors back into sequence order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

TEXT, IMAGE = 0, 1  # modality codes of the item store


@dataclass
class ItemBatch:
    ids: torch.Tensor  # int64 [U]: global item indices of the distinct items of the batch
    text_rows: torch.Tensor  # int64 [Ut]: rows of `ids` that are text items
    input_ids: torch.Tensor  # int64 [Ut, L]: token ids, L = longest title in the batch
    attention_mask: torch.Tensor  # int64 [Ut, L]
    image_rows: torch.Tensor  # int64 [Ui]: rows of `ids` that are image items
    images: torch.Tensor | None  # float [Ui, 3, H, W], normalized; None until decoded
    jpegs: list[np.ndarray] | None = None  # encoded bytes of the image items, before decoding

    def to(self, device: torch.device | str) -> "ItemBatch":
        return _to(self, device)


@dataclass
class Batch:
    items: ItemBatch
    users: torch.Tensor  # int64 [B]: user indices (each names one train sequence)
    history: torch.Tensor  # int64 [B, T]: rows into items.ids; left-padded, padding = 0
    history_mask: torch.Tensor  # bool [B, T]: True where history holds an item
    targets: torch.Tensor  # int64 [B, T]: row of the item that follows each history position
    target_mask: torch.Tensor  # bool [B, T]: True where a position has a target to predict
    negatives: torch.Tensor  # int64 [B, T, K]: rows of sampled negatives (K may be 0)
    # bad_data.BadRecord of every sequence or sample dropped from this batch and every image blanked in it
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
