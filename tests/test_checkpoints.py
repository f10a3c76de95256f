"""Safe checkpoints: published complete (manifest last, then `latest`), pruned to the newest K, and on load a
damaged one (truncated, changed, a rank's file missing, an unfinished save) is skipped with a warning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transrec.trainer import checkpoint
from transrec.trainer.checkpoint import CheckpointWarning, newest_intact_tag, problems, published_tags
from transrec.trainer.torchrun_entry import launch

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
MODEL_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """What `checkpoint.save` asks of a DeepSpeed engine, without DeepSpeed: one file per save."""

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert not save_latest  # `latest` is ours to move
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / MODEL_FILE).write_bytes(torch.randn(256).numpy().tobytes())

    def zero_optimization_stage(self) -> int:
        return 2


def save_steps(directory: Path, steps, keep: int = 10, protected: frozenset = frozenset()) -> None:
    for step in steps:
        checkpoint.save(FakeEngine(), directory, f"step{step}", {"step": step}, keep, set(protected))


def test_save_publishes_complete_checkpoints_and_keeps_the_newest(tmp_path):
    save_steps(tmp_path, range(1, 6), keep=2, protected=frozenset({"step1"}))  # step1: e.g. the best so far
    assert [p.name for p in published_tags(tmp_path)] == ["step1", "step4", "step5"]
    assert checkpoint.latest_tag(tmp_path) == "step5"
    assert not list(tmp_path.glob("*.tmp"))
    manifest = checkpoint.read_manifest(tmp_path / "step5")
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == 2
    assert set(manifest["files"]) == {MODEL_FILE, "rank0_state.pt"}
    assert manifest["files"][MODEL_FILE]["bytes"] == 1024
    assert all(not problems(tag) for tag in published_tags(tmp_path))

    before = (tmp_path / "step5" / MODEL_FILE).read_bytes()
    save_steps(tmp_path, [5])  # the same step saved again replaces it whole
    assert (tmp_path / "step5" / MODEL_FILE).read_bytes() != before and not problems(tmp_path / "step5")
    assert not list(tmp_path.glob("step5.*"))


def test_damaged_checkpoints_are_skipped_with_a_warning_naming_the_problem(tmp_path):
    save_steps(tmp_path, range(1, 5))
    with open(tmp_path / "step4" / MODEL_FILE, "r+b") as f:
        f.truncate(100)
    data = bytearray((tmp_path / "step3" / MODEL_FILE).read_bytes())
    data[7] ^= 1
    (tmp_path / "step3" / MODEL_FILE).write_bytes(data)
    (tmp_path / "step2" / "rank0_state.pt").unlink()
    (tmp_path / "step9.tmp").mkdir()  # a save that crashed before publishing: never a candidate

    with pytest.warns(CheckpointWarning) as caught:
        assert newest_intact_tag(tmp_path) == "step1"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert "step4 is damaged" in messages[0] and f"{MODEL_FILE} has 100 bytes, the manifest says 1024" in messages[0]
    assert "step3 is damaged" in messages[1] and f"{MODEL_FILE} does not match its sha256" in messages[1]
    assert "step2 is damaged" in messages[2] and "rank0_state.pt is missing" in messages[2]

    (tmp_path / "step1" / checkpoint.MANIFEST).unlink()
    with pytest.warns(CheckpointWarning) as caught, pytest.raises(RuntimeError, match="every checkpoint"):
        newest_intact_tag(tmp_path)
    assert "step1 is damaged" in str(caught[-1].message) and "manifest.json is missing" in str(caught[-1].message)
    assert newest_intact_tag(tmp_path / "none") is None  # no checkpoint at all: start afresh


def test_resume_falls_back_from_a_truncated_checkpoint(tmp_path):
    """2 ranks, a checkpoint every step; step 2's rank-1 optimizer shard truncated on disk. The resume warns,
    starts from step 1, and redoes step 2 exactly (bitwise the same loss), then goes on."""
    from transrec.dataloading.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "data", users=48, items=40)
    sets = ["name=damaged", f"output_dir={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}", "train.epochs=2",
            "train.log_every=1", "train.checkpoint_every=1"]
    first = launch(2, CONFIG, [*sets, "train.max_steps=2"])
    assert first.returncode == 0, first.stderr[-5000:]
    checkpoints = tmp_path / "runs" / "damaged" / "checkpoints"
    shard = checkpoints / "step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)

    second = launch(2, CONFIG, [*sets, "train.max_steps=3"], resume=True)
    assert second.returncode == 0, second.stderr[-5000:]
    assert f"{checkpoints / 'step2'} is damaged" in second.stderr
    assert f"{shard.name} has {size // 2} bytes, the manifest says {size}" in second.stderr
    records = [json.loads(line) for line in (checkpoints.parent / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [step for step, _ in train] == [1, 2, 2, 3]  # step 2 done again, from step 1's checkpoint
    assert train[1] == train[2]
    assert checkpoint.latest_tag(checkpoints) == "step3"
    assert not problems(checkpoints / "step2")  # saved again, whole
