"""Time `prepare_synthetic` at MicroLens' shape for given numbers of interactions; report disk use.

    python benchmarks/data_generate.py --interactions 1e6 1e7 1e8 --workers 2 [--keep]

Items scale with interactions as in MicroLens (~1,000 interactions per item, at least 1,000 items), half
of them image items (96 px synthetic posters). Data sets go to data/bench-gen/ and are deleted afterwards
unless --keep. Prints one JSON line per size, then a line that extrapolates the largest size to 1B
interactions (linear: items, users and shards all grow in proportion).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from transrec.writers.synthetic import MICROLENS, UserModel, make_catalogue, make_world, prepare_synthetic

INTERACTIONS_PER_ITEM = 1000
BILLION = 1_000_000_000


def mean_length() -> float:
    world = make_world(16)
    catalogue = make_catalogue(world, 1000, np.random.default_rng(0))
    return UserModel(world, catalogue.topic, catalogue.weight, 0, **MICROLENS).mean_length()


def disk_use(root: Path) -> dict[str, int]:
    """Bytes per top-level part of a dataset directory."""
    return {part.name: sum(f.stat().st_size for f in [part, *part.rglob("*")] if f.is_file())
            for part in sorted(root.iterdir())}


def run(interactions: int, workers: int, out: Path, seed: int) -> dict:
    users, items = round(interactions / mean_length()), max(1000, interactions // INTERACTIONS_PER_ITEM)
    start = time.perf_counter()
    manifest = prepare_synthetic(out, users=users, items=items, seed=seed, workers=workers, overwrite=True,
                                 **MICROLENS)
    seconds = time.perf_counter() - start
    disk = disk_use(out)
    maxrss = {who: resource.getrusage(which).ru_maxrss / 2**20 for who, which in
              (("main", resource.RUSAGE_SELF), ("largest_worker", resource.RUSAGE_CHILDREN))}
    return {"interactions": manifest["num_interactions"], "users": users, "items": items, "workers": workers,
            "seconds": round(seconds, 1), "interactions_per_s": round(manifest["num_interactions"] / seconds),
            "disk_gib": round(sum(disk.values()) / 2**30, 3), "disk_bytes": disk,
            "bytes_per_interaction": round(sum(disk.values()) / manifest["num_interactions"], 1),
            "peak_rss_gib_so_far": {k: round(v, 2) for k, v in maxrss.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("data/bench-gen"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the data sets (for benchmarks/data_loader.py)")
    args = parser.parse_args()
    results = []
    for interactions in map(int, args.interactions):
        out = args.root / f"syn-{interactions:.0e}".replace("+", "")
        results.append(run(interactions, args.workers, out, args.seed))
        print(json.dumps(results[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(out)
    largest = results[-1]
    scale = BILLION / largest["interactions"]
    print(json.dumps({"extrapolated_to": BILLION, "from": largest["interactions"], "workers": args.workers,
                      "hours": round(largest["seconds"] * scale / 3600, 2),
                      "disk_gib": round(largest["disk_gib"] * scale, 1)}))


if __name__ == "__main__":
    main()
