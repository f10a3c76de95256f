"""A node leaving a two-node run, two ways: stopped (every Ray process of it killed), or cut off (its link down).

    python benchmarks/nodes.py [--away 30] [--out runs/nodes.json]     (root: network namespaces)

Two Ray nodes, each in a network namespace of its own (benchmarks/netns.py), 1 CPU each; checkpoints in S3
(moto, on the host's address in the subnet); a tiny-config run of 2 workers with `strict_spread` placement, so
one rank runs on each node, `cluster.max_failures` 20 and `cluster.collective_timeout_s` 30. Once the run is
6 steps in, the second node goes (`stop` or `cut`) for `--away` seconds, then comes back: the cut link is set
up again; once Ray has declared the node dead (at once when stopped, after its missed health checks when cut),
it is started again (`ray start --address`, as an operator or an autoscaler would). For each case: how the job
ended, what the driver's console said (its `transrec:` lines), the seconds from the node's return to the next
trained step, and from the sample audit whether every sample of every epoch was trained exactly once.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.netns import Subnet  # noqa: E402
from conftest import moto_s3  # noqa: E402
from transrec.cluster import embedded, jobs  # noqa: E402
from transrec.trainer.audit import attempts, every_sample_once, samples_per_epoch  # noqa: E402
from transrec.writers.synthetic import prepare_synthetic  # noqa: E402

USERS, EPOCHS = 96, 6


def rank0_batches(run: Path) -> int:
    """Batches rank 0 has trained so far, over its processes."""
    path = run / "samples" / "rank0.jsonl"
    return sum(len(attempt["batches"]) for attempt in (attempts(path) if path.exists() else []))


def wait_until(ready, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(poll)
    return None


def case(kind: str, net: Subnet, url: str, data: Path, workdir: Path, away: float) -> dict:
    head, other = net.nodes
    run = workdir / "runs" / kind
    sets = [f"name={kind}", f"data.path={data}", f"output_dir={workdir / 'runs'}", f"train.epochs={EPOCHS}",
            "train.checkpoint_every=2", "train.log_sample_ids=true", "cluster.placement=strict_spread",
            "cluster.max_failures=20", "cluster.collective_timeout_s=30", "checkpoint_storage=s3://transrec/runs"]
    job, _, _ = jobs.submit("tiny", sets, url)
    assert wait_until(lambda: rank0_batches(run) >= 6, 300), f"{kind}: the run did not start training"
    (current,) = [n["node_id"] for n in embedded.cluster_nodes(url) if n["ip"] == other.address and n["alive"]]
    audit = run / "samples" / "rank0.jsonl"
    groups = len(attempts(audit))
    gone = time.monotonic()
    if kind == "stop":
        other.stop()
    else:
        other.set_link(False)
    time.sleep(away)
    if kind == "cut":
        other.set_link(True)

    def resumed() -> bool:
        return len(attempts(audit)) > groups and bool(attempts(audit)[-1]["batches"])

    def declared_dead() -> bool:
        return not any(n["alive"] for n in embedded.cluster_nodes(url) if n["node_id"] == current)

    # back: the run goes on by itself, or Ray has declared the node dead (at once when stopped; after its
    # missed health checks when cut), and it is started again
    restarted = wait_until(lambda: "dead" if declared_dead() else resumed(), 120) == "dead"
    if restarted:
        other.stop()
        net.join(other, head)
    back = time.monotonic()
    first_step_after = round(time.monotonic() - back, 1) if wait_until(resumed, 600) else None
    status = jobs.wait(url, job, timeout=900)
    out = io.StringIO()
    jobs.logs(url, job, out=out)
    said = [line.strip()[:240] for line in out.getvalue().splitlines()
            if line.startswith("transrec:")][:8]
    return {"case": kind, "away_s": away, "node_declared_dead": restarted, "job_status": status,
            "worker_group_starts": len(attempts(audit)),
            "return_to_next_step_s": first_step_after, "gone_to_end_s": round(time.monotonic() - gone, 1),
            "every_sample_once_per_epoch": every_sample_once(samples_per_epoch(run), USERS, EPOCHS),
            "job_log_lines": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--away", type=float, default=30.0, help="seconds the node is gone")
    parser.add_argument("--cases", default="stop,cut")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "nodes.json")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    workdir = Path(tempfile.mkdtemp(prefix="transrec-nodes-"))
    prepare_synthetic(workdir / "data", users=USERS, items=40, seed=0)
    results = []
    with Subnet(2) as net, moto_s3("transrec", host=net.host):  # (the nodes inherit the S3 endpoint)
        head, other = net.nodes
        url = net.start_head(head, num_cpus=1)
        net.join(other, head, num_cpus=1)
        for kind in args.cases.split(","):
            results.append(case(kind, net, url, workdir / "data", workdir, args.away))
            print(json.dumps(results[-1], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": results},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
