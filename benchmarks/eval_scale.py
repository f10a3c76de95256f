"""Full ranking at catalogue scale: time and peak memory of scoring users against N items of width D.

Scores come from `transrec.trainer.evaluate.target_ranks` (the function the trainer uses): items `chunk` at a
time, each user's history masked, only the count of higher-scoring items kept, so memory is the item matrix
plus one [users x chunk] score block. Item and user vectors are random (encoding the catalogue is the item
encoders' cost, measured by the training runs); histories of 50 random items per user.

    python benchmarks/eval_scale.py --items 1000000 --dim 256 --users 4096
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from transrec.batch import EvalBatch
from transrec.trainer.evaluate import target_ranks
from transrec.trainer.metrics import add_sums, metric_sums


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--users", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="users per scoring batch (eval.batch_size)")
    parser.add_argument("--chunk", type=int, default=65536, help="items scored at a time")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    before = peak_rss_gib()
    items = torch.nn.functional.normalize(torch.randn(args.items, args.dim, generator=generator, device=device), dim=-1)
    print(f"item matrix: {items.numel() * 4 / 2**30:.2f} GiB; peak RSS {before:.2f} -> {peak_rss_gib():.2f} GiB")
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for first in range(0, args.users, args.batch):
        n = min(args.batch, args.users - first)
        history = torch.randint(0, args.items, (n, args.history), generator=generator, device=device)
        batch = EvalBatch(users=torch.arange(first, first + n, device=device), history=history,
                          history_mask=torch.ones(n, args.history, dtype=torch.bool, device=device), seen=history,
                          target=torch.randint(0, args.items, (n,), generator=generator, device=device),
                          valid=torch.ones(n, dtype=torch.bool, device=device))
        users = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=generator, device=device), dim=-1)
        add_sums(sums, metric_sums(target_ranks(users, items, batch, args.chunk), [10], batch.valid))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    flops = 2 * args.users * args.items * args.dim
    print(f"{args.users} users x {args.items} items x {args.dim}: {elapsed:.1f} s, {args.users / elapsed:.0f} users/s, "
          f"{flops / elapsed / 1e9:.0f} GFLOP/s ({args.device}, threads {torch.get_num_threads()}); peak RSS "
          f"{peak_rss_gib():.2f} GiB; "
          f"random-vector hr@10 {sums['hr@10'] / args.users:.5f}")


if __name__ == "__main__":
    main()
