"""Ray orchestration: reach a cluster (or start an embedded one on loopback), run Ray Train workers.

Each Ray Train worker is one DeepSpeed rank running `transrec.trainer.loop.train`. When a worker dies,
Ray Train restarts the group (up to `cluster.max_failures` times) and the loop resumes from the run's
latest complete checkpoint by itself.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from transrec.config import ClusterConfig, Config, ConfigError, from_dict


def wants_gpu(cluster: ClusterConfig) -> bool:
    if cluster.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"cluster.use_gpu must be auto, true or false, got {cluster.use_gpu!r}")
    if cluster.use_gpu == "auto":
        import torch

        return torch.cuda.is_available()
    return cluster.use_gpu == "true"


def worker_env() -> dict[str, str]:
    """Environment of every worker: offline model loading, and this venv's tools first on PATH (ninja:
    two different ninja binaries invalidate DeepSpeed's JIT extension cache, STACK.md)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def connect(cluster: ClusterConfig) -> None:
    """Joins `cluster.address`, or starts an embedded single-node cluster that listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    if cluster.address:
        ray.init(address=cluster.address, runtime_env=runtime_env)
        return
    needed = cluster.num_workers * cluster.cpus_per_worker
    # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env=runtime_env)


def _worker_main(loop_config: dict) -> None:
    from transrec.trainer.loop import train

    train(from_dict(Config, loop_config["config"], "run config"))


def train_on_cluster(cfg: Config) -> dict:
    """Runs the training job of `cfg` (already prepared by `trainer.run_dir.prepare`) and returns its summary."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = wants_gpu(cfg.cluster)
    connect(cfg.cluster)
    resources = {"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.name} failed: {result.error}")
    return json.loads((cfg.run_dir / "results.json").read_text())
