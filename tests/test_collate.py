from __future__ import annotations

import numpy as np
import pytest
import torch

from transrec.batch import IMAGE, TEXT
from transrec.dataloading.collate import collate_eval, collate_train, sample_negatives
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import _ShardedSequences

MAX_SEQ_LEN, NEGATIVES = 6, 3


@pytest.fixture(scope="module")
def store(tiny_dataset) -> ItemStore:
    return ItemStore(tiny_dataset)


@pytest.fixture(scope="module")
def train_samples(tiny_dataset) -> list[dict]:
    return list(_ShardedSequences(tiny_dataset / "train"))


def test_every_item_once_and_rows_scatter_back(store, train_samples):
    samples = train_samples[10:26]
    batch = collate_train(samples, store, MAX_SEQ_LEN, NEGATIVES, seed=5, epoch=0, window="last")
    ids = batch.items.ids.numpy()
    assert torch.equal(batch.row_ids, batch.items.ids)
    assert len(np.unique(ids)) == len(ids)
    width = max(min(len(s["items"]), MAX_SEQ_LEN + 1) - 1 for s in samples)
    assert batch.history.shape == batch.targets.shape == (16, width) and batch.negatives.shape == (16, width, 3)
    assert torch.equal(batch.history_mask, batch.target_mask)
    used = set()
    for row, sample in enumerate(samples):
        window = sample["items"][-(MAX_SEQ_LEN + 1):]
        mask = batch.history_mask[row].numpy()
        assert mask.sum() == len(window) - 1 and mask[::-1].cumprod().sum() == mask.sum()  # left-padded
        np.testing.assert_array_equal(ids[batch.history[row].numpy()[mask]], window[:-1])
        np.testing.assert_array_equal(ids[batch.targets[row].numpy()[mask]], window[1:])
        negatives = ids[batch.negatives[row].numpy()[mask]]
        assert not np.isin(negatives, sample["items"]).any()  # the whole train sequence, not just the window
        used |= set(window) | set(negatives.ravel())
    assert used == set(ids)  # nothing encoded that no position uses
    assert batch.users.tolist() == [s["user"] for s in samples] == list(range(10, 26))


def test_modality_split(store, train_samples):
    batch = collate_train(train_samples[:32], store, MAX_SEQ_LEN, NEGATIVES, seed=5, epoch=0)
    items = batch.items
    ids = items.ids.numpy()
    assert sorted(items.text_rows.tolist() + items.image_rows.tolist()) == list(range(len(ids)))
    assert (store.modality[ids[items.text_rows.numpy()]] == TEXT).all()
    assert (store.modality[ids[items.image_rows.numpy()]] == IMAGE).all()
    np.testing.assert_array_equal(items.input_ids.numpy(), store.tokens(ids[items.text_rows.numpy()])[0])
    assert items.images is None
    assert [j.tobytes() for j in items.jpegs] == [store.jpeg(i).tobytes() for i in ids[items.image_rows.numpy()]]


def test_negatives_depend_only_on_seed_epoch_and_sample(store, train_samples):
    def negatives_of(samples, row, seed=5, epoch=0):
        batch = collate_train(samples, store, MAX_SEQ_LEN, NEGATIVES, seed=seed, epoch=epoch, window="last")
        return batch.items.ids[batch.negatives[row][batch.history_mask[row]]]

    alone = negatives_of(train_samples[7:8], 0)
    assert torch.equal(alone, negatives_of(train_samples[3:12], 4))  # same sample, other batch mates
    assert not torch.equal(alone, negatives_of(train_samples[7:8], 0, epoch=1))
    assert not torch.equal(alone, negatives_of(train_samples[7:8], 0, seed=6))


def test_sample_negatives_rejects_seen_items():
    rng = np.random.default_rng(0)
    drawn = sample_negatives(np.arange(0, 18), 500, 20, rng)
    assert len(drawn) == 500 and set(drawn) == {18, 19}
    with pytest.raises(ValueError, match="every item"):
        sample_negatives(np.arange(20), 1, 20, rng)
    assert len(sample_negatives(np.arange(20), 0, 20, rng)) == 0


def test_collate_eval_targets_history_seen_and_padding():
    samples = [{"user": 4, "items": np.array([5, 6, 7, 8, 9])}, {"user": 9, "items": np.array([1, 2, 3])}]
    valid = collate_eval(samples, "valid", max_seq_len=2, num_rows=3)
    assert valid.target.tolist() == [8, 2, 0] and valid.valid.tolist() == [True, True, False]
    assert valid.history.tolist() == [[6, 7], [0, 1], [0, 0]]
    assert valid.history_mask.tolist() == [[True, True], [False, True], [False, True]]
    assert valid.seen.tolist() == [[5, 6, 7], [1, -1, -1], [-1, -1, -1]]  # all of the history, not cut to T
    assert valid.users.tolist() == [4, 9, 0]
    test = collate_eval(samples, "test", max_seq_len=10, num_rows=2)
    assert test.target.tolist() == [9, 3] and test.seen.tolist() == [[5, 6, 7, 8], [1, 2, -1, -1]]
    assert test.history.tolist() == [[5, 6, 7, 8], [0, 0, 1, 2]]


def test_random_windows_are_contiguous_reproducible_and_move_across_epochs():
    from transrec.dataloading.collate import choose_windows, sequence_rng

    def window(sequence, epoch, kind="random"):
        (only,) = choose_windows(sequence, 11, sequence_rng(5, epoch, 3), kind)
        return only

    sequence = np.arange(100, 160)
    windows = {epoch: window(sequence, epoch) for epoch in range(6)}
    for one in windows.values():
        assert len(one) == 11 and np.array_equal(one, np.arange(one[0], one[0] + 11))
    assert np.array_equal(windows[0], window(sequence, 0))
    assert len({int(w[-1]) for w in windows.values()}) > 1  # not always the most recent items
    assert np.array_equal(window(sequence, 0, "last"), sequence[-11:])
    assert np.array_equal(window(sequence[:7], 0), sequence[:7])


@pytest.mark.parametrize("length", [2, 3, 11, 12, 21, 60])
def test_stride_windows_train_every_target_position_once(length):
    from transrec.dataloading.collate import choose_windows, sequence_rng

    sequence = np.arange(500, 500 + length)
    windows = choose_windows(sequence, 11, sequence_rng(5, 0, 3), "stride")
    assert all(2 <= len(w) <= 11 for w in windows) and len(windows[0]) == min(11, length)
    targets = np.concatenate([w[1:] for w in windows])
    assert sorted(targets) == list(sequence[1:])  # every position after the first is a target exactly once
    for w in windows:  # each window: consecutive items, its history the items right before its targets
        assert np.array_equal(w, np.arange(w[0], w[0] + len(w)))


def test_stride_batch_has_a_row_per_window_and_counts_every_position(store, train_samples):
    samples = train_samples[:24]
    batch = collate_train(samples, store, MAX_SEQ_LEN, 0, seed=5, epoch=0, window="stride")
    ids = batch.row_ids.numpy()
    targets = ids[batch.targets.numpy()[batch.target_mask.numpy()]]
    assert sorted(targets) == sorted(i for s in samples for i in s["items"][1:])  # each position once
    assert batch.users.tolist() == [s["user"] for s in samples]  # users: one per sequence, not per row
    assert batch.history.shape[0] > len(samples)  # some histories are longer than one window


def test_catalogue_and_mixed_negatives_join_the_batch(store, train_samples):
    samples = train_samples[:4]
    plain = collate_train(samples, store, MAX_SEQ_LEN, 0, seed=5, epoch=0)
    catalogue = collate_train(samples, store, MAX_SEQ_LEN, 0, seed=5, epoch=0, negatives="catalogue")
    assert catalogue.row_ids.tolist() == list(range(store.num_items))
    # the same positions, the same items, only renumbered into the larger set of rows
    mask = plain.target_mask
    assert torch.equal(mask, catalogue.target_mask)
    for field in ("history", "targets"):
        assert torch.equal(plain.row_ids[getattr(plain, field)][mask], catalogue.row_ids[getattr(catalogue, field)][mask])

    def mixed(sampled_samples, epoch=0):
        return collate_train(sampled_samples, store, MAX_SEQ_LEN, 0, seed=5, epoch=epoch, negatives="mixed",
                             sampled_negatives=20).row_ids

    extra = set(mixed(samples).tolist()) - set(plain.row_ids.tolist())
    assert 0 < len(extra) <= 20
    assert torch.equal(mixed(samples), mixed(samples))  # a resumed run draws the same
    assert not torch.equal(mixed(samples), mixed(samples, epoch=1))


def test_cloze_masks_items_of_each_window_reproducibly_and_anew_each_epoch(store, train_samples):
    def cloze(epoch, samples=train_samples[:24]):
        return collate_train(samples, store, MAX_SEQ_LEN, 0, seed=5, epoch=epoch, window="last", cloze_prob=0.3)

    batch = cloze(0)
    assert collate_train(train_samples[:24], store, MAX_SEQ_LEN, 0, seed=5, epoch=0).cloze is None  # next-item
    sequence = torch.cat([batch.history, batch.targets[:, -1:]], 1)  # each window, as the model lays it out
    sequence_mask = torch.cat([batch.history_mask, batch.target_mask[:, -1:]], 1)
    ids = batch.row_ids.numpy()
    for row, sample in enumerate(train_samples[:24]):
        np.testing.assert_array_equal(ids[sequence[row][sequence_mask[row]].numpy()],
                                      sample["items"][-(MAX_SEQ_LEN + 1):])
    assert batch.cloze.shape == sequence.shape
    assert not (batch.cloze & ~sequence_mask).any() and batch.cloze.any(1).all()  # on items only, 1+ per window
    assert 0.2 < batch.cloze.sum() / sequence_mask.sum() < 0.45  # ~cloze_prob, plus the forced ones
    assert torch.equal(cloze(0).cloze, batch.cloze)
    assert not torch.equal(cloze(1).cloze, batch.cloze)
    alone = cloze(0, train_samples[3:4]).cloze[0]  # a window's mask depends on its user, not on its batch
    assert torch.equal(alone[-int(sequence_mask[3].sum()):], batch.cloze[3][sequence_mask[3]])
