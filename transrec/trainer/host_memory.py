"""A rank's host memory: bounded against per-step shapes, and measured for the train log."""
from __future__ import annotations

import ctypes
import os
import sys

import psutil
import torch.distributed as dist

from transrec.trainer.distributed import all_reduce_values

ONEDNN_CACHE_CAPACITY = 128
MALLOC_MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_host_memory() -> dict[str, str]:
    """Keeps a rank's host memory from growing with per-step shapes; returns the settings in force.

    The batch's distinct items, hence the shape of every convolution and matmul, change at every step.
    oneDNN (torch's CPU kernels) caches a primitive per shape, 1,024 by default, and glibc's heap fragments
    under the changing sizes: a rank grew from 3.5 to 8.7 GB in 105 steps until the kernel killed it
    (benchmarks/README.md, "Train-step memory"). So: 128 primitives, and blocks of 4 MiB and more served by
    mmap, i.e. returned to the kernel when freed. Settings already in the environment win.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # (glibc applied it when the process started)
    if threshold is None and sys.platform == "linux":
        try:
            if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1:
                threshold = str(MALLOC_MMAP_THRESHOLD)
        except OSError:  # not glibc
            pass
    return {"onednn_primitive_cache": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
            "malloc_mmap_threshold": threshold or "glibc default"}


def max_rank_rss_gb() -> float:
    """The largest resident memory of any rank's process now, in GB (on a GPU machine too: host memory)."""
    return all_reduce_values({"rss": psutil.Process().memory_info().rss / 1e9}, dist.ReduceOp.MAX)["rss"]
