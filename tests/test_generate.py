"""The synthetic generator at scale: MicroLens' shape, parts written in parallel, one data set whatever the workers."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from transrec.config import DataConfig
from transrec.dataloading.loader import TrainLoader, _ShardedSequences
from transrec.writers.synthetic import (MICROLENS, NOISE_WORDS, TOPIC_WORDS, UserModel, make_catalogue, make_world,
                                        prepare_synthetic)


def test_microlens_shape():
    world = make_world(16)
    catalogue = make_catalogue(world, 5000, np.random.default_rng(0))
    model = UserModel(world, catalogue.topic, catalogue.weight, seed=0, **MICROLENS)
    sequences = model.users(0, 20_000)
    lengths = np.array([len(s) for s in sequences])
    assert lengths.min() == 5 and 300 < lengths.max() <= 500  # 5 to a few hundred
    assert abs(lengths.mean() - model.mean_length()) < 1.5 and 25 < model.mean_length() < 33  # MicroLens: ~29
    assert np.median(lengths) <= 12  # heavy-tailed: most histories are short
    assert all(len(np.unique(s)) == len(s) for s in sequences)  # no item twice in a history
    counts = np.sort(np.bincount(np.concatenate(sequences), minlength=5000))[::-1]
    assert counts[:50].sum() > 0.1 * counts.sum()  # power-law popularity: the top 1% of items get > 10%
    assert [list(s) for s in model.users(3, 50)] == [list(s) for s in model.users(3, 50)]  # seeded per part


def test_parts_written_in_parallel_are_one_data_set(tmp_path):
    spec = dict(users=250, items=120, seed=4, topics=8, image_size=16, users_per_part=60, **MICROLENS)
    one = prepare_synthetic(tmp_path / "one", workers=1, **spec)
    two = prepare_synthetic(tmp_path / "two", workers=2, **spec)
    assert one["files"] == two["files"]  # byte for byte, whatever the number of processes
    assert sorted(p.name for p in (tmp_path / "two" / "train").iterdir()) == [
        "index.json", *(f"part{p:05d}" for p in range(5))]

    data = tmp_path / "two"
    full, train = list(_ShardedSequences(data / "eval")), list(_ShardedSequences(data / "train"))
    assert [s["user"] for s in full] == [s["user"] for s in train] == list(range(250))
    for whole, part in zip(full, train):
        np.testing.assert_array_equal(part["items"], whole["items"][:-2])
    assert two["num_interactions"] == sum(len(s["items"]) for s in full)
    popularity = np.load(data / "items" / "popularity.npy")
    np.testing.assert_array_equal(popularity, np.bincount(np.concatenate([s["items"] for s in train]), minlength=120))
    assert json.loads((data / "manifest.json").read_text())["params"]["users_per_part"] == 60

    loader = TrainLoader(DataConfig(loader_workers=0, on_bad_record="stop"), data, batch_size=32, max_seq_len=8,
                         num_negatives=1, seed=0, rank=0, world_size=1, decoder=None)
    assert sorted(i for batch in loader for i in batch.users.tolist()) == list(range(250))
    loader.close()
    gc.collect()


def test_cli_microlens_shape_and_workers(tmp_path):
    from transrec.launcher.cli import main

    out = tmp_path / "ml"
    assert main(["prepare", "synthetic", "--out", str(out), "--users", "200", "--items", "150", "--microlens",
                 "--workers", "2", "--users-per-sample", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["users_per_sample"] == 4 and len(_ShardedSequences(out / "train")) == 200 // 4
    params = manifest["params"]
    assert {k: params[k] for k in MICROLENS} == MICROLENS
    lengths = [len(s["items"]) for s in _ShardedSequences(out / "eval")]
    assert len(lengths) == 200 and min(lengths) >= 5 and max(lengths) > 50  # beyond the default max_len


def test_shift_moves_the_world_away_and_keeps_its_topics():
    same, half, far = make_world(8), make_world(8, 0.5), make_world(8, 1.0)
    assert same.vocabulary == tuple(TOPIC_WORDS[topic] for topic in same.topics)
    assert half.topics == far.topics == same.topics
    partner = [(k - 1) % 8 for k in range(8)]
    for k in range(8):
        assert set(far.vocabulary[k]) == set(same.vocabulary[partner[k]])  # a topic reads as its partner did
        assert len(set(half.vocabulary[k])) == 12 and len(set(half.vocabulary[k]) & set(same.vocabulary[k])) == 6
    order_partner = [(k + 1) % 8 for k in range(8)]
    np.testing.assert_allclose(far.succession, same.succession[np.ix_(order_partner, order_partner)])
    # what a text model sees: the order of the words' topics. Moved with the words, the order would be the
    # shift-0 world's again under new names; at 1, for most topics, the likeliest next topic is not the source's
    seen = np.empty_like(far.succession)
    seen[np.ix_(partner, partner)] = far.succession
    np.fill_diagonal(seen, 0.0)
    source = same.succession - np.diag(np.diag(same.succession))
    assert (seen.argmax(1) != source.argmax(1)).mean() > 0.5
    np.testing.assert_allclose(half.succession.sum(1), 1.0)
    catalogue = make_catalogue(far, 64, np.random.default_rng(0))
    for text, k in zip(catalogue.texts, catalogue.topic):  # the items' texts use the shifted words
        assert set(text.lower().split()) <= set(far.vocabulary[k]) | set(NOISE_WORDS)
    with pytest.raises(ValueError, match="shift must be in"):
        make_world(8, 1.5)
