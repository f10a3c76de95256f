"""Ray nodes that are really apart on one machine (root only; tests and benchmarks).

Each node lives in a network namespace of its own (`ip netns`), joined to a bridge of the host by a veth pair,
with an address of a private /24 (10.231.X.1, .2, ...); the host is .254 on the bridge. Each node has its own
temp dir and /dev/shm, and its processes carry a marker of their own (`TRANSREC_CLUSTER_ID`), so one node can be
stopped, or cut off (`ip link set ... down` on its end of the veth pair), while the others run on. Ray is started
as on any cluster, `ray start --head` on the first node and `ray start --address` on the others, with no special
setting: the nodes talk over a real interface, with real addresses. Nothing is shared between them but what the caller
shares (a checkpoint store the nodes reach at the host's address, say).

    with Subnet(2) as net:
        head = net.start_head(net.nodes[0], num_cpus=1)
        net.join(net.nodes[1], head, num_cpus=1)
        ... transrec submit --address http://10.231.X.1:8265 ...
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transrec.cluster.embedded import MARKER_ENV, kill_cluster, ray_executable

GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each namespace has its ports to itself


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Node:
    namespace: str
    address: str
    host_link: str  # the host's end of its veth pair: down = the node is cut off
    link: str  # its own end, in its namespace
    temp_dir: Path
    marker: str  # in the environment of each of its processes

    def popen(self, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        """`argv` in the node's namespace, with a /dev/shm of its own (as on a machine of its own: Ray's object
        store and streaming's shared memory are per machine). `ip netns exec` gives the command a mount
        namespace of its own, whose mounts do not reach the host."""
        own_shm = 'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec "$@"'
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, "sh", "-c", own_shm, "sh", *argv], env=env,
                                **kwargs)

    def set_link(self, up: bool) -> None:
        _ip("link", "set", self.host_link, "up" if up else "down")

    def stop(self) -> list[int]:
        """Kills every Ray process of this node (and only of this node)."""
        return kill_cluster(self.marker)


class Subnet:
    """`size` namespaces on a bridge; leaving the block kills their processes and removes them."""

    def __init__(self, size: int = 2):
        tag = secrets.token_hex(3)  # names of at most 15 bytes, unique per instance
        self.prefix = f"10.231.{random.Random(tag).randrange(1, 250)}"
        self.host = f"{self.prefix}.254"
        self.bridge = f"trbr{tag}"
        self.nodes = [Node(f"trns{tag}{i}", f"{self.prefix}.{i + 1}", f"trh{tag}{i}", f"trv{tag}{i}",
                           Path(tempfile.mkdtemp(prefix=f"trn{i}-", dir="/tmp")), f"netns-{tag}-{i}")
                      for i in range(size)]

    def __enter__(self) -> "Subnet":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for node in self.nodes:
                _ip("netns", "add", node.namespace)
                _ip("link", "add", node.host_link, "type", "veth", "peer", "name", node.link)
                _ip("link", "set", node.link, "netns", node.namespace)
                _ip("link", "set", node.host_link, "master", self.bridge, "up")
                _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.link)
                _ip("-n", node.namespace, "link", "set", node.link, "up")
                _ip("-n", node.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
            subprocess.run(["ip", "link", "del", node.host_link], capture_output=True)
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def env(self, node: Node) -> dict[str, str]:
        """A node's environment: this one's (S3 endpoint and credentials included), its temp dir and marker;
        no token auth (a private subnet of this host), and Ray's Linux default for multi-node clusters (not the
        embedded cluster's loopback-only setting, which transrec's CLI sets for itself). GLOO_SOCKET_IFNAME: the
        namespaces share the host's name, which resolves to loopback, and gloo takes the address of the host name
        (README: a node whose host name resolves to loopback needs it)."""
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        return {**inherited, "GLOO_SOCKET_IFNAME": node.link, "TMPDIR": str(node.temp_dir), MARKER_ENV: node.marker,
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _ray_start(self, node: Node, args: list[str], num_cpus: int) -> None:
        argv = [ray_executable(), "start", f"--node-ip-address={node.address}", f"--temp-dir={node.temp_dir}",
                f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", *args]
        started = node.popen(argv, self.env(node), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        out, _ = started.communicate(timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start in {node.namespace} failed: {out[-2000:]}")

    def start_head(self, node: Node, num_cpus: int = 1) -> str:
        """Ray's head on `node`; returns its dashboard (Jobs API) URL."""
        self._ray_start(node, ["--head", f"--port={GCS_PORT}", f"--dashboard-host={node.address}",
                               f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true"], num_cpus)
        return f"http://{node.address}:{DASHBOARD_PORT}"

    def join(self, node: Node, head: Node, num_cpus: int = 1) -> None:
        self._ray_start(node, [f"--address={head.address}:{GCS_PORT}"], num_cpus)
