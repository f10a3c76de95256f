"""The scaling config (workers, CPUs/GPUs per worker, placement) checked against a cluster's nodes before any
training starts."""
from __future__ import annotations

from transrec.config import ClusterConfig, ConfigError

def placement_strategy(cluster: ClusterConfig) -> str:
    """Ray's placement-group strategy for `cluster.placement`: pack (fewest nodes, best effort), spread (one
    worker per node where possible), or their strict forms (fail rather than bend)."""
    return cluster.placement.upper()


def worker_resources(cluster: ClusterConfig, use_gpu: bool) -> dict[str, float]:
    return {"CPU": float(cluster.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def resolve_use_gpu(cluster: ClusterConfig, nodes: list[dict]) -> bool:
    """`cluster.use_gpu`: true, false, or auto = use GPUs when the cluster has any (NCCL, DALI's GPU decoder)."""
    if cluster.use_gpu == "auto":
        return any(node["resources"].get("GPU", 0) > 0 for node in nodes if node["alive"])
    return cluster.use_gpu == "true"


def check_scaling(cluster: ClusterConfig, nodes: list[dict], use_gpu: bool) -> dict:
    """Raises a ConfigError that says what is missing when the cluster's live nodes cannot hold the workers
    under the placement; returns a summary. `nodes`: [{"alive": bool, "resources": {"CPU": .., "GPU": ..}}]."""
    need = worker_resources(cluster, use_gpu)
    strategy = placement_strategy(cluster)
    alive = [node["resources"] for node in nodes if node["alive"]]
    fits = [int(min(res.get(key, 0.0) // amount for key, amount in need.items())) for res in alive]
    if strategy == "STRICT_SPREAD":
        possible = sum(1 for n in fits if n >= 1)
    elif strategy == "STRICT_PACK":
        possible = max(fits, default=0)
    else:
        possible = sum(fits)
    totals = {key: sum(res.get(key, 0.0) for res in alive) for key in ("CPU", "GPU")}
    summary = {"nodes": len(alive), "cpus": totals["CPU"], "gpus": totals["GPU"], "max_workers": possible,
               "placement": strategy, "use_gpu": use_gpu}
    if cluster.num_workers > possible:
        per_worker = f"{cluster.cpus_per_worker} CPU" + (" + 1 GPU" if use_gpu else "")
        where = {"STRICT_SPREAD": " on distinct nodes", "STRICT_PACK": " on one node"}.get(strategy, "")
        hint = ("set cluster.use_gpu=false, or add GPU nodes" if use_gpu and totals["GPU"] < cluster.num_workers
                else "lower cluster.num_workers or cluster.cpus_per_worker, or add nodes")
        raise ConfigError(
            f"cluster.num_workers={cluster.num_workers} workers x ({per_worker}) cannot be placed: the cluster has "
            f"{totals['CPU']:g} CPUs and {totals['GPU']:g} GPUs on {len(alive)} live node(s), room for "
            f"{possible} such worker(s){where} (placement {cluster.placement}); {hint}")
    return summary


def ray_nodes() -> list[dict]:
    """The nodes of the cluster this process is connected to (ray.init done), in check_scaling's shape."""
    import ray

    return [{"alive": bool(node["Alive"]), "resources": dict(node["Resources"])} for node in ray.nodes()]
