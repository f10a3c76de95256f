"""A recommender's users classified by their histories (PeterRec's user transfer: trainer/user_task.py)."""
from __future__ import annotations

import torch
from torch import nn

from transrec.models.transrec import TransRec


class UserClassifier(nn.Module):
    """The recommender's user vector (the state at the newest item, `TransRec.encode_users`) through a head
    (dropout, linear) -> class logits."""

    def __init__(self, recommender: TransRec, num_classes: int):
        super().__init__()
        self.recommender = recommender
        self.head = nn.Sequential(nn.Dropout(recommender.cfg.dropout), nn.Linear(recommender.cfg.dim, num_classes))

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Item vectors of left-padded histories [B, T, dim] and their mask [B, T] -> logits [B, num_classes]."""
        return self.head(self.recommender.encode_users(item_vectors, mask))

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
        """The recommender's optimizer groups (TransRec.param_groups), and the head's at `lr`."""
        linear = self.head[-1]
        return [*self.recommender.param_groups(lr, encoder_lr, weight_decay),
                {"name": "head", "params": [linear.weight], "lr": lr, "weight_decay": weight_decay},
                {"name": "head_no_decay", "params": [linear.bias], "lr": lr, "weight_decay": 0.0}]
