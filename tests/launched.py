"""What the tests that launch real training runs (torchrun ranks, DeepSpeed) read from a run directory, and a
copy of a run as it stood at one of its checkpoints: resuming that copy is resuming a run stopped there,
without a launch spent on stopping one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transrec.trainer.audit import read_audit
from transrec.trainer.checkpoint_store import LATEST, is_tag, step_of


def losses(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of every train record of metrics.jsonl, in order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records if r["kind"] == "train"]


def global_batches(run: Path) -> dict[int, list[int]]:
    """Per step, the sample ids all ranks trained on (sorted)."""
    batches: dict[int, list[int]] = {}
    for path in (run / "samples").glob("rank*.jsonl"):
        for record in read_audit(path):
            if "ids" in record:
                batches.setdefault(record["step"], []).extend(record["ids"])
    return {step: sorted(ids) for step, ids in sorted(batches.items())}


def _keep_records_until(path: Path, step: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if json.loads(line).get("step", 0) <= step))


def resumable_copy(run: Path, step: int, name: str) -> str:
    """Copies `run` (trained with a checkpoint every step) to `name` as if it had stopped right after saving
    checkpoint step{step}: the later checkpoints, metrics and audit records and the results are dropped. Returns
    `name`, to resume."""
    copy = run.parent / name
    shutil.copytree(run, copy)
    checkpoints = copy / "checkpoints"
    assert (checkpoints / f"step{step}").is_dir(), f"{run} has no checkpoint step{step}"
    for tag in checkpoints.iterdir():
        if is_tag(tag.name) and step_of(tag.name) > step:
            shutil.rmtree(tag)
    (checkpoints / LATEST).write_text(f"step{step}")
    for records in [copy / "metrics.jsonl", *(copy / "samples").glob("rank*.jsonl")]:
        _keep_records_until(records, step)
    (copy / "results.json").unlink(missing_ok=True)
    return name
