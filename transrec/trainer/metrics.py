"""Full-ranking metrics for one held-out item per user: HR@K and NDCG@K.

With a single relevant item, both depend only on its rank r (0-based) among all candidates:
HR@K = [r < K], NDCG@K = [r < K] / log2(r + 2). The rank is the number of candidates that score
strictly higher than the target (ties go to the target), so it can be counted chunk by chunk over the
item catalogue in bounded memory, with no sort and no top-k list.

A user-attribute classifier (trainer/user_task.py) is measured by accuracy and macro-F1.
"""
from __future__ import annotations

import torch


def count_higher(scores: torch.Tensor, target_scores: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, how many candidates of `scores` [B, C] beat `target_scores` [B]; `excluded` [B, C] masks some out."""
    higher = scores > target_scores[:, None]
    if excluded is not None:
        higher &= ~excluded
    return higher.sum(dim=1)


def ndcg_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, NDCG@K of a target at 0-based rank `ranks` (float64)."""
    ranks = ranks.double()
    return (ranks < k) / torch.log2(ranks + 2)


def metric_sums(ranks: torch.Tensor, ks: list[int], valid: torch.Tensor | None = None) -> dict[str, float]:
    """Sums (not means) of HR@K and NDCG@K over the rows, plus the row count, so ranks can add them up."""
    if valid is not None:
        ranks = ranks[valid]
    sums = {"count": float(ranks.numel())}
    for k in ks:
        sums[f"hr@{k}"] = (ranks < k).sum().item()
        sums[f"ndcg@{k}"] = ndcg_at(ranks, k).sum().item()
    return sums


def add_sums(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def means(sums: dict[str, float]) -> dict[str, float]:
    count = sums.get("count", 0.0)
    return {key: value / count for key, value in sums.items() if key != "count"} if count else {}


def classification_metrics(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 of `predicted` classes against `labels` (int [n] each). Macro-F1 is the mean F1 =
    2TP / (2TP + FP + FN) of the classes that occur in either, as scikit-learn's: a class that is predicted but
    never true counts as 0, one neither predicted nor true not at all."""
    classes = torch.unique(torch.cat([labels, predicted]))
    true, chosen = labels[:, None] == classes, predicted[:, None] == classes
    f1 = 2 * (true & chosen).sum(0) / (true.sum(0) + chosen.sum(0))  # 2TP+FP+FN = true count + predicted count
    return {"accuracy": (predicted == labels).double().mean().item(), "macro_f1": f1.double().mean().item()}
