"""Cluster-path timings: `cluster up`, submit -> first training step, and the cost of one worker restart.

    python benchmarks/cluster_jobs.py [--repeats 3] [--users 96] [--out benchmarks/cluster_jobs.json]

Starts its own embedded cluster (a private state dir, torn down at the end), prepares a synthetic data set,
and submits `tiny` jobs through `transrec.cluster.jobs` with `train.log_sample_ids=true`, so
each phase is read from the run's own files:
- submit -> job RUNNING (the entrypoint started: runtime env set up), -> every rank's `start` audit record
  (Ray Train workers up, model built, DeepSpeed initialized, checkpoint looked for), -> the first batch
  record (first optimizer step done);
- restart: a run with cluster.max_failures=1 whose rank 1 is SIGKILLed right after step K; kill -> the
  restarted workers' `start` records, -> their first step; and the wall time of the killed run minus that
  of the same run uninterrupted (the whole price of the failure: detection, new worker group, resume, replay).
The machine's load average is recorded next to each figure: on a shared machine it moves them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transrec.cluster import embedded, jobs  # noqa: E402
from transrec.trainer.audit import read_audit  # noqa: E402

CONFIG = "tiny"


def load() -> float:
    return round(os.getloadavg()[0], 2)


WATCH: dict = {}  # {"url", "job_id"} of the job being timed: a failed job ends the wait


def first_record(path: Path, predicate, deadline: float) -> float:
    """When a record matching `predicate` was first seen in the audit file `path`."""
    last_check = 0.0
    while time.monotonic() < deadline:
        if WATCH and time.monotonic() - last_check > 2:
            last_check = time.monotonic()
            if jobs.status(WATCH["url"], WATCH["job_id"]) in ("FAILED", "STOPPED"):
                saved = Path(tempfile.gettempdir()) / f"{WATCH['job_id']}.log"
                saved.write_text(jobs.client(WATCH["url"]).get_job_logs(WATCH["job_id"]))
                raise RuntimeError(f"job {WATCH['job_id']} failed: its logs are in {saved}")
        if path.exists():
            for record in read_audit(path):
                if predicate(record):
                    return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"{path}: no matching record")


def wait_running(url: str, job_id: str, deadline: float) -> float:
    client = jobs.client(url)
    while time.monotonic() < deadline:
        if str(client.get_job_status(job_id).value) in ("RUNNING", "SUCCEEDED", "FAILED"):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(job_id)


def submit_to_first_step(url: str, data: Path, runs: Path, name: str, extra: list[str]) -> dict:
    t0 = time.monotonic()
    load0 = load()
    job_id, _, _ = jobs.submit(CONFIG, [f"name={name}", f"output_dir={runs}", f"data.path={data}",
                                        "train.log_sample_ids=true", *extra], url)
    t_submitted = time.monotonic()
    WATCH.update(url=url, job_id=job_id)
    deadline = t0 + 900
    t_running = wait_running(url, job_id, deadline)
    audits = [runs / name / "samples" / f"rank{r}.jsonl" for r in (0, 1)]
    t_start = max(first_record(a, lambda r: r.get("event") == "start", deadline) for a in audits)
    t_step = max(first_record(a, lambda r: "ids" in r, deadline) for a in audits)
    return {"job_id": job_id, "submit_call_s": t_submitted - t0, "to_running_s": t_running - t0,
            "to_workers_started_s": t_start - t0, "to_first_step_s": t_step - t0, "load_before": load0,
            "load_after": load(), "t0": t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--users", type=int, default=96)
    parser.add_argument("--kill-after-step", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cluster_jobs.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (data, runs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="transrec-bench-"))
    from transrec.writers.synthetic import prepare_synthetic

    data = work / "data"
    prepare_synthetic(data, users=args.users, items=40, seed=0)
    results: dict = {"users": args.users, "config": "tiny", "load_start": load()}
    t = time.monotonic()
    state = embedded.up(work / "state", num_cpus=4)
    results["cluster_up_s"] = time.monotonic() - t
    url = state.dashboard_url
    try:
        firsts = []
        for i in range(args.repeats):
            run = submit_to_first_step(url, data, work / "runs", f"first{i}", [])
            assert jobs.wait(url, run["job_id"], 900) == "SUCCEEDED"
            firsts.append(run)
            print(json.dumps(run), flush=True)
        results["submit_to_first_step"] = firsts
        results["submit_to_first_step_median_s"] = statistics.median(r["to_first_step_s"] for r in firsts)

        # one restart: the same run killed after step K, and uninterrupted
        common = ["train.epochs=2", "train.checkpoint_every=2"]
        whole_t0 = time.monotonic()
        whole = submit_to_first_step(url, data, work / "runs", "whole", common)
        assert jobs.wait(url, whole["job_id"], 900, poll=0.2) == "SUCCEEDED"
        whole_wall = time.monotonic() - whole_t0

        killed_t0 = time.monotonic()
        killed = submit_to_first_step(url, data, work / "runs", "killed", [*common, "cluster.max_failures=1"])
        audit = work / "runs" / "killed" / "samples" / "rank1.jsonl"
        deadline = time.monotonic() + 900
        while True:
            records = read_audit(audit)
            if max((r["step"] for r in records if "ids" in r), default=0) >= args.kill_after_step:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim = records[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        load_kill = load()
        audits = [work / "runs" / "killed" / "samples" / f"rank{r}.jsonl" for r in (0, 1)]
        old_pids = {a: read_audit(a)[0]["pid"] for a in audits}
        t_restarted = max(first_record(a, lambda r, a=a: r.get("event") == "start" and r["pid"] != old_pids[a],
                                       deadline) for a in audits)
        starts = {a: [r for r in read_audit(a) if r.get("event") == "start"][-1] for a in audits}
        t_resumed_step = max(first_record(a, lambda r, a=a: "ids" in r and r["pid"] == starts[a]["pid"], deadline)
                             for a in audits)
        resumed = starts[audits[1]]
        assert jobs.wait(url, killed["job_id"], 900, poll=0.2) == "SUCCEEDED"
        killed_wall = time.monotonic() - killed_t0
        results["restart"] = {
            "killed_after_step": args.kill_after_step, "resumed_from_step": resumed["step"],
            "kill_to_workers_restarted_s": t_restarted - t_kill, "kill_to_first_step_after_resume_s":
                t_resumed_step - t_kill, "run_wall_uninterrupted_s": whole_wall, "run_wall_killed_s": killed_wall,
            "restart_cost_s": killed_wall - whole_wall, "load_at_kill": load_kill, "load_end": load(),
        }
        print(json.dumps(results["restart"]), flush=True)
    finally:
        embedded.down(work / "state")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
