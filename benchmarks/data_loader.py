"""The data path's numbers: loader throughput vs the trainer's demand, peak RSS vs data set size, DALI vs PIL,
and how much the batch-level item dedup saves.

    python benchmarks/data_loader.py throughput --config ml100k-mom --run runs/ml-100k-mom
    python benchmarks/data_loader.py rss data/bench-gen/syn-1e06 data/bench-gen/syn-1e07 [--max-sequences N]
    python benchmarks/data_loader.py decode --data data/ml-100k-mom
    python benchmarks/data_loader.py dedup --config ml100k-mom data/ml-100k-mom data/bench-gen/syn-1e06

Each prints JSON lines. Loader numbers are the loader alone (no model beside it), one rank, world size 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from transrec.config import load_config
from transrec.batch import IMAGE
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import TrainLoader
from transrec.writers.posters import render_poster


def make_loader(cfg, data: str, workers: int, decoder, policy: str = "skip") -> TrainLoader:
    cfg.data.loader_workers, cfg.data.on_bad_record = workers, policy
    return TrainLoader(cfg.data, data, batch_size=cfg.train.batch_size, max_seq_len=cfg.model.max_seq_len,
                       num_negatives=cfg.data.num_negatives, seed=cfg.train.seed, rank=0, world_size=1,
                       decoder=decoder, mode=cfg.model.item_encoder)


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def trainer_demand(run: Path) -> dict:
    """Mean sequences/s and items encoded/s over a run's train records (all ranks together), per rank."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    world = load_config(run / "config.yaml").cluster.num_workers
    return {"run": str(run), "records": len(train), "ranks": world,
            "sequences_per_s_per_rank": float(np.mean([r["sequences_per_s"] for r in train])) / world,
            "items_encoded_per_s_per_rank": float(np.mean([r["items_encoded_per_s"] for r in train])) / world}


def throughput(args) -> None:
    cfg = load_config(args.config)
    data = args.data or cfg.data.path
    demand = trainer_demand(Path(args.run)) if args.run else None
    print_json({"trainer_demand": demand})
    for workers in args.workers:
        loader = make_loader(cfg, data, workers, ImageDecoder(cfg.model.image.image_size, args.backend))
        image_share = float((loader.store.modality == IMAGE).mean())
        sequences = images = items = 0
        batches = iter(loader)
        for _ in range(args.warmup):
            next(batches)
        start = time.perf_counter()
        for _, batch in zip(range(args.batches), batches):
            sequences += len(batch.users)
            images += len(batch.items.image_rows)
            items += len(batch.items.ids)
        seconds = time.perf_counter() - start
        batches.close()
        loader.close()
        record = {"data": data, "loader_workers": workers, "decoder": args.backend, "batch_size": cfg.train.batch_size,
                  "image_size": cfg.model.image.image_size, "batches": args.batches, "sequences_per_s": sequences / seconds,
                  "images_per_s": images / seconds, "distinct_items_per_s": items / seconds,
                  "sequences_per_s_per_worker": sequences / seconds / max(workers, 1),
                  "images_per_s_per_worker": images / seconds / max(workers, 1), "image_item_share": image_share}
        if demand:
            record["x_trainer_demand"] = record["sequences_per_s"] / demand["sequences_per_s_per_rank"]
        print_json(record)
        gc.collect()


def read_epoch(args) -> None:
    """(In a child process) one epoch of `args.data` (or its first `max_sequences`), no image decoding; prints
    peak RSS and timings."""
    cfg = load_config(args.config)
    start = time.perf_counter()
    loader = make_loader(cfg, args.data, workers=1, decoder=None, policy=args.policy)
    opened = time.perf_counter() - start
    sequences = 0
    memory = None
    for batch in loader:
        sequences += len(batch.users)
        if args.max_sequences and sequences >= args.max_sequences:
            memory = memory_now()  # while the DataLoader workers live: they exit when the loop is left
            break
    seconds = time.perf_counter() - start - opened
    whole_epoch = loader.epoch_finished
    loader.close()
    manifest = json.loads((Path(args.data) / "manifest.json").read_text())
    print_json({"data": args.data, "interactions": manifest["num_interactions"], "policy": args.policy,
                "open_s": round(opened, 2), "read_s": round(seconds, 1), "sequences": sequences,
                "whole_epoch": whole_epoch,
                "sequences_per_s": round(sequences / seconds),
                "peak_rss_mib": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "loader_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024},
                "memory_mib_at_stop": memory})


def memory_now() -> dict:
    workers = [pid for pid in child_pids() if "pt_data_worker" in Path(f"/proc/{pid}/comm").read_text()]
    return {"main": memory_mib(os.getpid()), "loader_workers": [memory_mib(pid) for pid in workers]}


def child_pids() -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if ppid == os.getpid():
            children.append(int(stat.parent.name))
    return children


def memory_mib(pid: int) -> dict[str, float]:
    """A process's peak and current resident memory, the current split into anonymous (heap: what grows if
    data is held), file-backed (mapped files: the item store's and shards' pages, reclaimable page cache) and
    shared memory (streaming's)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def rss(args) -> None:
    for data in args.data:
        for policy in args.policies:
            command = [sys.executable, __file__, "read-epoch", data, "--config", args.config, "--policy", policy,
                       "--max-sequences", str(args.max_sequences)]
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


def decode(args) -> None:
    store = ItemStore(args.data)
    posters = [store.jpeg(i) for i in np.flatnonzero(store.modality == IMAGE)[:args.images]]
    large = [np.frombuffer(render_poster(f"poster {i}", [(200, 40, 40), (30, 30, 160)], "circles", seed=i, size=448),
                           np.uint8) for i in range(args.images)]
    for name, jpegs, size in (("ml-100k posters 96px", posters, args.size), ("448px posters", large, 224)):
        for backend in ("dali", "pil"):
            decoder = ImageDecoder(size, backend, max_batch=args.batch, num_threads=args.threads)
            decoder.decode(jpegs[:args.batch])  # warm-up (DALI builds its pipeline)
            start = time.perf_counter()
            for first in range(0, len(jpegs), args.batch):
                decoder.decode(jpegs[first:first + args.batch])
            seconds = time.perf_counter() - start
            print_json({"jpegs": name, "mean_bytes": int(np.mean([len(j) for j in jpegs])), "out": size,
                        "backend": backend, "threads": args.threads if backend == "dali" else 1,
                        "images_per_s": round(len(jpegs) / seconds)})


def dedup(args) -> None:
    cfg = load_config(args.config)
    cfg.train.batch_size = args.batch_size or cfg.train.batch_size
    for data in args.data:
        loader = make_loader(cfg, data, workers=0, decoder=None)
        batches = slots = distinct = image_slots = image_distinct = 0
        modality = loader.store.modality
        for batches, batch in zip(range(1, args.batches + 1), loader):
            ids = batch.items.ids.numpy()
            positions = batch.history_mask.numpy()
            rows = np.concatenate([batch.history.numpy()[positions], batch.targets.numpy()[positions],
                                   batch.negatives.numpy()[positions].ravel()])
            slots += len(rows)
            distinct += len(ids)
            image_slots += int((modality[ids[rows]] == IMAGE).sum())
            image_distinct += len(batch.items.image_rows)
        loader.close()
        print_json({"data": data, "batch_size": cfg.train.batch_size, "max_seq_len": cfg.model.max_seq_len,
                    "negatives": cfg.data.num_negatives, "batches": batches,
                    "item_slots_per_batch": slots / batches, "distinct_items_per_batch": distinct / batches,
                    "slots_per_distinct_item": slots / distinct, "image_slots_per_batch": image_slots / batches,
                    "distinct_images_per_batch": image_distinct / batches})
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("throughput")
    p.add_argument("--config", default="ml100k-mom")
    p.add_argument("--data", help="default: the config's data.path")
    p.add_argument("--run", help="a run of the same config, for the trainer's demand (its metrics.jsonl)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backend", default="dali")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.set_defaults(func=throughput)
    p = commands.add_parser("rss")
    p.add_argument("data", nargs="+")
    p.add_argument("--config", default="ml100k-mom")
    p.add_argument("--policies", nargs="+", default=["skip", "stop"])
    p.add_argument("--max-sequences", type=int, default=0, help="stop each read after this many (0: the epoch)")
    p.set_defaults(func=rss)
    p = commands.add_parser("read-epoch")
    p.add_argument("data")
    p.add_argument("--config", default="ml100k-mom")
    p.add_argument("--policy", default="skip")
    p.add_argument("--max-sequences", type=int, default=0)
    p.set_defaults(func=read_epoch)
    p = commands.add_parser("decode")
    p.add_argument("--data", default="data/ml-100k-mom")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(func=decode)
    p = commands.add_parser("dedup")
    p.add_argument("data", nargs="+")
    p.add_argument("--config", default="ml100k-mom")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, help="default: the config's")
    p.set_defaults(func=dedup)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
