"""What one content train step costs, and what item sharing across ranks and packing the titles save.

Runs the ml100k-text preset (MiniLM, its top block trained, in-batch softmax, bf16, 16 users per rank) on 2
torchrun ranks for a few steps, no evaluation, in the SETTINGS below. Reports, from metrics.jsonl after the
warm-up steps: seconds per step, sequences per second, items encoded per rank per step, MFU (every FLOP
counted) and MFU of real tokens only (the text tower's padding slots left out).

    python benchmarks/train_step.py [--steps 12] [--warmup 4]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from transrec.trainer.torchrun_entry import launch

SETTINGS = [  # (name, overrides)
    ("each rank encodes its own batch's items", ["train.share_items=false"]),
    ("items shared: each encoded once, by one rank", []),
    ("items shared, titles padded instead of packed", ["model.text.pack_width=0"]),
    ("items shared, the whole catalogue as negatives", ["model.negatives=catalogue"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ml100k-text")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-train-step"))
    args = parser.parse_args()
    print("| setting | s/step | sequences/s | items encoded per rank per step | MFU | MFU, real tokens |")
    print("|---|---|---|---|---|---|")
    ranks = 2
    for i, (name, overrides) in enumerate(SETTINGS):
        run = args.out / f"setting{i}"
        shutil.rmtree(run, ignore_errors=True)
        result = launch(ranks, args.config, [f"name={run.name}", f"output_dir={args.out}", "train.epochs=1",
                                             f"train.max_steps={args.steps}", f"train.log_every={args.warmup}",
                                             "eval.every_epochs=0", *overrides], timeout=3600)
        if result.returncode:
            raise SystemExit(f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]

        def mean(key: str) -> float:
            return sum(r[key] for r in timed) / len(timed)

        items_per_rank = mean("items_encoded_per_s") * mean("seconds_per_step") / ranks
        print(f"| {name} | {mean('seconds_per_step'):.2f} | {mean('sequences_per_s'):.1f} | {items_per_rank:.0f} | "
              f"{mean('mfu'):.2f} | {mean('mfu_real_tokens'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
