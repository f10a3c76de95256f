"""`transrec cluster up|down|status`: a real Ray head on loopback, found and stopped by its own processes;
the scaling config checked against a cluster's nodes; placement passed to Ray Train."""
import json
import queue
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from transrec.cluster import embedded
from transrec.cluster.scaling import check_scaling, placement_strategy, resolve_use_gpu
from transrec.config import ClusterConfig, ConfigError, load_config
from transrec.launcher.cli import main

CONFIG = "tiny"


def ss_listeners() -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket, as `ss -ltnp` reports them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address = fields[3].rsplit(":", 1)[0].strip("[]")
        for part in line.split("pid=")[1:]:
            found.append((address, int(part.split(",")[0])))
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    assert main(["cluster", "up", "--state-dir", str(state_dir), "--num-cpus", "3"]) == 0
    state = embedded.read_state(state_dir)
    yield state_dir, state
    if embedded.read_state(state_dir) is not None:  # a test failed before its `cluster down`
        embedded.down(state_dir)


def test_down_leaves_other_clusters_alone(cluster, tmp_path):
    """`down` stops its own cluster's processes, not every Ray process on the machine (as `ray stop` would)."""
    _, running = cluster
    other = embedded.up(tmp_path / "other", num_cpus=1)
    try:
        assert other.ports["dashboard"] != running.ports["dashboard"] and other.temp_dir != running.temp_dir
        assert set(embedded.cluster_pids(other.cluster_id)).isdisjoint(embedded.cluster_pids(running.cluster_id))
        embedded.down(tmp_path / "other")
        assert embedded.cluster_pids(other.cluster_id) == [] and not Path(other.temp_dir).exists()
        assert embedded.dashboard_ready(running.dashboard_url) and embedded.cluster_pids(running.cluster_id)
    finally:
        embedded.kill_cluster(other.cluster_id)


def test_up_status_loopback_only_and_down(cluster, capsys):
    state_dir, state = cluster
    capsys.readouterr()
    assert main(["cluster", "status", "--state-dir", str(state_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["running"] and info["dashboard_url"] == state.dashboard_url
    assert info["dashboard_url"].startswith("http://127.0.0.1:") and info["gcs_address"].startswith("127.0.0.1:")
    assert len(info["nodes"]) == 1 and info["nodes"][0]["alive"] and info["nodes"][0]["resources"]["CPU"] == 3
    assert info["listeners"] >= 5 and info["non_loopback_listeners"] == []

    # cross-check with ss: every socket a process of this cluster listens on is on loopback, and the
    # dashboard, GCS and client-server ports chosen for it are among them
    pids = set(embedded.cluster_pids(state.cluster_id))
    ours = [(address, pid) for address, pid in ss_listeners() if pid in pids]
    assert len(ours) >= 5
    assert all(embedded.is_loopback(address) for address, _ in ours), ours
    ports = {sock["port"] for sock in embedded.listeners(sorted(pids))}
    assert {state.ports["dashboard"], state.ports["gcs"], state.ports["client"]} <= ports

    # a second `up` on the same state dir refuses, naming the running one
    assert main(["cluster", "up", "--state-dir", str(state_dir)]) == 2
    assert state.dashboard_url in capsys.readouterr().err

    agents = [pid for pid in pids if "Agent" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(agents) == 2  # the raylet's dashboard and runtime-env agents (their environment lacks the marker)
    assert main(["cluster", "down", "--state-dir", str(state_dir)]) == 0
    assert embedded.cluster_pids(state.cluster_id) == []
    assert not any(embedded._alive(pid) for pid in pids)  # the agents too, not orphaned
    assert not (state_dir / "cluster.json").exists()
    assert not embedded.dashboard_ready(state.dashboard_url)
    capsys.readouterr()
    assert main(["cluster", "status", "--state-dir", str(state_dir)]) == 2
    assert "no embedded cluster" in capsys.readouterr().err
    assert main(["submit", "--config", CONFIG, "--state-dir", str(state_dir)]) == 2
    assert "transrec cluster up" in capsys.readouterr().err


def nodes(*cpus_gpus):
    return [{"alive": True, "resources": {"CPU": float(c), "GPU": float(g)}} for c, g in cpus_gpus]


def test_check_scaling_against_nodes():
    two_nodes = nodes((4, 0), (2, 0))
    ok = check_scaling(ClusterConfig(num_workers=3, cpus_per_worker=2), two_nodes, use_gpu=False)
    assert ok["max_workers"] == 3 and ok["cpus"] == 6
    with pytest.raises(ConfigError, match=r"num_workers=4 workers x \(2 CPU\).*6 CPUs.*room for 3"):
        check_scaling(ClusterConfig(num_workers=4, cpus_per_worker=2), two_nodes, use_gpu=False)
    # strict placements count per node
    check_scaling(ClusterConfig(num_workers=2, placement="strict_spread"), two_nodes, use_gpu=False)
    with pytest.raises(ConfigError, match="on distinct nodes"):
        check_scaling(ClusterConfig(num_workers=3, placement="strict_spread"), two_nodes, use_gpu=False)
    check_scaling(ClusterConfig(num_workers=4, placement="strict_pack"), two_nodes, use_gpu=False)
    with pytest.raises(ConfigError, match="on one node"):
        check_scaling(ClusterConfig(num_workers=5, placement="strict_pack"), two_nodes, use_gpu=False)
    # a dead node holds nothing
    dead = [{"alive": False, "resources": {"CPU": 64.0}}, *nodes((1, 0))]
    with pytest.raises(ConfigError, match="1 live node"):
        check_scaling(ClusterConfig(num_workers=2), dead, use_gpu=False)
    # GPUs: one per worker; auto uses them when the cluster has any
    gpu_nodes = nodes((8, 1), (8, 1))
    assert resolve_use_gpu(ClusterConfig(use_gpu="auto"), gpu_nodes) is True
    assert resolve_use_gpu(ClusterConfig(use_gpu="auto"), two_nodes) is False
    check_scaling(ClusterConfig(num_workers=2), gpu_nodes, use_gpu=True)
    with pytest.raises(ConfigError, match=r"\(1 CPU \+ 1 GPU\).*0 GPUs.*use_gpu=false"):
        check_scaling(ClusterConfig(num_workers=2, use_gpu="true"), two_nodes, use_gpu=True)
    with pytest.raises(ConfigError, match="use_gpu must be one of 'auto', 'true', 'false'"):
        load_config(CONFIG, ["cluster.use_gpu=sometimes"])


def test_placement_from_yaml_reaches_ray_train(monkeypatch, tmp_path):
    """cluster.placement -> ScalingConfig(placement_strategy); the check runs before the trainer exists."""
    import ray
    import ray.train.torch
    import ray.util.queue

    from transrec.cluster import launch, scaling

    assert placement_strategy(load_config(CONFIG, ["cluster.placement=spread"]).cluster) == "SPREAD"
    with pytest.raises(ConfigError, match="cluster.placement must be one of"):
        load_config(CONFIG, ["cluster.placement=anywhere"])

    built = {}

    class FakeTrainer:
        def __init__(self, fn, **kwargs):
            built.update(kwargs)

        def fit(self):
            raise SystemExit("stop here")

    monkeypatch.setattr(launch, "connect", lambda cluster: None)
    monkeypatch.setattr(ray.util.queue, "Queue", lambda **kwargs: queue.Queue())  # no Ray to start for a queue
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "ab" * 28))
    monkeypatch.setattr(scaling, "ray_nodes", lambda: nodes((2, 0), (2, 0)))
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "cluster.placement=strict_spread",
                                            "cluster.max_failures=2"])
    with pytest.raises(SystemExit):
        launch.train_on_cluster(cfg)
    scaling_config = built["scaling_config"]
    assert scaling_config.placement_strategy == "STRICT_SPREAD" and scaling_config.num_workers == 2
    assert scaling_config.use_gpu is False and scaling_config.resources_per_worker == {"CPU": 1.0}
    assert built["run_config"].failure_config.max_failures == 2

    built.clear()
    too_many = load_config(CONFIG, [f"output_dir={tmp_path}", "cluster.num_workers=5"])
    with pytest.raises(ConfigError, match="num_workers=5"):
        launch.train_on_cluster(too_many)
    assert built == {}  # no trainer was built


def test_storage_check_names_the_worker_that_cannot_write(tmp_path):
    """Each worker checks the run's storage from its own node when it starts (launch._worker_main)."""
    from transrec.trainer.checkpoint_store import CheckpointStore

    CheckpointStore(tmp_path / "run" / "checkpoints").check_writable("worker rank 1")
    assert (tmp_path / "run" / "checkpoints").is_dir() and not list((tmp_path / "run" / "checkpoints").iterdir())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # root may write anywhere: a file in the path stops even root
    with pytest.raises(ConfigError, match=rf"{blocker}/run/checkpoints is not writable from worker rank 1"):
        CheckpointStore(blocker / "run" / "checkpoints").check_writable("worker rank 1")
