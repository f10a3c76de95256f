"""Training losses over the P predicting positions of a batch.

Every loss takes
    user_vecs      [P, d]  user state at each predicting position
    item_vecs      [U, d]  the batch's distinct items (rows of ItemBatch.ids)
    target_rows    [P]     row of each position's target item
    negative_rows  [P, K]  rows of sampled negatives (K may be 0; the in-batch loss uses all rows instead)
    item_ids       [U]     global item index of each row
    positives      [P, U]  optional: True for rows the position's user interacted with (the target
                           included); those are never treated as negatives. Default: the target only.
and returns the mean over the P positions (0 when P == 0), computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transrec.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")


def _positives(positives: torch.Tensor | None, target_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return F.one_hot(target_rows, num_rows).bool() if positives is None else positives


class Loss(nn.Module):
    def set_item_popularity(self, counts: torch.Tensor) -> None:
        """Interaction count of every item [N]; losses that correct for popularity-biased sampling use it."""


@LOSSES.register("bce")
class BCELoss(Loss):
    """TransRec: binary cross-entropy, the target as a positive and each sampled negative as a negative."""

    def forward(
        self,
        user_vecs: torch.Tensor,
        item_vecs: torch.Tensor,
        target_rows: torch.Tensor,
        negative_rows: torch.Tensor,
        item_ids: torch.Tensor,
        positives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        users, items = user_vecs.float(), item_vecs.float()
        pos_logits = (users * items[target_rows]).sum(-1)  # [P]
        neg_logits = torch.einsum("pd,pkd->pk", users, items[negative_rows])  # [P, K]
        # A sampled negative the user did interact with (e.g. the target itself) is no negative.
        keep = ~_positives(positives, target_rows, items.size(0)).gather(1, negative_rows)
        # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
        per_position = F.softplus(-pos_logits) + (F.softplus(neg_logits) * keep).sum(-1)
        return per_position.sum() / max(per_position.numel(), 1)


@LOSSES.register("inbatch")
class InBatchSoftmaxLoss(Loss):
    """Sampled softmax over the batch's distinct items, with the logQ correction (Yi et al., 2019).

    Items enter the candidate set as often as they occur in training data, so popular items are
    over-sampled as negatives; subtracting log q(item) from every candidate logit (the target's too)
    makes the softmax estimate the one over all items. Without popularity set, no correction.
    """

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: popularity is a property of the training data, not of the model.
        self.register_buffer("log_q", torch.zeros(0), persistent=False)

    def set_item_popularity(self, counts: torch.Tensor) -> None:
        # An item never seen in training counts once, so its log q stays finite.
        counts = counts.double().clamp_min(1)
        self.log_q = (counts / counts.sum()).log().float().to(self.log_q.device)

    def forward(
        self,
        user_vecs: torch.Tensor,
        item_vecs: torch.Tensor,
        target_rows: torch.Tensor,
        negative_rows: torch.Tensor,
        item_ids: torch.Tensor,
        positives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = user_vecs.float() @ item_vecs.float().T  # [P, U]
        if self.log_q.numel():
            logits = logits - self.log_q[item_ids]
        # The user's other items are no negatives either; the target stays the label.
        others = _positives(positives, target_rows, logits.size(1)).clone()
        others[torch.arange(len(target_rows), device=logits.device), target_rows] = False
        logits = logits.masked_fill(others, float("-inf"))
        return F.cross_entropy(logits, target_rows, reduction="sum") / max(len(target_rows), 1)
