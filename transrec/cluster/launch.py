"""Ray orchestration: reach a cluster (or start an embedded one on loopback), run Ray Train workers.

Each Ray Train worker is one DeepSpeed rank running `transrec.trainer.loop.train`. When a worker dies,
Ray Train restarts the group (up to `cluster.max_failures` times) and the loop resumes from the run's
latest complete checkpoint by itself, and the driver's console says so; an error in the data stops the run
instead (`WorkerFailures`). The workers' output goes to `runs/NAME/logs/rankN.log`; rank 0's progress reaches
the driver's console through a queue (trainer/console.py), all of it with `--verbose`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

from ray.train import UserCallback

from transrec.config import ClusterConfig, Config, from_dict
from transrec.dataloading.dataset_format import DataError, DatasetFileError
from transrec.trainer.console import (VERBOSE_ENV, Console, QueueConsole, forward_warnings, relay, send_output_to,
                                      verbose)


def worker_env() -> dict[str, str]:
    """Environment of every worker: offline model loading, and this venv's tools first on PATH (ninja:
    two different ninja binaries invalidate DeepSpeed's JIT extension cache)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # (not TMPDIR: the workers keep their node's, which is short enough for the unix sockets opened under it)
    for name in (VERBOSE_ENV, "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MALLOC_MMAP_THRESHOLD_",
                 "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def connect(cluster: ClusterConfig) -> None:
    """Joins a cluster: `cluster.address`; else, inside a Ray job, the job's cluster (RAY_ADDRESS); else the
    embedded cluster of `transrec cluster up` when it runs; else starts an embedded cluster of this process's
    own (loopback only, every port free), stopped when this process ends, however it ends."""
    import ray

    if ray.is_initialized():
        return
    # the workers' output stays in their log files (see _worker_main); --verbose streams it here too
    runtime_env = {"env_vars": worker_env()}
    quiet = {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.WARNING}
    if cluster.address:
        ray.init(address=cluster.address, runtime_env=runtime_env, **quiet)
        return
    job_address = os.environ.get("RAY_ADDRESS", "")
    if job_address and "://" not in job_address:  # a job's driver: Ray names the cluster it runs on
        ray.init(runtime_env=runtime_env, **quiet)
        return
    from transrec.cluster.embedded import cluster_pids, read_state, up_for_this_process

    state = read_state()
    if state is not None and cluster_pids(state.cluster_id):
        print(f"transrec: joining the embedded cluster at {state.gcs_address}", file=sys.stderr)
    else:  # one of its own, as `cluster up` starts one (ray.init's own would take Ray's fixed ports), gone with it
        state = up_for_this_process(num_cpus=max(os.cpu_count() or 1, cluster.num_workers * cluster.cpus_per_worker))
    ray.init(address=state.gcs_address, runtime_env=runtime_env, **quiet)


DATA_ERRORS = (DataError, DatasetFileError)  # wrong data: a restart would fail again, the same way


def first_data_error(errors: Iterable[BaseException | None]) -> BaseException | None:
    return next((error for error in errors if isinstance(error, DATA_ERRORS)), None)


class WorkerFailures(UserCallback):
    """Ray Train restarts a failed worker group whatever failed in it (`FailureConfig.max_failures`). A worker's
    data error, raised again here in Ray Train's controller, becomes a controller error, which its failure
    policy does not retry: the run stops, with that error. Any other failure is said on the driver's console
    (`console`: its queue), since the run is silent until the new group trains (a lost node: until it is back)."""

    def __init__(self, console, max_failures: int):
        self.console, self.max_failures, self.failures = QueueConsole(console), max_failures, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        error = first_data_error(worker_exceptions.values())
        if error is not None:
            raise error
        self.failures += 1
        rank, failure = min(worker_exceptions.items())
        what = (str(failure).strip().splitlines() or [""])[0][:200]
        if self.failures <= self.max_failures:
            then = (f"restart {self.failures} of cluster.max_failures {self.max_failures}: Ray Train restarts the "
                    f"worker group from the latest checkpoint once its workers can be placed")
        else:
            then = f"no restart left (cluster.max_failures {self.max_failures})"
        self.console.line(f"transrec: rank {rank} failed ({type(failure).__name__}: {what}); {then}")


def _worker_main(loop_config: dict) -> None:
    import ray.train

    from transrec.trainer.checkpoint_store import run_checkpoints
    from transrec.trainer.loop import train

    cfg = from_dict(Config, loop_config["config"], "run config")
    rank = ray.train.get_context().get_world_rank()
    if not verbose():
        send_output_to(cfg.run_dir / "logs" / f"rank{rank}.log")
    console = QueueConsole(loop_config["console"])
    forward_warnings(console, prefix=f"[rank {rank}] ")
    # each worker writes its own checkpoint shard: its node must reach the run's storage
    run_checkpoints(cfg).check_writable(f"worker rank {rank}")
    summary = train(cfg, console)
    if rank == 0:  # to the driver, which may run on another node
        loop_config["summaries"].put(summary)


def prepare_and_train(cfg: Config, resume: bool) -> dict:
    """Creates (with `resume`: reopens) the run directory of `cfg`, then trains it on the cluster."""
    from transrec.trainer import run_dir

    return train_on_cluster(run_dir.prepare(cfg, resume))


def train_on_cluster(cfg: Config) -> dict:
    """Runs the training job of `cfg` (already prepared by `trainer.run_dir.prepare`) and returns its summary.
    The scaling config is checked against the cluster's live nodes before any worker starts."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from transrec.cluster.scaling import (check_scaling, placement_strategy, ray_nodes, resolve_use_gpu,
                                          worker_resources)

    placement = placement_strategy(cfg.cluster)
    connect(cfg.cluster)
    nodes = ray_nodes()
    use_gpu = resolve_use_gpu(cfg.cluster, nodes)
    check_scaling(cfg.cluster, nodes, use_gpu)
    # on this driver's node: on another, they would go with it, and every restart would train to the end and
    # fail to hand over its summary. No CPU reserved: a queue actor that waited for one would wait behind the
    # workers' placement group forever.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    summaries, console = (Queue(maxsize=size, actor_options={"num_cpus": 0, "scheduling_strategy": here})
                          for size in (1, 0))
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"config": cfg.to_dict(), "summaries": summaries, "console": console},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(cfg.cluster, use_gpu),
                                     placement_strategy=placement),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.cluster.collective_timeout_s),
        run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             callbacks=[WorkerFailures(console, cfg.cluster.max_failures)]),
    )
    try:
        relay(trainer.fit, console, Console())
    except TrainingFailedError as err:
        causes = [getattr(err, "controller_failure", None), *getattr(err, "worker_failures", {}).values()]
        data_error = first_data_error(causes)
        if data_error is not None:  # its message names the file and the record
            raise data_error from None
        raise RuntimeError(f"training run {cfg.name} failed (its workers' logs: {cfg.run_dir / 'logs'}): "
                           f"{err}") from None
    summary = summaries.get(timeout=60)
    (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=2))  # rank 0's went to its own node
    return summary
