"""Train-step cost of each softmax negative source on a synthetic 1M-item catalogue (text items, MiniLM tower).

Runs the real trainer (2 torchrun ranks, ZeRO-2, bf16, ml100k-text's model) for a few steps per
source on a synthetic data set of 1,000,000 items, and reports the mean seconds per step after the first
`--warmup` steps (from metrics.jsonl), its ratio to the in-batch step, and the
largest rank's peak resident memory. No evaluation (ranking 1M items on this CPU would take longer than the
steps).

    python benchmarks/negatives_scale.py [--items 1000000] [--steps 16]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from transrec.writers.synthetic import prepare_synthetic
from transrec.trainer.torchrun_entry import launch

CONFIG = "ml100k-text"
SOURCES = {  # name -> overrides
    "inbatch": ["model.negatives=inbatch"],
    "bank (all encoded so far)": ["model.negatives=bank", "model.sampled_negatives=0"],
    "bank (4,096 drawn per step)": ["model.negatives=bank", "model.sampled_negatives=4096"],
    "mixed (16 per rank)": ["model.negatives=mixed", "model.sampled_negatives=16"],
    "mixed (64 per rank)": ["model.negatives=mixed", "model.sampled_negatives=64"],
}


def step_seconds(run: Path, warmup: int) -> tuple[float, float]:
    """(mean seconds per step after `warmup` steps, the largest rank's peak RSS in GB)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    timed = [r["seconds_per_step"] for r in train if r["step"] > warmup]
    return sum(timed) / len(timed), max(r["max_rank_rss_gb"] for r in train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32, help="users per rank")
    parser.add_argument("--workdir", type=Path, default=Path("data/bench-negatives"))
    args = parser.parse_args()
    data = args.workdir / f"syn-{args.items}-items"
    if not (data / "manifest.json").exists():
        prepare_synthetic(data, users=args.users, items=args.items, image_fraction=0.0, users_per_sample=1)
    print("| negatives | s/step | vs in-batch | peak RSS per rank (GB) |\n|---|---|---|---|")
    baseline = None
    for name, overrides in SOURCES.items():
        run_name = "neg-" + "-".join(name.replace("(", "").replace(",", "").split()[:2])
        shutil.rmtree(args.workdir / "runs" / run_name, ignore_errors=True)
        sets = [f"name={run_name}", f"output_dir={args.workdir / 'runs'}", f"data.path={data}",
                f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.log_every=1",
                "train.epochs=1", "eval.every_epochs=0", *overrides]
        result = launch(2, CONFIG, sets, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
        seconds, rss = step_seconds(args.workdir / "runs" / run_name, args.warmup)
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f}x | {rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
