"""Two Ray nodes that are really apart: each in a network namespace of its own with an address of a private
subnet, its own temp dir and 1 CPU (benchmarks/netns.py), started as on any cluster (`ray start --head`, `ray
start --address`). Workers spread over both, checkpoints in object storage (S3, served by moto on the host's
address in the subnet) with every rank's shard, a resume from it. Each rank stages its files in a private temp
directory, so the bucket is the only place where the ranks' files meet: no shared file system is needed for
checkpoints."""
import io
import json

import pytest

from benchmarks.netns import Subnet
from conftest import moto_s3
from transrec.cluster import embedded, jobs
from transrec.launcher.cli import main
from transrec.trainer.audit import read_audit

CONFIG = "tiny"


def job_logs(url: str, job_id: str) -> str:
    out = io.StringIO()
    jobs.logs(url, job_id, out=out)
    return out.getvalue()[-5000:]


@pytest.fixture(scope="module")
def two_nodes():
    with Subnet(2) as net, moto_s3("transrec", host=net.host) as s3:  # the nodes inherit the S3 endpoint
        head, other = net.nodes
        url = net.start_head(head, num_cpus=1)
        net.join(other, head, num_cpus=1)
        yield net, url, s3
    assert not any(embedded.cluster_pids(node.marker) for node in net.nodes)


def test_spread_over_two_nodes_checkpoint_in_s3_holds_every_shard_and_resumes(two_nodes, tmp_path):
    net, url, s3 = two_nodes
    nodes = [n for n in embedded.cluster_nodes(url) if n["alive"]]
    assert len(nodes) == 2 and all(n["resources"]["CPU"] == 1 for n in nodes)
    assert sorted(n["ip"] for n in nodes) == sorted(node.address for node in net.nodes)
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "data"), "--users", "48", "--items", "40"]) == 0
    common = [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", "name=two",
              "cluster.placement=strict_spread", "train.checkpoint_every=2", "train.log_sample_ids=true",
              "checkpoint_storage=s3://transrec/runs"]

    first, _, _ = jobs.submit(CONFIG, [*common, "train.max_steps=2"], url)
    assert jobs.wait(url, first, timeout=500) == "SUCCEEDED", job_logs(url, first)
    # Ray's own account of the workers (the state API): rank 0 and rank 1 ran on different nodes
    from ray.util.state import list_actors

    workers = {a.pid: a.node_id for a in list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")],
                                                        detail=True, limit=100)}
    audits = [tmp_path / "runs" / "two" / "samples" / f"rank{rank}.jsonl" for rank in (0, 1)]
    pids = [read_audit(path)[0]["pid"] for path in audits]
    assert workers[pids[0]] != workers[pids[1]]
    assert {workers[pid] for pid in pids} == {n["node_id"] for n in nodes}
    # the driver's queues (progress, summary) live on its node, the head: on the other, they would die with it
    queues = list_actors(address=url, filters=[("class_name", "=", "_QueueActor")], detail=True, limit=100)
    assert len(queues) == 2 and {q.node_id for q in queues} == {n["node_id"] for n in nodes if n["head"]}

    def stored(key: str) -> bytes:
        return s3.get_object(Bucket="transrec", Key=f"runs/two/checkpoints/{key}")["Body"].read()

    listing = s3.list_objects_v2(Bucket="transrec", Prefix="runs/two/checkpoints/step2/")["Contents"]
    files = {item["Key"].rsplit("/", 1)[1] for item in listing if not item["Key"].endswith("/")}  # (not pyarrow's
    # empty directory markers)
    # every rank's ZeRO optimizer shard and trainer state (RNG, loader position) reached the run's storage
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rank0_state.pt", "rank1_state.pt", "mp_rank_00_model_states.pt", "manifest.json"} <= files, files
    assert set(json.loads(stored("step2/manifest.json"))["files"]) == files - {"manifest.json"}
    assert stored("latest") == b"step2"
    assert not (tmp_path / "runs" / "two" / "checkpoints").exists()  # nothing on the nodes' disks

    second, _, _ = jobs.submit(CONFIG, [*common, "train.max_steps=3"], url, resume=True)
    assert jobs.wait(url, second, timeout=500) == "SUCCEEDED", job_logs(url, second)
    for rank in (0, 1):
        starts = [r for r in read_audit(audits[rank]) if r.get("event") == "start"]
        assert [s["step"] for s in starts] == [0, 2]  # the second job resumed from step 2 ...
    assert stored("latest") == b"step3"  # ... and trained step 3
    # the summary came back through Ray Train (rank 0 may run on another node than the driver)
    assert json.loads((tmp_path / "runs" / "two" / "results.json").read_text())["steps"] == 3

    # export reads the checkpoint from the bucket: a download checked against the manifest, then consolidated
    assert main(["export", "--run", str(tmp_path / "runs" / "two"), "--out", str(tmp_path / "export"),
                 "--tag", "step3"]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["tag"] == "step3"
    assert manifest["checkpoint_bytes"] == sum(f["bytes"] for f in json.loads(stored("step3/manifest.json"))["files"].values())
