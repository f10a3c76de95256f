"""The transfer study's targets: a share of the training users kept, evaluation unchanged (its runs and report
are checked end to end in test_end_to_end.py)."""
import json

import numpy as np
import pytest

from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import _ShardedSequences
from transrec.launcher.transfer import parse_fractions
from transrec.writers.subsample import kept_users, subsample_train_users


def train_users(dataset) -> dict[int, list[int]]:
    return {int(s["user"]): list(s["items"]) for s in _ShardedSequences(dataset / "train")}


def eval_sequences(dataset) -> list[tuple[int, list[int]]]:
    return [(int(s["user"]), list(s["items"])) for s in _ShardedSequences(dataset / "eval")]


def test_a_share_of_the_users_trains_and_every_user_is_evaluated_as_before(tiny_dataset, tmp_path):
    full = train_users(tiny_dataset)
    written = {}
    for fraction, seed in ((0.25, 0), (0.5, 0), (0.5, 0), (0.5, 1)):
        out = tmp_path / f"users{fraction}-seed{seed}"
        manifest = subsample_train_users(tiny_dataset, out, fraction, seed, overwrite=True)
        kept = train_users(out)
        assert manifest["subsample"]["train_users"] == len(kept) == round(fraction * len(full))
        assert all(full[user] == items for user, items in kept.items())  # kept sequences are whole
        assert eval_sequences(out) == eval_sequences(tiny_dataset)  # same users, same ids, same histories
        popularity = np.bincount(np.concatenate([items for items in kept.values()]), minlength=manifest["num_items"])
        assert np.array_equal(ItemStore(out).popularity, popularity)
        source, copy = ItemStore(tiny_dataset), ItemStore(out)
        assert np.array_equal(source.modality, copy.modality)
        assert all(np.array_equal(source.tokens(np.arange(4))[i], copy.tokens(np.arange(4))[i]) for i in range(2))
        assert all(np.array_equal(source.jpeg(i), copy.jpeg(i)) for i in range(source.num_items))
        written.setdefault((fraction, seed), []).append(set(kept))
    assert written[0.5, 0][0] == written[0.5, 0][1]  # deterministic for a seed
    assert written[0.25, 0][0] < written[0.5, 0][0]  # a smaller share's users are among a larger one's
    assert written[0.5, 0][0] != written[0.5, 1][0]


def test_the_users_attributes_come_with_the_copy(ml100k_dataset, tmp_path):
    subsample_train_users(ml100k_dataset, tmp_path / "users0.1", 0.1, seed=0)
    source, copy = ItemStore(ml100k_dataset), ItemStore(tmp_path / "users0.1")
    for label in ("gender", "age", "occupation"):
        assert np.array_equal(copy.user_attribute(label).codes, source.user_attribute(label).codes)


def test_kept_users_is_a_seeded_cut_of_one_permutation():
    for seed in range(3):
        small, large = kept_users(100, 0.05, seed), kept_users(100, 0.5, seed)
        assert small.sum() == 5 and large.sum() == 50 and not (small & ~large).any()
    assert kept_users(10, 0.01, 0).sum() == 1  # at least one user trains
    with pytest.raises(ValueError, match="fraction must be in"):
        kept_users(10, 0.0, 0)


def test_fractions_are_checked():
    assert parse_fractions("1,0.05, 0.5") == [0.05, 0.5, 1.0]
    for bad in ("0,0.5", "1.5", "half", ""):
        with pytest.raises(ValueError, match="--fractions"):
            parse_fractions(bad)


def test_bad_study_arguments_are_one_line_errors_before_any_run(tiny_dataset, tmp_path, capsys):
    from transrec.launcher.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({}))
    common = ["transfer", "--from", str(export), "--data", str(tiny_dataset), "--config", "tiny", "--out",
              str(tmp_path / "study")]
    for extra, message in ((["--methods", "finetuned"], "--methods: finetuned: choose from"),
                           (["--fractions", "2"], "--fractions: each share"),
                           (["--seeds", "0"], "--seeds must be 1 or more"),
                           (["--set", "train.batch_size=-4"], "train.batch_size")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main([*common[:2], str(tmp_path / "nothing"), *common[3:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"init_from: {tmp_path / 'nothing'}/config.json not found" in err, err
    assert not (tmp_path / "study").exists()


def test_a_popularity_prior_over_uninformative_scores_ranks_as_popularity(tiny_dataset):
    """score = user . item + w log p: with every item vector zero, the model's part is 0 and the ranking is the
    popularity baseline's, whatever the weight; weight 0 leaves the model's metrics as they were."""
    import torch

    from transrec.config import ModelConfig, load_config
    from transrec.models import TransRec
    from transrec.trainer.evaluate import evaluate_model

    num_items = ItemStore(tiny_dataset).num_items
    model = TransRec(ModelConfig(item_encoder="id", num_items=num_items, dim=8, heads=2, max_seq_len=8))
    torch.nn.init.zeros_(model.item_encoder.embedding.weight)
    results = evaluate_model(model, str(tiny_dataset), load_config("tiny"), prior_weights=(0.0, 3.0))
    assert results["prior3"]["test"] == results["test_popularity"]
    assert results["prior3"]["valid"] == results["valid_popularity"]
    assert results["prior0"] == {split: results[split] for split in ("valid", "test")}
    assert results["test"]["ndcg@10"] != results["test_popularity"]["ndcg@10"]  # all-zero scores rank otherwise


def test_the_zero_shot_prior_weight_is_chosen_on_valid(tmp_path):
    from transrec.launcher.transfer import PRIOR_WEIGHTS, ZERO_SHOT, run_name, write_zero_shot

    def metrics(score):
        return {"valid": {"ndcg@10": score}, "test": {"ndcg@10": 1 - score}}

    results = {**metrics(0.1), "valid_popularity": {"ndcg@10": 0.2}, "test_popularity": {"ndcg@10": 0.3},
               **{f"prior{w:g}": metrics(0.5 - abs(w - 2.0) / 100) for w in PRIOR_WEIGHTS}}
    write_zero_shot(results, tmp_path, 0.5, 1, "ndcg@10")
    plain, prior = (json.loads((tmp_path / run_name(m, 0.5, 1) / "results.json").read_text()) for m in ZERO_SHOT)
    assert plain["best"] == {"valid/ndcg@10": 0.1, "test/ndcg@10": 0.9}
    assert prior["prior_weight"] == 2.0 and prior["best"]["test/ndcg@10"] == 0.5  # test reported, never chosen on
    assert plain["popularity"] == prior["popularity"] == {"valid": {"ndcg@10": 0.2}, "test": {"ndcg@10": 0.3}}
