"""Losses and negative sources against hand-computed values; logQ direction; the bank; padding positions."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from transrec.config import ModelConfig
from transrec.batch import Batch, ItemBatch
from transrec.models import LOSSES, TransRec
from transrec.models.negatives import ItemVectorBank, log_inclusion

# 2 predicting positions, 3 candidates.
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
TARGETS = torch.tensor([0, 1])
NEGATIVES = torch.tensor([[1], [2]])
# position 0 scores the candidates [1, 0, 1], position 1 scores them [0, 2, 1]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def softmax_ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def test_bce_matches_hand_computation():
    loss = LOSSES.get("bce")()(USERS, ITEMS, TARGETS, NEGATIVES)
    # -log sigmoid(pos) - log(1 - sigmoid(neg)) = softplus(-pos) + softplus(neg), summed over positions
    expected = (softplus(-1) + softplus(0)) + (softplus(-2) + softplus(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_softmax_over_every_candidate_is_cross_entropy_over_the_catalogue():
    torch.manual_seed(0)
    users, catalogue = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([0, 3, 8, 3, 1])
    loss = LOSSES.get("softmax")()(users, catalogue, targets, targets[:, None])
    torch.testing.assert_close(loss, F.cross_entropy(users @ catalogue.T, targets, reduction="sum"))
    assert loss.item() == pytest.approx(
        sum(softmax_ce((users[p] @ catalogue.T).tolist(), int(targets[p])) for p in range(5)), rel=1e-5)


def test_excluded_pairs_leave_the_candidates_and_the_target_stays():
    softmax = LOSSES.get("softmax")()
    # position 0 interacted with candidate 2 as well: it is no negative for position 0
    excluded = (torch.tensor([0]), torch.tensor([2]))
    loss = softmax(USERS, ITEMS, TARGETS, NEGATIVES, excluded)
    assert loss.item() == pytest.approx(softmax_ce([1, 0], 0) + softmax_ce([0, 2, 1], 1), rel=1e-6)
    # and gradients flow only to what was scored
    items = ITEMS.clone().requires_grad_()
    softmax(USERS[:1], items, TARGETS[:1], NEGATIVES[:1], excluded).backward()
    assert items.grad[2].abs().sum() == 0 and items.grad[:2].abs().sum() > 0


def test_logq_correction_matches_hand_computation_and_direction():
    popularity = torch.tensor([0.01, 0.01, 0.98])  # candidate 2 is popular
    log_q = log_inclusion(popularity, positions=2, sampled=0)
    torch.testing.assert_close(log_q, torch.tensor([0.02, 0.02, 1.0]).log())  # an item certain to come: q = 1
    softmax = LOSSES.get("softmax")()
    corrected = softmax(USERS, ITEMS, TARGETS, NEGATIVES, None, log_q)
    logits = [[z - q for z, q in zip(row, log_q.tolist())] for row in ([1, 0, 1], [0, 2, 1])]
    assert corrected.item() == pytest.approx(softmax_ce(logits[0], 0) + softmax_ce(logits[1], 1), rel=1e-6)
    plain = softmax(USERS, ITEMS, TARGETS, NEGATIVES)
    # Rare targets against a popular negative: the correction discounts the popular negative.
    assert corrected < plain
    # A popular target is discounted itself, so predicting it earns less.
    popular = torch.tensor([2, 2])
    assert softmax(USERS, ITEMS, popular, NEGATIVES, None, log_q) > softmax(USERS, ITEMS, popular, NEGATIVES)
    # uniform draws raise every item's chance alike: the correction shrinks towards none
    mixed = log_inclusion(popularity, positions=2, sampled=300)
    assert (mixed >= log_q).all() and mixed.max() == 0


@pytest.mark.parametrize("name", ["bce", "softmax"])
def test_no_predicting_position_gives_zero_not_nan(name: str):
    loss = LOSSES.get(name)()(USERS[:0], ITEMS, TARGETS[:0], NEGATIVES[:0])
    assert loss.item() == 0.0


def id_batch() -> Batch:
    """Two left-padded users over 5 distinct items (ID encoder: no content needed)."""
    history = torch.tensor([[0, 0, 1, 2], [0, 3, 4, 1]])
    mask = torch.tensor([[False, False, True, True], [False, True, True, True]])
    targets = torch.tensor([[0, 0, 2, 3], [0, 4, 1, 2]])
    negatives = torch.tensor([[[0], [0], [4], [4]], [[0], [0], [2], [3]]])
    empty = torch.zeros(0, dtype=torch.long)
    ids = torch.tensor([0, 3, 5, 6, 8])
    items = ItemBatch(ids=ids, text_rows=empty, input_ids=torch.zeros(0, 0, dtype=torch.long),
                      attention_mask=torch.zeros(0, 0, dtype=torch.long), image_rows=empty, images=None)
    return Batch(items, ids, torch.arange(2), history, mask, targets, mask.clone(), negatives)


def id_model(**overrides) -> TransRec:
    torch.manual_seed(0)
    cfg = ModelConfig(item_encoder="id", num_items=10, dim=8, layers=1, heads=2, dropout=0.0, max_seq_len=4)
    return TransRec(dataclasses.replace(cfg, **overrides)).eval()


@pytest.mark.parametrize("loss", ["bce", "softmax"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_padding_positions_do_not_contribute(loss: str, attention: str):
    model = id_model(loss=loss, attention=attention, mask_seen=False)
    batch = id_batch()
    with torch.no_grad():
        reference = model(batch).loss
        # Garbage at padding positions changes nothing.
        batch.targets[~batch.target_mask] = 4
        batch.negatives[~batch.target_mask] = 1
        assert model(batch).loss == reference
        # And the loss is the loss function over exactly the predicting positions, averaged.
        vectors = model.encode_items(batch.items)
        hidden = model.user_encoder(vectors[batch.history], batch.history_mask)
        predicting = model.predicting(batch)
        targets, negatives = batch.targets[predicting], batch.negatives[predicting]
        expected = model.loss(hidden[predicting], vectors, targets, negatives) / predicting.sum()
    torch.testing.assert_close(reference, expected)
    assert int(predicting.sum()) == (5 if attention == "causal" else 2)


def test_mask_seen_switch_removes_the_users_other_items_from_its_negatives():
    batch = id_batch()
    with torch.no_grad():
        masked, unmasked = id_model(mask_seen=True)(batch).loss, id_model(mask_seen=False)(batch).loss
        model = id_model()
        vectors = model.encode_items(batch.items)
        hidden = model.user_encoder(vectors[batch.history], batch.history_mask)[batch.target_mask]
        # by hand: each position's softmax over the 5 items, leaving out the other items of its user's window
        windows = [{1, 2, 3}, {3, 4, 1, 2}]
        positions = batch.target_mask.nonzero()[:, 0].tolist()
        targets = batch.targets[batch.target_mask].tolist()
        expected = 0.0
        for p, (user, target) in enumerate(zip(positions, targets)):
            keep = [r for r in range(5) if r == target or r not in windows[user]]
            logits = (hidden[p] @ vectors[keep].T).tolist()
            expected += softmax_ce(logits, keep.index(target))
    assert masked.item() == pytest.approx(expected / len(targets), rel=1e-5)
    assert masked < unmasked  # fewer competitors for the target


def test_extra_negatives_join_the_softmax_without_gradient():
    model = id_model()
    batch = id_batch()
    bank = ItemVectorBank(10, 8)
    first = model(batch)
    bank.update(batch.row_ids, first.item_vectors)
    assert bank.filled.sum() == 5 and not first.item_vectors.requires_grad
    assert bank.negatives(batch.row_ids)[0].numel() == 0  # every banked item is in the batch: nothing extra
    bank.update(torch.tensor([1, 9]), torch.randn(2, 8))  # items this batch lacks, encoded by an earlier step
    ids, vectors = bank.negatives(batch.row_ids)
    assert ids.tolist() == [1, 9] and not vectors.requires_grad
    with_bank = model(batch, extra=(ids, vectors))
    assert with_bank.loss > first.loss  # two more competitors
    model.zero_grad()
    with_bank.loss.backward()
    assert model.item_encoder.embedding.weight.grad[[1, 9]].abs().sum() == 0  # banked rows: no gradient
    # the step's own encodings refresh the bank
    bank.update(batch.row_ids, with_bank.item_vectors)
    torch.testing.assert_close(bank.vectors[batch.row_ids], model.encode_items(batch.items).detach())
    # a sample of the bank: drawn from the filled items outside the batch, reproducibly
    draws = [bank.negatives(batch.row_ids, 3, torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and set(draws[0].tolist()) <= {1, 9}


def test_bank_state_round_trips_and_refuses_another_shape():
    bank = ItemVectorBank(6, 4)
    bank.update(torch.tensor([2, 5]), torch.randn(2, 4))
    restored = ItemVectorBank(6, 4)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.vectors, bank.vectors) and torch.equal(restored.filled, bank.filled)
    with pytest.raises(ValueError, match="item bank is \\(6, 4\\)"):
        ItemVectorBank(7, 4).load_state_dict(bank.state_dict())
