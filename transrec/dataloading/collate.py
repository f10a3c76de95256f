"""User sequences -> `Batch` (training) and `EvalBatch` (evaluation); see batch.py for the fields."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from transrec.dataloading.bad_data import NO_BAD_ITEMS, BadItems, check_sample
from transrec.batch import Batch, EvalBatch
from transrec.dataloading.item_store import ItemStore

HELD_OUT = {"valid": 2, "test": 1}  # target = items[-n]; history = items[:-n]


def pad_sequences(sequences: list[np.ndarray], fill: int = 0, left: bool = True, min_width: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """int64 [B, T] (T = the longest, at least `min_width`), padded with `fill` on the left or right, and its mask."""
    width = max([min_width] + [len(s) for s in sequences])
    padded = np.full((len(sequences), width), fill, np.int64)
    mask = np.zeros((len(sequences), width), bool)
    for row, sequence in enumerate(sequences):
        where = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        padded[row, where] = sequence
        mask[row, where] = True
    return padded, mask


def sequence_rng(seed: int, epoch: int, user: int) -> np.random.Generator:
    """A sequence's window and negatives depend on nothing else, so a resumed run draws the same ones."""
    return np.random.default_rng([seed, epoch, user])


def choose_windows(sequence: np.ndarray, length: int, rng: np.random.Generator, window: str) -> list[np.ndarray]:
    """Windows of at most `length` consecutive items, each trained as history = window[:-1], targets =
    window[1:] (see config.DataConfig.train_window): "stride" tiles the history from its newest item back, each
    window's first item the previous one's last, so every target position trains once; "last" keeps the
    newest items only; "random" one window ending at a random position."""
    end = len(sequence)
    if window == "stride":
        ends = range(end, 1, -(length - 1))
        return [sequence[max(e - length, 0):e] for e in ends]
    if window == "random" and end > length:
        end = int(rng.integers(length, end + 1))
    return [sequence[max(end - length, 0):end]]


def sample_negatives(seen: np.ndarray, count: int, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """`count` items drawn uniformly from those not in `seen` (rejection sampling)."""
    seen = np.unique(seen)
    unseen = num_items - len(seen)
    if count and unseen <= 0:
        raise ValueError("cannot sample negatives: the user has interacted with every item")
    drawn = np.empty(0, np.int64)
    while len(drawn) < count:
        missing = count - len(drawn)
        candidates = rng.integers(0, num_items, size=missing * num_items // unseen + 1)
        drawn = np.concatenate([drawn, candidates[~np.isin(candidates, seen)]])
    return drawn[:count]


def collate_train(samples: list[dict], store: ItemStore, max_seq_len: int, num_negatives: int, seed: int,
                  epoch: int, mode: str = "mom", window: str = "stride", bad_items: BadItems = NO_BAD_ITEMS,
                  negatives: str = "inbatch", sampled_negatives: int = 0, cloze_prob: float = 0.0) -> Batch:
    """Sequences {"user", "items", "sample_id"} -> Batch with JPEGs but undecoded images; `mode` routes items
    to encoders (ItemStore.item_batch).

    A bad sequence (bad_data.check_sample) is left out, its BadRecord in `Batch.skipped`. Each sequence gives
    its windows of up to max_seq_len + 1 items (`choose_windows`), one row each. Per target position,
    `num_negatives` items are drawn from those the user's whole train sequence lacks (bce). The batch's items
    are those of its windows and negatives, plus, for the softmax's `negatives`, every item ("catalogue") or
    `sampled_negatives` drawn uniformly ("mixed"); never an item of `bad_items`. With `cloze_prob` > 0
    (bert4rec), each item of a window is masked with that chance (its last one when none is), in `Batch.cloze`.
    """
    checks = [check_sample(s, store.num_items, bad_items) for s in samples]
    samples = [s for s, problem in zip(samples, checks) if problem is None]
    sequences = [np.asarray(s["items"], np.int64) for s in samples]
    rngs = [sequence_rng(seed, epoch, int(s["user"])) for s in samples]
    per_sequence = [choose_windows(seq, max_seq_len + 1, rng, window) for seq, rng in zip(sequences, rngs)]
    windows = [w for ws in per_sequence for w in ws]
    history, mask = pad_sequences([w[:-1] for w in windows])
    targets, _ = pad_sequences([w[1:] for w in windows])
    negatives_per_position = np.zeros(history.shape + (num_negatives,), np.int64)
    cloze = np.zeros((len(windows), history.shape[1] + 1), bool) if cloze_prob else None
    row = 0
    for rng, sequence, sequence_windows in zip(rngs, sequences, per_sequence):
        for items in sequence_windows:
            positions = len(items) - 1
            drawn = sample_negatives(np.concatenate([sequence, bad_items.ids]), positions * num_negatives,
                                     store.num_items, rng)
            negatives_per_position[row, history.shape[1] - positions:] = drawn.reshape(positions, num_negatives)
            if cloze is not None:
                masked = rng.random(len(items)) < cloze_prob
                masked[-1] |= not masked.any()
                cloze[row, -len(items):] = masked
            row += 1
    extra = np.zeros(0, np.int64)
    if negatives == "catalogue":
        extra = np.setdiff1d(np.arange(store.num_items), bad_items.ids)
    elif negatives == "mixed" and sampled_negatives:
        users = [int(s["user"]) for s in samples]
        batch_rng = np.random.default_rng([seed, epoch, len(users), *users])
        extra = sample_negatives(bad_items.ids, sampled_negatives, store.num_items, batch_rng)
    # every distinct item once; positions refer to it by its row in `ids` (padding -> row 0, masked)
    ids = np.unique(np.concatenate(windows + [negatives_per_position[mask].ravel(), extra]))

    def rows(global_ids: np.ndarray, where: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(where, np.searchsorted(ids, global_ids), 0))

    return Batch(
        items=store.item_batch(ids, mode=mode),
        row_ids=torch.from_numpy(ids),
        users=torch.tensor([int(s["user"]) for s in samples], dtype=torch.int64),
        history=rows(history, mask),
        history_mask=torch.from_numpy(mask),
        targets=rows(targets, mask),
        target_mask=torch.from_numpy(mask.copy()),
        negatives=rows(negatives_per_position, mask[..., None]),
        cloze=None if cloze is None else torch.from_numpy(cloze),
        skipped=[problem for problem in checks if problem is not None],
    )


@dataclass
class TrainCollator:
    """collate_train with its settings bound: a picklable collate_fn for DataLoader workers, which takes the
    train samples of a batch, each a list of sequences (a block, loader.read_sequences)."""

    store: ItemStore
    max_seq_len: int
    num_negatives: int
    seed: int
    epoch: int
    mode: str
    window: str
    bad_items: BadItems = NO_BAD_ITEMS
    negatives: str = "inbatch"
    sampled_negatives: int = 0
    cloze_prob: float = 0.0

    def __call__(self, samples: list[list[dict]]) -> Batch:
        sequences = [sequence for block in samples for sequence in block]
        batch = collate_train(sequences, self.store, self.max_seq_len, self.num_negatives, self.seed, self.epoch,
                              self.mode, self.window, self.bad_items, self.negatives, self.sampled_negatives,
                              self.cloze_prob)
        batch.stream_samples = len(samples)
        return batch


def collate_eval(samples: list[dict], split: str, max_seq_len: int, num_rows: int) -> EvalBatch:
    """Full sequences {"user", "items"} -> EvalBatch of `num_rows` rows, padded with rows valid=False.

    A padding row is user 0 with history [item 0] (so no row is all-masked), target 0 and nothing seen.
    """
    if split not in HELD_OUT:
        raise ValueError(f"split must be one of {list(HELD_OUT)}, got {split!r}")
    held_out = HELD_OUT[split]
    sequences = [np.asarray(s["items"], np.int64) for s in samples]
    padding = num_rows - len(samples)
    seen = [seq[:-held_out] for seq in sequences] + [np.zeros(0, np.int64)] * padding
    history, history_mask = pad_sequences([s[-max_seq_len:] for s in seen[:len(samples)]]
                                          + [np.zeros(1, np.int64)] * padding)
    seen_padded, _ = pad_sequences(seen, fill=-1, left=False)
    return EvalBatch(
        users=torch.tensor([int(s["user"]) for s in samples] + [0] * padding, dtype=torch.int64),
        history=torch.from_numpy(history),
        history_mask=torch.from_numpy(history_mask),
        seen=torch.from_numpy(seen_padded),
        target=torch.tensor([int(seq[-held_out]) for seq in sequences] + [0] * padding, dtype=torch.int64),
        valid=torch.tensor([True] * len(samples) + [False] * padding),
    )
