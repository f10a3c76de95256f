"""Two Ray nodes on this machine (a head and a node joined with `ray start --address`, each with its own temp
dir, ports and 1 CPU): workers spread over both, a checkpoint with every rank's shard, a resume from it."""
from pathlib import Path

import pytest

from transrec.cluster import embedded, jobs
from transrec.launcher.cli import main
from transrec.trainer.audit import read_audit

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    state = embedded.up(state_dir, num_cpus=1)
    try:
        assert main(["cluster", "add-node", "--state-dir", str(state_dir), "--num-cpus", "1"]) == 0
        yield state
    finally:
        embedded.down(state_dir)
        assert embedded.cluster_pids(state.cluster_id) == []


def test_spread_over_two_nodes_checkpoint_holds_every_shard_and_resumes(two_nodes, tmp_path):
    url = two_nodes.dashboard_url
    nodes = [n for n in jobs.cluster_nodes(url) if n["alive"]]
    assert len(nodes) == 2 and all(n["resources"]["CPU"] == 1 for n in nodes)
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "data"), "--users", "48", "--items", "40"]) == 0
    common = [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", "name=two",
              "cluster.placement=strict_spread", "train.checkpoint_every=2", "train.log_sample_ids=true"]

    first, _, _ = jobs.submit(CONFIG, [*common, "train.max_steps=2"], url)
    assert jobs.wait(url, first, timeout=500) == "SUCCEEDED"
    # Ray's own account of the workers (the state API): rank 0 and rank 1 ran on different nodes
    from ray.util.state import list_actors

    workers = {a.pid: a.node_id for a in list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")],
                                                        detail=True, limit=100)}
    audits = [tmp_path / "runs" / "two" / "samples" / f"rank{rank}.jsonl" for rank in (0, 1)]
    pids = [read_audit(path)[0]["pid"] for path in audits]
    assert workers[pids[0]] != workers[pids[1]]
    assert {workers[pid] for pid in pids} == {n["node_id"] for n in nodes}

    step2 = tmp_path / "runs" / "two" / "checkpoints" / "step2"
    files = {p.name for p in step2.iterdir()}
    # every rank's ZeRO optimizer shard and trainer state (RNG, loader position) reached the run's storage
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rank0_state.pt", "rank1_state.pt"} <= files, files
    assert (step2.parent / "latest").read_text() == "step2"

    second, _, _ = jobs.submit(CONFIG, [*common, "train.max_steps=3"], url, resume=True)
    assert jobs.wait(url, second, timeout=500) == "SUCCEEDED"
    for rank in (0, 1):
        starts = [r for r in read_audit(audits[rank]) if r.get("event") == "start"]
        assert [s["step"] for s in starts] == [0, 2]  # the second job resumed from step 2 ...
    assert (step2.parent / "latest").read_text() == "step3"  # ... and trained step 3
