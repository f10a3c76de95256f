"""Training jobs through Ray's Jobs API: submit, list, logs, stop.

A job's entrypoint is `python -m transrec.launcher.cli pretrain --config config.yaml` on the cluster. Its
runtime environment carries the config (a `working_dir` holding the resolved YAML, every `--set` applied)
and the project (`py_modules`: this `transrec` package, uploaded, so a remote cluster runs the submitter's
code; the cluster's Python must already hold the dependencies: torch, deepspeed, ray, ...). The jobs are
ordinary Ray jobs: `ray job list --address URL` shows them too.

Everything that can be checked before submitting is: the config (load_config), the address (a TCP connect,
then the Jobs API's version handshake), the scaling config against the cluster's live nodes, and, for a
cluster on this machine, the dataset and the checkpoint storage.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import yaml

from transrec.cluster.embedded import ClusterError, cluster_nodes, is_loopback, read_state
from transrec.cluster.scaling import check_scaling, resolve_use_gpu
from transrec.config import Config, ConfigError, load_config
from transrec.trainer.checkpoint_store import run_checkpoints
from transrec.trainer.run_dir import check_dataset, check_model_parts

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None, state_directory: str | Path | None = None) -> str:
    """The Jobs API URL: --address, else the embedded cluster of `transrec cluster up`."""
    if not address:
        state = read_state(state_directory)
        if state is None:
            raise ClusterError("no cluster to submit to: pass --address http://HOST:8265 (a Ray dashboard) or "
                               "start the embedded one with `transrec cluster up`")
        return state.dashboard_url
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(f"--address {address!r}: expected the dashboard's URL, e.g. http://HOST:8265")
    try:
        parsed.port
    except ValueError:
        raise ClusterError(f"--address {address!r}: the port is not a number") from None
    return address.rstrip("/")


def is_local(url: str) -> bool:
    return is_loopback(urlparse(url).hostname or "")


def _reachable(url: str, timeout: float = 5.0) -> None:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(f"cannot reach the Ray cluster at {url}: {reason} "
                           f"(is it up? `transrec cluster status`, or check --address)") from None


def client(url: str):
    """A JobSubmissionClient for `url`, or a ClusterError that says why there is none."""
    _reachable(url)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as err:  # ConnectionError, RuntimeError, requests' errors: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"{url} does not answer as a Ray Jobs API: {first}") from None


def _localize(cfg: Config, local: bool) -> Config:
    """Paths the job reads and writes, as the cluster sees them: relative ones are made absolute against
    this directory for a cluster on this machine; for a remote cluster they must already be absolute
    (a file system the nodes share) or URIs."""
    def fix(key: str, value: str) -> str:
        if not value or "://" in value or Path(value).is_absolute():
            return value
        if not local:
            raise ConfigError(f"{key}={value!r} is relative: a remote cluster cannot see this machine's working "
                              f"directory; use an absolute path on the cluster's shared storage or a URI")
        return str(Path(value).resolve())

    return replace(cfg, output_dir=fix("output_dir", cfg.output_dir), init_from=fix("init_from", cfg.init_from),
                   checkpoint_storage=fix("checkpoint_storage", cfg.checkpoint_storage),
                   data=replace(cfg.data, path=fix("data.path", cfg.data.path)))


def prepare_submission(cfg: Config, url: str) -> Config:
    """The config as the job will run it, checked as far as it can be from here."""
    cfg = _localize(cfg, is_local(url))
    cfg = replace(cfg, cluster=replace(cfg.cluster, address=""))  # the driver runs on the cluster: Ray tells it
    check_model_parts(cfg)
    if is_local(url):
        check_dataset(cfg)
        run_checkpoints(cfg).check_writable()
    return cfg


def submit(config_path: str, overrides: list[str], address: str | None = None, resume: bool = False,
           state_directory: str | Path | None = None) -> tuple[str, str, Config]:
    """Validates, reaches the cluster, checks the scaling config against it, submits; returns (job id, url, cfg)."""
    cfg = load_config(config_path, overrides)
    url = resolve_address(address, state_directory)
    cfg = prepare_submission(cfg, url)
    jobs = client(url)
    nodes = cluster_nodes(url)
    check_scaling(cfg.cluster, nodes, resolve_use_gpu(cfg.cluster, nodes))

    import transrec

    package_dir = str(Path(transrec.__file__).resolve().parent)
    staging = Path(tempfile.mkdtemp(prefix="transrec-job-"))
    try:
        (staging / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        entrypoint = "python -m transrec.launcher.cli pretrain --config config.yaml" + (" --resume" if resume else "")
        job_id = jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=f"transrec-{cfg.name}-{secrets.token_hex(4)}",
            runtime_env={"working_dir": str(staging), "py_modules": [package_dir],
                         "excludes": ["__pycache__", "*.pyc"]},
            metadata={"transrec_run": cfg.name, "config": config_argument(config_path),
                      "overrides": json.dumps(overrides)},
        )
    except (ClusterError, ConfigError):
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"submitting to {url} failed: {first}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return job_id, url, cfg


def config_argument(config_path: str | Path) -> str:
    """--config as a later command can give it again: a file by its absolute path, a preset by its name."""
    return str(Path(config_path).resolve()) if Path(config_path).is_file() else str(config_path)


def resume_command(metadata: dict, cluster_args: list[str]) -> str:
    """The command that submits a transrec job's run again, to go on from its latest checkpoint, on the cluster
    that `cluster_args` (--address, --state-dir) name; "" for a job that transrec did not submit."""
    if "config" not in metadata or "transrec_run" not in metadata:
        return ""
    argv = ["transrec", "submit", "--config", metadata["config"]]
    for override in json.loads(metadata.get("overrides") or "[]"):
        argv += ["--set", override]
    return shlex.join([*argv, "--resume", *cluster_args])


def list_jobs(url: str, cluster_args: list[str] = ()) -> list[dict]:
    """The cluster's submitted jobs, oldest first; one that FAILED or was STOPPED comes with the command that
    resumes it (`resume_command`)."""
    rows = []
    for job in client(url).list_jobs():
        if job.type is not None and str(job.type).upper().endswith("DRIVER"):
            continue  # drivers that connected directly (ray.init), not submitted jobs
        status = str(job.status.value if hasattr(job.status, "value") else job.status)
        metadata = job.metadata or {}
        rows.append({"job_id": job.submission_id, "status": status, "run": metadata.get("transrec_run", ""),
                     "start_time": job.start_time, "end_time": job.end_time, "entrypoint": job.entrypoint,
                     "message": job.message or "",
                     "resume": resume_command(metadata, list(cluster_args)) if status in ("FAILED", "STOPPED") else ""})
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def _check_job(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except Exception as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise ClusterError(f"no job {job_id!r} on this cluster (`transrec jobs` lists them)") from None
        raise


def status(url: str, job_id: str) -> str:
    info = _check_job(client(url), job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def logs(url: str, job_id: str, follow: bool = False, out=None) -> str:
    """Prints the job's logs (following them until the job ends with `follow`); returns its status."""
    out = out or sys.stdout
    jobs = client(url)
    _check_job(jobs, job_id)
    if not follow:
        out.write(jobs.get_job_logs(job_id))
    else:
        async def tail() -> None:
            async for lines in jobs.tail_job_logs(job_id):
                out.write(lines)
                out.flush()

        asyncio.run(tail())
    return status(url, job_id)


def wait(url: str, job_id: str, timeout: float = 600.0, poll: float = 1.0) -> str:
    jobs = client(url)
    deadline = time.monotonic() + timeout
    while True:
        info = _check_job(jobs, job_id)
        state = str(info.status.value if hasattr(info.status, "value") else info.status)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def stop(url: str, job_id: str, timeout: float = 60.0) -> str:
    """Asks Ray to stop the job (SIGTERM to the entrypoint, SIGKILL later) and waits for it to end."""
    jobs = client(url)
    _check_job(jobs, job_id)
    jobs.stop_job(job_id)
    return wait(url, job_id, timeout)
