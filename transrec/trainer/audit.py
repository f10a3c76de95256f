"""Sample-id audit: which train sequences each rank consumed, at which optimizer step, in which process.

With `train.log_sample_ids: true`, rank r appends to RUN/samples/rank<r>.jsonl one line when it starts,
{"event": "start", "pid", "rank", "step", "epoch"} (step/epoch: where it resumed, 0 for a fresh run), and one
per batch it trained on, {"step", "epoch", "pid", "ids"} (ids: the batch's users, each the id of one train
sequence; step = the optimizer step the batch produced). A
checkpoint tagged step N holds every batch with step <= N: after a restart, the batches a killed process
recorded after the checkpoint it resumed from are replayed, and a reader drops them by their step
(`trained_batches`, `samples_per_epoch`).
Each line is one O_APPEND write, so a killed process leaves at most its last line incomplete.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path


class SampleAudit:
    def __init__(self, run_dir: str | Path, rank: int, enabled: bool):
        self.enabled, self.pid, self.rank = enabled, os.getpid(), rank
        self.path = Path(run_dir) / "samples" / f"rank{rank}.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        self._write_raw((json.dumps(record) + "\n").encode())

    def _write_raw(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def start(self, step: int, epoch: int) -> None:
        if self.enabled:
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a killed process's incomplete last line: end it
                        self._write_raw(b"\n")
            self._write({"event": "start", "pid": self.pid, "rank": self.rank, "step": step, "epoch": epoch})

    def batch(self, step: int, epoch: int, users) -> None:
        if self.enabled:
            self._write({"step": step, "epoch": epoch, "pid": self.pid, "ids": [int(i) for i in users]})


def read_audit(path: str | Path) -> list[dict]:
    """The records of one rank's audit file; an incomplete last line of a killed process is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def attempts(path: str | Path) -> list[dict]:
    """One rank's audit split by process, oldest first: [{"pid", "resumed_step", "batches": {step: record}}]."""
    runs: list[dict] = []
    for record in read_audit(path):
        if record.get("event") == "start":
            runs.append({"pid": record["pid"], "resumed_step": record["step"], "batches": {}})
        else:
            runs[-1]["batches"][record["step"]] = record
    return runs


def trained_batches(path: str | Path) -> list[dict]:
    """The batch records of one rank that count, in step order: each process's, up to the step the next one
    resumed from (those after it were trained again, by the next process)."""
    runs = attempts(path)
    kept = []
    for run, following in zip(runs, [*runs[1:], None]):
        last = following["resumed_step"] if following else float("inf")
        kept += [record for step, record in sorted(run["batches"].items()) if step <= last]
    return kept


def samples_per_epoch(run_dir: str | Path) -> dict[int, Counter]:
    """How many times each train sample was trained on, per epoch, over every rank and every restart of a run."""
    counts: dict[int, Counter] = {}
    for path in sorted((Path(run_dir) / "samples").glob("rank*.jsonl")):
        for record in trained_batches(path):
            counts.setdefault(record["epoch"], Counter()).update(record["ids"])
    return counts


def every_sample_once(counts: dict[int, Counter], samples: int, epochs: int) -> bool:
    """Whether `counts` (`samples_per_epoch`) holds each of the `samples` train samples exactly once in each of
    the `epochs` epochs."""
    return sorted(counts) == list(range(epochs)) and all(
        sorted(count) == list(range(samples)) and set(count.values()) == {1} for count in counts.values())
