"""The train loop without Ray: one process per rank, launched by torchrun (or anything that sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT). Tests use it to skip Ray's start-up.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 \\
        -m transrec.trainer.torchrun_entry --config tiny --set name=x [--resume]

or, from Python, `launch(2, "tiny", ["name=x"])`, which picks a free loopback port.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from transrec.network import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from transrec.config import load_config
    from transrec.trainer import run_dir
    from transrec.trainer.loop import train

    parser = argparse.ArgumentParser(prog="python -m transrec.trainer.torchrun_entry", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # rank 0 creates the run directory; the others block in init_distributed until it joins them
    cfg = run_dir.prepare(cfg, args.resume) if os.environ.get("RANK", "0") == "0" else run_dir.resolve(cfg)
    train(cfg)
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # ZeRO-3 sometimes aborts in interpreter teardown after all work is done (DeepSpeed 0.19.8: ~1 run in 6)


def launch(nproc: int, config: str, overrides: list[str], resume: bool = False,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the train loop on `nproc` local ranks under torchrun; output captured, exit status not checked."""
    args = ["--config", config, *(arg for item in overrides for arg in ("--set", item)), *(["--resume"] * resume)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", __name__, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    main()
