"""The watchdog of a cluster that belongs to one process (`embedded.up_for_this_process`):
`python -m transrec.cluster.watchdog STATE_DIR CLUSTER_ID`, started with a pipe from that process on its stdin.
When the process is gone, however it ended (SIGKILL included), the pipe reads end-of-file and the watchdog stops
every process of the cluster (each carries its marker), then removes its state and temp dirs. A child forked by
the process (not exec'd) holds the pipe too: the cluster then lives until the last of them has exited."""
from __future__ import annotations

import shutil
import sys

from transrec.cluster.embedded import down, kill_cluster, read_state


def main() -> None:
    directory, cluster_id = sys.argv[1:3]
    sys.stdin.buffer.read()  # until end-of-file: the owner's end of the pipe closes when the owner exits
    try:
        if read_state(directory) is not None:
            down(directory)
    finally:  # whatever `down` left, or the whole cluster when the owner died while `up` was starting it
        kill_cluster(cluster_id)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
