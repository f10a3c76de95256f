"""Losses against hand-computed values; logQ direction; padding positions do not count."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from transrec.config import ModelConfig
from transrec.dataloading.batch import Batch, ItemBatch
from transrec.models import LOSSES, TransRec

# 2 users (predicting positions), 3 distinct items with global ids 10, 11, 12.
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
IDS = torch.tensor([10, 11, 12])
TARGETS = torch.tensor([0, 1])
NEGATIVES = torch.tensor([[1], [2]])
# user 0 scores items [1, 0, 1], user 1 scores them [0, 2, 1]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def softmax_ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def test_bce_matches_hand_computation():
    loss = LOSSES.get("bce")()(USERS, ITEMS, TARGETS, NEGATIVES, IDS)
    # -log sigmoid(pos) - log(1 - sigmoid(neg)) = softplus(-pos) + softplus(neg)
    expected = ((softplus(-1) + softplus(0)) + (softplus(-2) + softplus(1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_skips_negatives_the_user_interacted_with():
    bce = LOSSES.get("bce")()
    # a sampled negative that is the target itself is no negative
    loss = bce(USERS[:1], ITEMS, TARGETS[:1], torch.tensor([[0]]), IDS)
    assert loss.item() == pytest.approx(softplus(-1), rel=1e-6)
    # nor is one the user saw elsewhere in the batch (user 0 saw item row 1)
    positives = torch.tensor([[True, True, False], [False, True, False]])
    loss = bce(USERS, ITEMS, TARGETS, NEGATIVES, IDS, positives)
    assert loss.item() == pytest.approx((softplus(-1) + softplus(-2) + softplus(1)) / 2, rel=1e-6)


def test_inbatch_matches_hand_computation():
    inbatch = LOSSES.get("inbatch")()
    loss = inbatch(USERS, ITEMS, TARGETS, NEGATIVES, IDS)
    expected = (softmax_ce([1, 0, 1], 0) + softmax_ce([0, 2, 1], 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the user's other items leave the candidate set; the target stays the label
    positives = torch.tensor([[True, False, True], [False, True, False]])
    loss = inbatch(USERS, ITEMS, TARGETS, NEGATIVES, IDS, positives)
    expected = (softmax_ce([1, 0], 0) + softmax_ce([0, 2, 1], 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_logq_correction_matches_hand_computation_and_direction():
    counts = torch.zeros(13)
    counts[10], counts[11], counts[12] = 1, 1, 100  # item 12 is popular; ids 0..9 never seen (count as 1)
    plain = LOSSES.get("inbatch")()
    corrected = LOSSES.get("inbatch")()
    corrected.set_item_popularity(counts)
    assert "log_q" not in corrected.state_dict()  # data statistics, not model weights

    log_q = [math.log(c / 112) for c in (1, 1, 100)]  # 10 unseen + 1 + 1 + 100 = 112
    users_logits = [[1, 0, 1], [0, 2, 1]]
    corrected_logits = [[z - q for z, q in zip(row, log_q)] for row in users_logits]
    expected = (softmax_ce(corrected_logits[0], 0) + softmax_ce(corrected_logits[1], 1)) / 2
    loss = corrected(USERS, ITEMS, TARGETS, NEGATIVES, IDS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Rare targets against a popular negative: the correction discounts the popular negative.
    assert loss < plain(USERS, ITEMS, TARGETS, NEGATIVES, IDS)
    # A popular target is discounted itself, so predicting it earns less.
    popular = torch.tensor([2, 2])
    assert corrected(USERS, ITEMS, popular, NEGATIVES, IDS) > plain(USERS, ITEMS, popular, NEGATIVES, IDS)


@pytest.mark.parametrize("name", ["bce", "inbatch"])
def test_no_predicting_position_gives_zero_not_nan(name: str):
    loss = LOSSES.get(name)()(USERS[:0], ITEMS, TARGETS[:0], NEGATIVES[:0], IDS)
    assert loss.item() == 0.0


def id_batch(T: int = 4) -> Batch:
    """Two left-padded users over 5 distinct items (ID encoder: no content needed)."""
    history = torch.tensor([[0, 0, 1, 2], [0, 3, 4, 1]])
    mask = torch.tensor([[False, False, True, True], [False, True, True, True]])
    targets = torch.tensor([[0, 0, 2, 3], [0, 4, 1, 2]])
    negatives = torch.tensor([[[0], [0], [4], [4]], [[0], [0], [2], [3]]])
    empty = torch.zeros(0, dtype=torch.long)
    items = ItemBatch(
        ids=torch.tensor([3, 8, 5, 0, 6]),
        text_rows=empty,
        input_ids=torch.zeros(0, 0, dtype=torch.long),
        attention_mask=torch.zeros(0, 0, dtype=torch.long),
        image_rows=empty,
        images=None,
    )
    return Batch(items, torch.arange(2), history, mask, targets, mask.clone(), negatives, torch.arange(2))


@pytest.mark.parametrize("loss", ["bce", "inbatch"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_padding_positions_do_not_contribute(loss: str, attention: str):
    torch.manual_seed(0)
    cfg = ModelConfig(item_encoder="id", num_items=10, dim=8, layers=1, heads=2, dropout=0.0, max_seq_len=4)
    cfg = dataclasses.replace(cfg, loss=loss, attention=attention)
    model = TransRec(cfg).eval()
    batch = id_batch()
    with torch.no_grad():
        reference = model(batch)
        # Garbage at padding positions changes nothing.
        batch.targets[~batch.target_mask] = 4
        batch.negatives[~batch.target_mask] = 1
        assert model(batch) == reference
        # And the loss is the loss function over exactly the predicting positions.
        vectors = model.encode_items(batch.items)
        hidden = model.user_encoder(vectors[batch.history], batch.history_mask)
        predicting = batch.target_mask.clone()
        if attention == "bidirectional":
            predicting[:, :-1] = False  # only the newest state predicts: the others have seen their target
        seen = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])
        b = predicting.nonzero()[:, 0]
        targets, negatives = batch.targets[predicting], batch.negatives[predicting]
        expected = model.loss(hidden[predicting], vectors, targets, negatives, batch.items.ids, seen[b])
    torch.testing.assert_close(reference, expected)
    assert int(predicting.sum()) == (5 if attention == "causal" else 2)
