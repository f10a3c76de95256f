"""Training losses over the P predicting positions of a batch.

Every loss takes
    users       [P, d]  user state at each predicting position (as scored: over the temperature, if any)
    candidates  [C, d]  the candidate items (negatives.py says which), as scored
    targets     [P]     row of each position's target among the candidates
    negatives   [P, K]  rows of items sampled per position (bce; K may be 0)
    excluded    (positions, rows) of the pairs that are no negatives (items the user interacted with), or None
    log_q       [C]     log of each candidate's chance of being drawn, subtracted from its logit, or None
and returns the SUM over the P positions in float32 (0 when P == 0): the caller normalizes, by the positions
of the global batch when ranks share their items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transrec.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")


@LOSSES.register("softmax")
class SoftmaxLoss(nn.Module):
    """Cross-entropy of the target against every candidate (sampled softmax; exact over the catalogue).

    With log_q, each logit is corrected by the candidate's sampling probability (Yi et al. 2019): a popular
    item is drawn into the candidate set more often than a rare one, so it is over-penalized as a negative
    unless its logit is lowered by log q.
    """

    def forward(self, users: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
                log_q: torch.Tensor | None = None) -> torch.Tensor:
        logits = users.float() @ candidates.float().T  # [P, C]
        if log_q is not None:
            logits = logits - log_q
        if excluded is not None:  # (in place: the matmul does not keep its output for its backward)
            logits.index_put_(excluded, logits.new_tensor(float("-inf")))
        return F.cross_entropy(logits, targets, reduction="sum")


@LOSSES.register("bce")
class BCELoss(nn.Module):
    """TransRec's objective: binary cross-entropy, the target a positive, each sampled negative a negative. The
    loader draws the negatives from the items the user never interacted with, so none needs excluding."""

    def forward(self, users: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
                log_q: torch.Tensor | None = None) -> torch.Tensor:
        users, candidates = users.float(), candidates.float()
        pos_logits = (users * candidates[targets]).sum(-1)  # [P]
        neg_logits = torch.einsum("pd,pkd->pk", users, candidates[negatives])  # [P, K]
        # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
        return (F.softplus(-pos_logits) + F.softplus(neg_logits).sum(-1)).sum()
