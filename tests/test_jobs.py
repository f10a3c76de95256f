"""Jobs through the launcher on a real embedded cluster: submit -> logs -> jobs (and Ray's own `ray job list`),
stop, and every error that must come before anything runs."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transrec.cluster import embedded, jobs
from transrec.launcher.cli import main
from transrec.trainer.audit import read_audit

CONFIG = "tiny"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    state = embedded.up(state_dir, num_cpus=4)  # 2 runs of 2 workers may overlap
    yield state_dir, state
    embedded.down(state_dir)
    assert embedded.cluster_pids(state.cluster_id) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs-data") / "tiny"
    assert main(["prepare", "synthetic", "--out", str(out), "--users", "48", "--items", "40"]) == 0
    return out


def submit(capsys, state_dir, *sets) -> str:
    capsys.readouterr()
    args = ["submit", "--config", CONFIG, "--state-dir", str(state_dir)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_submit_logs_and_list(cluster, data, tmp_path, capsys, monkeypatch):
    state_dir, state = cluster
    monkeypatch.chdir(tmp_path)  # relative paths in the config resolve against the submitter's directory
    job_id = submit(capsys, state_dir, "name=jobrun", "output_dir=runs", f"data.path={data}",
                    "train.log_sample_ids=true")
    assert job_id.startswith("transrec-jobrun-")

    assert main(["logs", job_id, "--follow", "--state-dir", str(state_dir)]) == 0
    captured = capsys.readouterr()
    assert f"job {job_id}: SUCCEEDED" in captured.err
    logs = captured.out
    assert "Running entrypoint for job" in logs and "pretrain --config config.yaml" in logs
    assert "[jobrun] step 3: valid/hr@10=" in logs  # the run's progress, from the workers
    run = tmp_path / "runs" / "jobrun"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3 and f'"name": "{results["name"]}"' in logs
    # it ran the submitted config, --set included (the runtime env carried it)
    assert [r["event"] for r in read_audit(run / "samples" / "rank1.jsonl") if "event" in r] == ["start"]

    assert main(["jobs", "--json", "--state-dir", str(state_dir)]) == 0
    rows = {row["job_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[job_id]["status"] == "SUCCEEDED" and rows[job_id]["run"] == "jobrun"
    assert main(["logs", job_id, "--state-dir", str(state_dir)]) == 0  # without --follow: what is there
    assert "[jobrun] step 3" in capsys.readouterr().out
    # the same job in Ray's own CLI
    ray_cli = Path(sys.executable).parent / "ray"
    listed = subprocess.run([str(ray_cli), "job", "list", "--address", state.dashboard_url],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout


def test_stop_ends_the_job_and_its_workers(cluster, data, tmp_path, capsys):
    state_dir, _ = cluster
    job_id = submit(capsys, state_dir, "name=long", f"output_dir={tmp_path}", f"data.path={data}",
                    "train.epochs=200", "train.log_sample_ids=true")
    audit = tmp_path / "long" / "samples" / "rank0.jsonl"
    deadline = time.monotonic() + 150
    while not (audit.exists() and any("ids" in r for r in read_audit(audit))):  # training is under way
        assert time.monotonic() < deadline, "the job did not start training"
        assert jobs.status(embedded.read_state(state_dir).dashboard_url, job_id) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    workers = {r["pid"] for rank in (0, 1) for r in read_audit(tmp_path / "long" / "samples" / f"rank{rank}.jsonl")}
    assert main(["stop", job_id, "--state-dir", str(state_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: STOPPED"
    deadline = time.monotonic() + 30
    while any(embedded._alive(pid) for pid in workers):  # the Train workers go with the job's driver
        assert time.monotonic() < deadline, f"workers {workers} still alive after stop"
        time.sleep(0.5)
    assert not (tmp_path / "long" / "results.json").exists()


def test_errors_before_anything_runs(cluster, data, tmp_path, capsys):
    state_dir, state = cluster
    before = {row["job_id"] for row in jobs.list_jobs(state.dashboard_url)}

    def fails(*args, expect: str):
        capsys.readouterr()
        assert main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err

    ok = ["--set", f"data.path={data}", "--set", f"output_dir={tmp_path}"]
    fails("submit", "--config", CONFIG, *ok, "--address", "http://127.0.0.1:1", expect="cannot reach the Ray cluster")
    fails("submit", "--config", CONFIG, *ok, "--address", "ftp://x", expect="expected the dashboard's URL")
    # a listening port that is not a Ray dashboard (the GCS port speaks gRPC, not the Jobs API)
    fails("submit", "--config", CONFIG, *ok, "--address", f"http://{state.gcs_address}",
          expect="does not answer as a Ray Jobs API")
    fails("submit", "--config", "nope.yaml", "--state-dir", str(state_dir), expect="config file not found")
    fails("submit", "--config", CONFIG, "--set", "train.epoch=1", "--state-dir", str(state_dir),
          expect="unknown key 'train.epoch'")
    fails("submit", "--config", CONFIG, "--set", f"data.path={tmp_path / 'none'}", "--state-dir", str(state_dir),
          expect="manifest.json: missing")
    fails("submit", "--config", CONFIG, *ok, "--set", "cluster.num_workers=5", "--set", "cluster.cpus_per_worker=1",
          "--state-dir", str(state_dir), expect="room for 4 such worker(s)")
    fails("submit", "--config", CONFIG, *ok, "--set", "cluster.use_gpu=\"true\"", "--state-dir", str(state_dir),
          expect="0 GPUs")
    (tmp_path / "file").write_text("")
    fails("submit", "--config", CONFIG, "--set", f"data.path={data}", "--set", f"output_dir={tmp_path / 'file'}",
          "--state-dir", str(state_dir), expect="checkpoint storage")
    fails("logs", "raysubmit_nope", "--state-dir", str(state_dir), expect="no job 'raysubmit_nope'")
    fails("stop", "raysubmit_nope", "--state-dir", str(state_dir), expect="no job 'raysubmit_nope'")
    assert {row["job_id"] for row in jobs.list_jobs(state.dashboard_url)} == before  # nothing was submitted
