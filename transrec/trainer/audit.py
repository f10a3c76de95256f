"""Sample-id audit: which train sequences each rank consumed, at which optimizer step, in which process.

With `train.log_sample_ids: true`, rank r appends to RUN/samples/rank<r>.jsonl one line when it starts,
{"event": "start", "pid", "rank", "step", "epoch"} (step/epoch: where it resumed, 0 for a fresh run), and one
per batch it trained on, {"step", "epoch", "pid", "ids"} (ids: the batch's users, each the id of one train
sequence; step = the optimizer step the batch produced). A
checkpoint tagged step N holds every batch with step <= N: after a restart, the batches a killed process
recorded after the checkpoint it resumed from are replayed, and a reader drops them by their step.
Each line is one O_APPEND write, so a killed process leaves at most its last line incomplete.
"""
from __future__ import annotations

import json
import os
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
