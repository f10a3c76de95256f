"""Early stopping: a run stops at the evaluation where `train.patience` evaluations (and `train.patience_steps`
optimizer steps) have gone by without a better valid metric; the best checkpoint survives pruning and is what
export and evaluate take by default."""
from __future__ import annotations

import json

from transrec.trainer.checkpoint_store import CheckpointStore
from transrec.trainer.export import export
from transrec.trainer.torchrun_entry import launch

CONFIG = "tiny"


def test_patience_stops_at_the_right_evaluation_and_the_best_survives_pruning(tmp_path, launch_dataset):
    # Nothing learns at a zero learning rate, so every evaluation equals the first: the first stays the best
    # (only a strictly better one replaces it) and the run must stop at evaluation 1 + patience.
    sets = [f"output_dir={tmp_path}", "name=flat", f"data.path={launch_dataset}", "train.epochs=20",
            "train.lr=0", "train.encoder_lr=0", "train.keep_checkpoints=1", "eval.every_epochs=1",
            "train.batch_size=16"]
    result = launch(1, CONFIG, sets + ["train.patience=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "flat"
    results = json.loads((run / "results.json").read_text())
    assert results["stopped"] == "patience" and results["epochs"] == 3
    assert [r["epoch"] for r in results["history"]] == [1, 2, 3]
    assert results["best"] == results["history"][0]
    assert 0 < results["seconds_to_best"] <= results["history"][-1]["seconds"] <= results["seconds"]
    store = CheckpointStore(run / "checkpoints")
    last = results["history"][-1]["tag"]
    assert store.tags() == [results["best"]["tag"], last] and store.latest() == last  # kept beside the latest
    manifest = json.loads((export(run, tmp_path / "export") / "manifest.json").read_text())
    assert manifest["tag"] == results["best"]["tag"]

    # resumed with more patience (3: it would stop at epoch 4) and a floor of 4 epochs' steps since the best (epoch
    # 1), it goes on to epoch 5
    steps_per_epoch = results["best"]["step"]
    result = launch(1, CONFIG, sets + ["train.patience=3", f"train.patience_steps={4 * steps_per_epoch}"], resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    floored = json.loads((run / "results.json").read_text())
    assert floored["stopped"] == "patience" and floored["epochs"] == 5 and floored["best"] == results["best"]
