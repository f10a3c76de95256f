"""The embedded cluster: a local Ray head started by `transrec cluster up`, on loopback only.

`up` runs `ray start --head` with every listener on 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes
the node address 127.0.0.1, `--dashboard-host=127.0.0.1` keeps the dashboard and Jobs API there), every
port chosen free (several clusters may share a machine), its own temp dir, and token auth disabled
(`RAY_AUTH_MODE=disabled`): nothing off this host can reach it, so every local client (this CLI,
`ray job ...`, the job drivers and workers, which inherit the head's environment) talks to it without a
token. A real cluster keeps Ray's token auth: the clients then follow `RAY_AUTH_MODE` / `RAY_AUTH_TOKEN_PATH`.

Its state (addresses, temp dir, id) is `STATE_DIR/cluster.json`; STATE_DIR is `--state-dir`, else
`$TRANSREC_HOME`, else `~/.transrec`. Every process of the cluster carries `TRANSREC_CLUSTER_ID=<id>` in its
environment (the raylet passes its environment on to workers and job drivers), which is how `down` finds
exactly this cluster's processes: `ray stop` would stop every Ray cluster on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transrec.network import LOOPBACK, free_port

STATE_ENV = "TRANSREC_HOME"
STATE_FILE = "cluster.json"
MARKER_ENV = "TRANSREC_CLUSTER_ID"


class ClusterError(RuntimeError):
    """A cluster that cannot be started, reached or stopped; the message is meant for the user."""


@dataclass
class ClusterState:
    cluster_id: str
    gcs_address: str  # what `ray.init(address=...)` and `ray start --address` take
    dashboard_url: str  # what the Jobs API (`transrec submit`, `ray job ...`) takes
    temp_dir: str
    num_cpus: int
    num_gpus: int
    started_at: float
    ports: dict = field(default_factory=dict)
    auth_mode: str = "disabled"
    owns_temp_dir: bool = True  # created by `up` (removed by `down`), not given with --temp-dir


def state_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get(STATE_ENV) or Path.home() / ".transrec").expanduser()


def read_state(directory: str | Path | None = None) -> ClusterState | None:
    path = state_dir(directory) / STATE_FILE
    if not path.exists():
        return None
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ClusterError(f"{path} is not a transrec cluster state file ({err}); remove it") from None


def _write_state(directory: Path, state: ClusterState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(directory / STATE_FILE)


def _free_ports(names: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(ports) < len(names):  # distinct, though each is only free "now"
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


def cluster_env(cluster_id: str, ports: dict[str, int], temp_dir: str, base: dict | None = None) -> dict[str, str]:
    """Environment of `ray start`, hence of every process of the cluster (drivers and workers included)."""
    env = dict(os.environ if base is None else base)
    if "autoscaler_metrics" in ports:  # fixed by default (44217, 44227): two clusters would collide
        env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
        env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1, listeners on loopback (else Ray
        # takes the host's address and listens on every interface)
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        MARKER_ENV: cluster_id,
        # the node's own short temp dir: Ray's processes open unix sockets under TMPDIR (multiprocessing's
        # forkserver among them), and a socket path may not exceed 107 bytes, which a caller's TMPDIR can
        "TMPDIR": temp_dir,
        # `python` in a job's entrypoint is this interpreter; one ninja for DeepSpeed's JIT cache
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    # Ray's own helpers inside the cluster that look for "the" local cluster (Ray Train's placement-group
    # cleaner calls the state API with no address) find several when clusters share a machine: name ours
    env["RAY_ADDRESS"] = f"{LOOPBACK}:{ports['gcs']}"
    return env


def ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def start_command(ports: dict[str, int], temp_dir: str, num_cpus: int, num_gpus: int) -> list[str]:
    """`ray start --head`, loopback only."""
    return [ray_executable(), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--disable-usage-stats",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--port={ports['gcs']}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}"]


HEAD_PORTS = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http", "agent_grpc",
              "metrics", "runtime_env_agent", "autoscaler_metrics", "dashboard_metrics")


def dashboard_ready(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_for_jobs_api(url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if dashboard_ready(url):
            try:  # the job module answers once the dashboard's subprocess modules are up
                with urllib.request.urlopen(f"{url}/api/jobs/", timeout=5) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.5)
    return False


def up(directory: str | Path | None = None, num_cpus: int | None = None, num_gpus: int = 0,
       temp_dir: str | None = None, timeout: float = 120.0, cluster_id: str | None = None) -> ClusterState:
    """Starts the embedded head and records it; refuses when this state dir's cluster is already running."""
    directory = state_dir(directory)
    existing = read_state(directory)
    if existing is not None:
        if cluster_pids(existing.cluster_id):
            raise ClusterError(f"a cluster is already running at {existing.dashboard_url} "
                               f"(state {directory / STATE_FILE}); `transrec cluster down` first")
        (directory / STATE_FILE).unlink()  # stale: its processes are gone
    cluster_id = cluster_id or secrets.token_hex(8)
    # short: Ray's unix sockets live under it and a socket path may not exceed 107 bytes
    owns_temp_dir = not temp_dir
    temp_dir = temp_dir or tempfile.mkdtemp(prefix=f"trr-{cluster_id[:6]}-", dir="/tmp")
    ports = _free_ports(HEAD_PORTS)
    num_cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    cmd = start_command(ports, temp_dir, num_cpus, num_gpus)
    state = ClusterState(cluster_id=cluster_id, gcs_address=f"{LOOPBACK}:{ports['gcs']}",
                         dashboard_url=f"http://{LOOPBACK}:{ports['dashboard']}", temp_dir=temp_dir,
                         num_cpus=num_cpus, num_gpus=num_gpus, started_at=time.time(), ports=ports,
                         owns_temp_dir=owns_temp_dir)
    try:
        # its own session: the cluster outlives this terminal's signals (Ctrl-C, hangup)
        done = subprocess.run(cmd, env=cluster_env(cluster_id, ports, temp_dir), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        kill_cluster(cluster_id)
        raise ClusterError(f"`ray start --head` did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        kill_cluster(cluster_id)
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ClusterError(f"`ray start --head` failed (exit {done.returncode}): " + " | ".join(tail))
    if not _wait_for_jobs_api(state.dashboard_url, time.monotonic() + timeout):
        kill_cluster(cluster_id)
        raise ClusterError(f"the dashboard (Jobs API) did not come up at {state.dashboard_url}")
    _write_state(directory, state)
    return state


_WATCHDOGS: list[subprocess.Popen] = []  # held: the pipe to each watchdog stays open while this process lives


def up_for_this_process(num_cpus: int, timeout: float = 120.0) -> ClusterState:
    """An embedded cluster of this process's own (`transrec pretrain` with no cluster to join): started as `up`
    starts one, recorded in a state dir of its own (no other command joins it), and stopped by a watchdog
    (watchdog.py) once this process has gone, however it ended; started before the cluster, so a kill while
    the cluster starts leaves nothing behind either."""
    directory, cluster_id = tempfile.mkdtemp(prefix="transrec-cluster-"), secrets.token_hex(8)
    _WATCHDOGS.append(subprocess.Popen([sys.executable, "-m", "transrec.cluster.watchdog", directory, cluster_id],
                                       stdin=subprocess.PIPE, start_new_session=True))
    return up(directory, num_cpus=num_cpus, timeout=timeout, cluster_id=cluster_id)


def cluster_pids(cluster_id: str) -> list[int]:
    """Processes whose environment carries this cluster's marker (children inherit it), and their descendants:
    the raylet starts its agents with an environment of their own, and a SIGKILLed raylet would orphan them."""
    import psutil

    marker = f"{MARKER_ENV}={cluster_id}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.add(int(entry.name))
            try:
                pids.update(child.pid for child in psutil.Process(int(entry.name)).children(recursive=True))
            except psutil.NoSuchProcess:
                continue
    pids.discard(os.getpid())
    return sorted(pids)


def kill_cluster(cluster_id: str, grace: float = 2.0) -> list[int]:
    """SIGTERM to every process of the cluster, SIGKILL to those left after `grace` seconds. Short: Ray's own
    daemons (gcs_server, raylet, its agents) were still up 10 s after a SIGTERM to all (Ray 2.60), and nothing
    of ours needs them to stop gently (checkpoints and shards are published atomically)."""
    pids = cluster_pids(cluster_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in pids):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def down(directory: str | Path | None = None, keep_temp: bool = False) -> dict:
    """Stops every process of the recorded cluster and forgets it."""
    directory = state_dir(directory)
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no embedded cluster recorded in {directory / STATE_FILE}")
    pids = kill_cluster(state.cluster_id)
    left = [pid for pid in pids if _alive(pid)]
    if left:
        raise ClusterError(f"processes {left} of cluster {state.cluster_id} did not stop")
    (directory / STATE_FILE).unlink(missing_ok=True)
    if not keep_temp:
        if state.owns_temp_dir:
            shutil.rmtree(state.temp_dir, ignore_errors=True)
    return {"stopped": len(pids), "dashboard_url": state.dashboard_url}


def listeners(pids: list[int]) -> list[dict]:
    """The TCP sockets these processes listen on: address, port, pid."""
    import psutil

    wanted = set(pids)
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in wanted:
            found.append({"address": conn.laddr.ip, "port": conn.laddr.port, "pid": conn.pid})
    return sorted(found, key=lambda x: (x["port"], x["pid"]))


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "localhost") or address.startswith("127.") \
        or address.startswith("::ffff:127.")


def cluster_nodes(url: str) -> list[dict]:
    """The cluster's nodes through the dashboard's state API: [{"alive", "resources", "ip", "node_id"}]."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=url, detail=True, timeout=30, raise_on_missing_output=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot list the nodes of {url}: {first}") from None
    return [{"alive": node.state == "ALIVE", "resources": dict(node.resources_total or {}), "ip": node.node_ip,
             "node_id": node.node_id, "head": bool(node.is_head_node)} for node in nodes]


def status(directory: str | Path | None = None) -> dict:
    """The recorded cluster: addresses, whether it answers, its nodes' resources, its listeners."""
    directory = state_dir(directory)
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no embedded cluster recorded in {directory / STATE_FILE}")
    pids = cluster_pids(state.cluster_id)
    info = {**asdict(state), "state_file": str(directory / STATE_FILE), "processes": len(pids),
            "running": bool(pids) and dashboard_ready(state.dashboard_url)}
    if info["running"]:
        info["nodes"] = cluster_nodes(state.dashboard_url)
        socks = listeners(pids)
        info["listeners"] = len(socks)
        info["non_loopback_listeners"] = [s for s in socks if not is_loopback(s["address"])]
    return info
