"""Safe checkpoints, in a directory and in object storage (S3, served by moto on loopback): published complete
(manifest last, then `latest`), pruned to the newest K, and on load a damaged one (truncated, changed, a rank's
file missing, an unfinished save) is skipped with a warning."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import moto_s3
from transrec.trainer import checkpoint
from transrec.trainer.checkpoint import CheckpointWarning, find_resume_point
from transrec.trainer.checkpoint_store import CheckpointStore
from transrec.trainer.torchrun_entry import launch

CONFIG = "tiny"
MODEL_FILE = "mp_rank_00_model_states.pt"
BUCKET = "transrec"


class FakeEngine:
    """What `checkpoint.save` asks of a DeepSpeed engine, without DeepSpeed: one file per save."""

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert not save_latest  # `latest` is ours to move
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / MODEL_FILE).write_bytes(torch.randn(256).numpy().tobytes())

    def zero_optimization_stage(self) -> int:
        return 2


class Files:
    """Reads and damages the files of a checkpoint store, on disk or in the S3 bucket, by relative path."""

    def __init__(self, root: Path | str, s3=None):
        self.root, self.s3 = root, s3

    def key(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def read(self, relpath: str) -> bytes:
        if self.s3 is None:
            return (self.root / relpath).read_bytes()
        return self.s3.get_object(Bucket=BUCKET, Key=self.key(relpath))["Body"].read()

    def write(self, relpath: str, data: bytes) -> None:
        if self.s3 is None:
            (self.root / relpath).parent.mkdir(parents=True, exist_ok=True)
            (self.root / relpath).write_bytes(data)
        else:
            self.s3.put_object(Bucket=BUCKET, Key=self.key(relpath), Body=data)

    def delete(self, relpath: str) -> None:
        if self.s3 is None:
            (self.root / relpath).unlink()
        else:
            self.s3.delete_object(Bucket=BUCKET, Key=self.key(relpath))

    def names(self) -> set[str]:
        if self.s3 is None:
            return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{self.root}/").get("Contents", [])
        # (pyarrow keeps empty "directory" marker objects, keys ending in /)
        return {item["Key"].removeprefix(f"{self.root}/") for item in listing if not item["Key"].endswith("/")}


@pytest.fixture(params=["directory", "s3"])
def storage(request, tmp_path):
    """(store, files): a store in a directory, or in an S3 bucket."""
    if request.param == "directory":
        yield CheckpointStore(tmp_path / "checkpoints"), Files(tmp_path / "checkpoints")
    else:
        with moto_s3(BUCKET) as s3:
            yield CheckpointStore(f"s3://{BUCKET}/runs/x/checkpoints"), Files("runs/x/checkpoints", s3)


def save_steps(store: CheckpointStore, steps, keep: int = 10, protected: frozenset = frozenset()) -> None:
    for step in steps:
        checkpoint.save(FakeEngine(), store, f"step{step}", {"step": step}, keep, set(protected))


def test_save_publishes_complete_checkpoints_and_keeps_the_newest(storage):
    store, files = storage
    save_steps(store, range(1, 6), keep=2, protected=frozenset({"step1"}))  # step1: e.g. the best so far
    assert store.tags() == ["step1", "step4", "step5"] and store.latest() == "step5"
    per_tag = {MODEL_FILE, "rank0_state.pt", "shared_state.pt", "manifest.json"}
    assert files.names() == {"latest"} | {f"{tag}/{name}" for tag in store.tags() for name in per_tag}
    manifest = store.read_manifest("step5")
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == 2
    assert set(manifest["files"]) == {MODEL_FILE, "rank0_state.pt", "shared_state.pt"}
    assert manifest["files"][MODEL_FILE]["bytes"] == 1024
    assert all(not store.problems(tag) for tag in store.tags())

    before = files.read(f"step5/{MODEL_FILE}")
    save_steps(store, [5])  # the same step saved again replaces it whole
    assert files.read(f"step5/{MODEL_FILE}") != before and not store.problems("step5")
    assert files.names() == {"latest"} | {f"{tag}/{name}" for tag in store.tags() for name in per_tag}


def test_damaged_checkpoints_are_skipped_with_a_warning_naming_the_problem(storage):
    store, files = storage
    save_steps(store, range(1, 5))
    files.write(f"step4/{MODEL_FILE}", files.read(f"step4/{MODEL_FILE}")[:100])
    data = bytearray(files.read(f"step3/{MODEL_FILE}"))
    data[7] ^= 1  # same size: only the sha256 tells (in object storage, once downloaded)
    files.write(f"step3/{MODEL_FILE}", bytes(data))
    files.delete("step2/rank0_state.pt")
    # a save that crashed before publishing: staging in a directory (never a candidate), a tag without its
    # manifest in object storage (a candidate that fails)
    files.write(f"step9{'.tmp' if store.is_directory else ''}/{MODEL_FILE}", b"partial")

    with pytest.warns(CheckpointWarning) as caught:
        point = find_resume_point(store)
    assert point.tag == "step1" and point.saved_world == 1 and point.downloaded == (not store.is_directory)
    assert (point.checkpoint_dir / "step1" / MODEL_FILE).read_bytes() == files.read(f"step1/{MODEL_FILE}")
    if point.downloaded:
        shutil.rmtree(point.checkpoint_dir)
    messages = [str(w.message) for w in caught]
    if not store.is_directory:
        assert f"{store}/step9 is damaged" in messages[0] and "manifest.json: missing" in messages.pop(0)
    assert len(messages) == 3
    assert f"{store}/step4 is damaged" in messages[0]
    assert f"{MODEL_FILE}: 100 bytes, the manifest says 1024" in messages[0]
    assert f"{store}/step3 is damaged" in messages[1] and f"{MODEL_FILE}: sha256 differs" in messages[1]
    assert f"{store}/step2 is damaged" in messages[2] and "rank0_state.pt: missing" in messages[2]

    files.delete("step1/manifest.json")
    with pytest.warns(CheckpointWarning) as caught, pytest.raises(RuntimeError, match="every checkpoint"):
        find_resume_point(store)
    assert "step1 is damaged" in str(caught[-1].message) and "manifest.json: missing" in str(caught[-1].message)
    assert find_resume_point(CheckpointStore(f"{store}-none")) is None  # no checkpoint at all: start afresh


def test_resume_falls_back_from_a_truncated_checkpoint(tmp_path):
    """2 ranks, a checkpoint every step in S3; step 2's rank-1 optimizer shard truncated there. The resume warns,
    starts from step 1, and redoes step 2 exactly (bitwise the same loss), then goes on. Each rank staged its
    files in a private temp directory: the bucket is the only place where the ranks' files meet. (A directory
    store finds damage the same way, test_damaged_checkpoints_are_skipped...; resuming from one after kills
    mid-save: test_failures.)"""
    from transrec.writers.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "data", users=48, items=40)
    sets = ["name=damaged", f"output_dir={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}", "train.epochs=2",
            "train.log_every=1", "train.checkpoint_every=1"]
    with moto_s3(BUCKET) as s3:
        sets.append(f"checkpoint_storage=s3://{BUCKET}/runs")
        store, files = CheckpointStore(f"s3://{BUCKET}/runs/damaged/checkpoints"), Files("runs/damaged/checkpoints", s3)
        first = launch(2, CONFIG, [*sets, "train.max_steps=2"])
        assert first.returncode == 0, first.stderr[-5000:]
        shard = "step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = files.read(shard)
        files.write(shard, data[:len(data) // 2])

        second = launch(2, CONFIG, [*sets, "train.max_steps=3"], resume=True)
        assert second.returncode == 0, second.stderr[-5000:]
        assert f"{store}/step2 is damaged" in second.stderr
        assert f"{Path(shard).name}: {len(data) // 2} bytes, the manifest says {len(data)}" in second.stderr
        run_dir = tmp_path / "runs" / "damaged"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
        assert [step for step, _ in train] == [1, 2, 2, 3]  # step 2 done again, from step 1's checkpoint
        assert train[1] == train[2]
        assert store.latest() == "step3" and not store.problems("step2")  # saved again, whole
        assert not (run_dir / "checkpoints").is_dir()

