"""Failures: Ray Train workers killed mid-run (SIGKILL, by their pids, mid-save and mid-evaluation) -> the group
restarts, resumes from the latest complete checkpoint, consumes every sample exactly once per epoch and ends
with the weights of a run that was never interrupted; so does a run whose driver was killed, once resumed; a
data error stops a run instead of restarting it; checkpoint storage that cannot be written fails at start."""
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_bad_data import rewrite_train
from transrec.cluster import embedded, jobs
from transrec.launcher.cli import main
from transrec.trainer.audit import attempts, samples_per_epoch, trained_batches
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


def common(data: Path, output_dir: Path) -> list[str]:
    """The run each test interrupts: 2 epochs of 3 steps, checkpoints at steps 2, 3 (epoch end), 4 and 6."""
    return [f"data.path={data}", f"output_dir={output_dir}", "train.epochs=2", "train.checkpoint_every=2",
            "train.log_sample_ids=true"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """() -> the run directory of that run never interrupted. Run alone, before the runs it is compared with: two
    jobs streaming the same data set directory at once on one machine have hung in mosaicml-streaming's shared
    barrier (README, known limits)."""
    output_dir = tmp_path_factory.mktemp("reference")
    job, _, _ = jobs.submit(CONFIG, ["name=whole", *common(data, output_dir)], cluster.dashboard_url)
    assert jobs.wait(cluster.dashboard_url, job, timeout=400) == "SUCCEEDED"
    return lambda: output_dir / "whole"


def assert_every_sample_once(run: Path, epochs: int) -> None:
    counts = samples_per_epoch(run)
    assert sorted(counts) == list(range(epochs))
    for epoch, count in counts.items():
        assert sorted(count) == list(range(USERS)) and set(count.values()) == {1}, (epoch, count)


def assert_same_weights(run: Path, reference: Path) -> None:
    """The final weights of both runs, bit for bit (every RNG and the loader position resume)."""
    a = consolidated_state_dict(CheckpointStore(run / "checkpoints"))
    b = consolidated_state_dict(CheckpointStore(reference / "checkpoints"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_replayed_as_the_reference(run: Path, reference: Path, restarts: int) -> None:
    """Per rank: a new process per restart (Ray Train starts a new group); what a restart trained again after
    the checkpoint it resumed from has the samples the killed process had there; the batches that count are
    the uninterrupted run's, step by step."""
    for rank in (0, 1):
        audit = run / "samples" / f"rank{rank}.jsonl"
        processes = attempts(audit)
        assert len({p["pid"] for p in processes}) == len(processes) == restarts + 1, processes
        for before, after in zip(processes, processes[1:]):
            assert after["resumed_step"] <= max(before["batches"], default=after["resumed_step"])
            replayed = [step for step in before["batches"] if step > after["resumed_step"] and step in after["batches"]]
            assert all(before["batches"][s]["ids"] == after["batches"][s]["ids"] for s in replayed), (rank, replayed)
        (whole,) = attempts(reference / "samples" / f"rank{rank}.jsonl")
        assert {r["step"]: (r["epoch"], r["ids"]) for r in trained_batches(audit)} == \
               {s: (r["epoch"], r["ids"]) for s, r in whole["batches"].items()}


def wait_for_step(audit: Path, step: int, timeout: float = 400) -> list[dict]:
    """The attempts of one rank's audit once its first process has trained `step`."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"{audit}: step {step} never trained"
        runs = attempts(audit) if audit.exists() else []
        if runs and max(runs[0]["batches"], default=0) >= step:
            return runs
        time.sleep(0.02)


def test_kills_mid_save_and_mid_evaluation_lose_nothing(cluster, data, tmp_path, uninterrupted):
    """benchmarks/chaos.py, small: a worker SIGKILLed while a checkpoint is being written, another while an
    evaluation runs. Each time the group restarts and resumes from the latest complete checkpoint; the run finishes
    by itself, every sample once per epoch, with the uninterrupted run's batches and weights."""
    from benchmarks.chaos import ChaosMonkey

    job, _, _ = jobs.submit(CONFIG, ["name=chaos", "cluster.max_failures=3", *common(data, tmp_path)],
                            cluster.dashboard_url)
    deadline = time.monotonic() + 600
    monkey = ChaosMonkey(tmp_path / "chaos", lambda: not (tmp_path / "chaos" / "results.json").exists()
                         and time.monotonic() < deadline, random.Random(0))
    kills = [monkey.kill("save"), monkey.kill("eval")]
    assert jobs.wait(cluster.dashboard_url, job, timeout=400) == "SUCCEEDED"
    assert [kill.moment for kill in kills if kill] == ["save", "eval"], kills
    assert not any(embedded._alive(kill.pid) for kill in kills)
    shown = io.StringIO()
    jobs.logs(cluster.dashboard_url, job, out=shown)  # the driver's console said each restart
    assert shown.getvalue().count("Ray Train restarts the worker group from the latest checkpoint") >= 2
    assert_replayed_as_the_reference(tmp_path / "chaos", uninterrupted(), restarts=2)
    assert_every_sample_once(tmp_path / "chaos", epochs=2)
    assert_same_weights(tmp_path / "chaos", uninterrupted())


def test_a_killed_driver_takes_its_own_cluster_along_and_resume_continues_exactly(data, tmp_path, uninterrupted):
    """`transrec pretrain` with no cluster to join starts one of its own: on loopback only (but torch's rendezvous
    store, which rank 0 opens on every interface: README, known limits). SIGKILL the driver mid-run: every process
    of that cluster goes too; `pretrain --resume` then goes on from the latest checkpoint to the uninterrupted run's
    weights, every sample once per epoch."""
    env = {**os.environ, "TRANSREC_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}  # no cluster to join
    argv = [sys.executable, "-m", "transrec.launcher.cli", "pretrain", "--config", CONFIG]
    for item in ["name=driver", *common(data, tmp_path)]:
        argv += ["--set", item]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rank0 = wait_for_step(tmp_path / "driver" / "samples" / "rank0.jsonl", 3)[0]["pid"]
        (state_file,) = tmp_path.glob("transrec-cluster-*/cluster.json")  # its own state dir
        cluster_id = json.loads(state_file.read_text())["cluster_id"]
        processes = embedded.cluster_pids(cluster_id)
        assert rank0 in processes
        outside = [s for s in embedded.listeners(processes) if not embedded.is_loopback(s["address"])]
        # one socket, rank 0's (or, as psutil may name its owner, one of rank 0's forked DataLoader workers)
        rank0_family = {rank0, *(child.pid for child in psutil.Process(rank0).children(recursive=True))}
        assert len(outside) == 1 and outside[0]["pid"] in rank0_family, outside
    finally:
        driver.kill()
    deadline = time.monotonic() + 60  # (the watchdog: SIGTERM, then SIGKILL after 2 s)
    while (embedded.cluster_pids(cluster_id) or state_file.parent.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert embedded.cluster_pids(cluster_id) == [] and not state_file.parent.exists()

    resumed = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert attempts(tmp_path / "driver" / "samples" / "rank0.jsonl")[1]["resumed_step"] >= 2
    assert_every_sample_once(tmp_path / "driver", epochs=2)
    assert_same_weights(tmp_path / "driver", uninterrupted())


def test_a_job_whose_driver_dies_is_listed_failed_with_the_command_that_resumes_it(cluster, data, tmp_path,
                                                                                    uninterrupted, capsys):
    url = cluster.dashboard_url
    job, _, _ = jobs.submit(CONFIG, ["name=orphan", *common(data, tmp_path)], url)
    workers = [wait_for_step(tmp_path / "orphan" / "samples" / f"rank{rank}.jsonl", 3)[0]["pid"] for rank in (0, 1)]
    os.kill(int(jobs.client(url).get_job_info(job).driver_info.pid), signal.SIGKILL)  # the job's entrypoint
    assert jobs.wait(url, job, timeout=120) == "FAILED"
    deadline = time.monotonic() + 60
    while any(embedded._alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(embedded._alive(pid) for pid in workers)  # its training workers went with it

    capsys.readouterr()
    assert main(["jobs", "--address", url]) == 0
    listed = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(listed) if line.startswith(job))
    assert listed[row].split()[1] == "FAILED"
    resume = next(line for line in listed[row + 1:] if line.strip().startswith("to resume: "))
    command = shlex.split(resume.split("to resume: ", 1)[1])
    assert command[:2] == ["transrec", "submit"] and command[-3:] == ["--resume", "--address", url]
    assert main(command[1:]) == 0
    again = capsys.readouterr().out.strip()
    assert jobs.wait(url, again, timeout=400) == "SUCCEEDED"
    assert_every_sample_once(tmp_path / "orphan", epochs=2)
    assert_same_weights(tmp_path / "orphan", uninterrupted())


def test_a_data_error_in_a_worker_stops_the_run_instead_of_restarting_it(cluster, data, tmp_path):
    """Restarts are for crashes: a worker's DataError (here, evaluation data naming an item outside the catalogue)
    would fail each restart the same way, so the run stops at once with its message, whatever max_failures."""
    bad = Path(shutil.copytree(data, tmp_path / "bad-eval"))
    rewrite_train(bad, {5: [3, 4, 999, 6]}, split="eval")
    job, _, _ = jobs.submit(CONFIG, [f"data.path={bad}", f"output_dir={tmp_path}", "name=bad", "cluster.max_failures=3",
                                     "train.log_sample_ids=true"], cluster.dashboard_url)
    assert jobs.wait(cluster.dashboard_url, job, timeout=400) == "FAILED"
    out = io.StringIO()
    jobs.logs(cluster.dashboard_url, job, out=out)
    shown = out.getvalue()
    assert (f"transrec pretrain: error: {bad / 'eval'}: sample 5 (user 5) has item 999, outside the catalogue's 40 "
            f"items") in shown.splitlines() and "Traceback" not in shown, shown[-3000:]
    # One attempt: rank 1 (which holds sample 5) started once; rank 0 may be stopped before it records its start.
    samples = tmp_path / "bad" / "samples"
    assert len(attempts(samples / "rank1.jsonl")) == 1
    assert not (samples / "rank0.jsonl").exists() or len(attempts(samples / "rank0.jsonl")) == 1


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
