"""Failures: a Ray Train worker killed mid-run (SIGKILL, by its pid) -> the group restarts, resumes from the
latest complete checkpoint, consumes every sample exactly once per epoch and ends with the weights of a run
that was never interrupted; checkpoint storage that cannot be written fails at start."""
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from transrec.cluster import embedded, jobs
from transrec.launcher.cli import main
from transrec.trainer.audit import read_audit
from transrec.trainer.checkpoint import consolidated_state_dict
from transrec.trainer.checkpoint_store import CheckpointStore

CONFIG = "tiny"
USERS = 48  # one train sequence each: 3 steps per epoch at 8 sequences x 2 ranks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    state = embedded.up(state_dir, num_cpus=4)  # room for two 2-worker runs side by side
    yield state
    embedded.down(state_dir)
    assert embedded.cluster_pids(state.cluster_id) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("failure-data") / "tiny"
    assert main(["prepare", "synthetic", "--out", str(out), "--users", str(USERS), "--items", "40"]) == 0
    return out


def attempts(path: Path) -> list[dict]:
    """One rank's audit split by process: [{"pid", "resumed_step", "batches": {step: record}}]."""
    runs = []
    for record in read_audit(path):
        if record.get("event") == "start":
            runs.append({"pid": record["pid"], "resumed_step": record["step"], "batches": {}})
        else:
            assert record["pid"] == runs[-1]["pid"]
            runs[-1]["batches"][record["step"]] = record
    return runs


def test_killed_worker_restarts_resumes_and_matches_an_uninterrupted_run(cluster, data, tmp_path):
    common = [f"data.path={data}", f"output_dir={tmp_path}", "train.epochs=2", "train.checkpoint_every=2",
              "train.log_sample_ids=true"]
    killed, _, _ = jobs.submit(CONFIG, ["name=killed", "cluster.max_failures=1", *common], cluster.dashboard_url)

    # kill rank 1 right after it trained step 3: checkpoints are at steps 2, 3 (end of epoch 0), 4, 6, so the
    # run must resume from step 2 and replay step 3
    audit = tmp_path / "killed" / "samples" / "rank1.jsonl"
    deadline = time.monotonic() + 400
    while True:
        assert time.monotonic() < deadline, "rank 1 never reached step 3"
        first = attempts(audit) if audit.exists() else []
        if first and max(first[0]["batches"], default=0) >= 3:
            break
        time.sleep(0.02)
    victim = first[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_after = max(attempts(audit)[0]["batches"])
    whole, _, _ = jobs.submit(CONFIG, ["name=whole", *common], cluster.dashboard_url)  # the reference run

    assert jobs.wait(cluster.dashboard_url, killed, timeout=400) == "SUCCEEDED"
    assert jobs.wait(cluster.dashboard_url, whole, timeout=400) == "SUCCEEDED"
    assert not embedded._alive(victim)

    for rank in (0, 1):
        runs = attempts(tmp_path / "killed" / "samples" / f"rank{rank}.jsonl")
        (reference,) = attempts(tmp_path / "whole" / "samples" / f"rank{rank}.jsonl")
        assert len(runs) == 2, f"rank {rank}: expected the killed process and its restart, got {len(runs)}"
        before, after = runs
        assert before["pid"] != after["pid"]  # Ray Train started a new group: both ranks are new processes
        resumed = after["resumed_step"]
        # the restart began at the last complete checkpoint before the kill: step 2's, or the epoch-end
        # one of step 3 when the kill landed after that save had completed (a race under load) ...
        assert resumed in (2, 3) and max(before["batches"]) == killed_after == 3
        assert min(after["batches"]) == resumed + 1 and max(after["batches"]) == 6
        # ... so what the killed process trained after it (step 3) was replayed, with the same samples
        replayed = [step for step in before["batches"] if step > resumed]
        assert replayed == list(range(resumed + 1, killed_after + 1))
        for step in replayed:
            assert before["batches"][step]["ids"] == after["batches"][step]["ids"]
        # counting from the resumed checkpoint, the run consumed what the uninterrupted run did, batch by batch
        effective = {step: rec for step, rec in before["batches"].items() if step <= resumed}
        effective.update(after["batches"])
        assert {s: (r["epoch"], r["ids"]) for s, r in effective.items()} == \
               {s: (r["epoch"], r["ids"]) for s, r in reference["batches"].items()}

    # every train sample exactly once per epoch, over both ranks, counting from the resumed checkpoint
    for epoch in (0, 1):
        counts = Counter()
        for rank in (0, 1):
            before, after = attempts(tmp_path / "killed" / "samples" / f"rank{rank}.jsonl")
            kept = [r for s, r in before["batches"].items() if s <= after["resumed_step"]]
            for record in kept + list(after["batches"].values()):
                if record["epoch"] == epoch:
                    counts.update(record["ids"])
        assert sorted(counts) == list(range(USERS)) and set(counts.values()) == {1}, (epoch, counts)

    # the final weights equal the uninterrupted run's, bit for bit (every RNG and the loader position resume)
    a = consolidated_state_dict(CheckpointStore(tmp_path / "killed" / "checkpoints"))
    b = consolidated_state_dict(CheckpointStore(tmp_path / "whole" / "checkpoints"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_unwritable_checkpoint_storage_fails_at_start(data, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # root may write anywhere: a path under a regular file cannot be created by anyone
    started = time.monotonic()
    code = main(["pretrain", "--config", CONFIG, "--set", f"data.path={data}", "--set", f"output_dir={blocker}"])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint storage {blocker}/tiny/checkpoints is not writable" in err
    assert time.monotonic() - started < 10  # before Ray, DeepSpeed or any data
    import ray

    assert not ray.is_initialized()
