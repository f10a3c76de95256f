import math

import numpy as np
import torch

from transrec.batch import EvalBatch
from transrec.trainer.evaluate import evaluate_popularity, target_ranks
from transrec.trainer.metrics import means, metric_sums


def eval_batch(target, seen):
    n = len(target)
    return EvalBatch(users=torch.arange(n), history=torch.zeros(n, 1, dtype=torch.long),
                     history_mask=torch.ones(n, 1, dtype=torch.bool), seen=torch.tensor(seen),
                     target=torch.tensor(target), valid=torch.ones(n, dtype=torch.bool))


def test_hand_computed_ranks_with_history_masked():
    # 6 items on a line; user 0 scores item i as i, user 1 as -i.
    items = torch.arange(6, dtype=torch.float32)[:, None]
    users = torch.tensor([[1.0], [-1.0]])
    # user 0: target 3; items 4 and 5 score higher, but 5 is in the history -> rank 1.
    # user 1: target 2; items 0 and 1 score higher, neither seen -> rank 2 (item 3 is seen, scores lower).
    batch = eval_batch([3, 2], [[5, 0], [3, -1]])
    ranks = target_ranks(users, items, batch, chunk=4)  # chunks of 4 items: the rank adds up across chunks
    assert ranks.tolist() == [1, 2]
    sums = metric_sums(ranks, [1, 2, 3])
    result = means(sums)
    assert result["hr@1"] == 0.0 and result["hr@2"] == 0.5 and result["hr@3"] == 1.0
    assert math.isclose(result["ndcg@2"], (1 / math.log2(3)) / 2)
    assert math.isclose(result["ndcg@3"], (1 / math.log2(3) + 1 / math.log2(4)) / 2)


def test_target_in_history_is_never_masked_and_padding_rows_do_not_count():
    items = torch.tensor([[3.0], [2.0], [1.0]])
    batch = eval_batch([1, 0], [[1, 0], [-1, -1]])
    batch.valid = torch.tensor([True, False])
    ranks = target_ranks(torch.ones(2, 1), items, batch)
    assert ranks.tolist() == [0, 0]  # item 0 is seen, so target 1 ranks first
    assert means(metric_sums(ranks, [1], batch.valid)) == {"hr@1": 1.0, "ndcg@1": 1.0}


def test_popularity_baseline_ranks_by_train_counts():
    popularity = np.array([10, 50, 30, 20])
    batch = eval_batch([2, 0], [[1, -1], [3, -1]])  # user 0: item 1 seen -> target 2 first; user 1: 1,2 beat 0
    result = evaluate_popularity(popularity, [batch], [1, 3])
    assert result["hr@1"] == 0.5 and result["hr@3"] == 1.0
    assert math.isclose(result["ndcg@3"], (1.0 + 1 / math.log2(4)) / 2)
