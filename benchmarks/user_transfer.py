"""PeterRec-style user transfer on ml-100k, over seeds: from an export (pretrained by the caller), `transrec finetune
--task user-attribute` for each label (gender, age, occupation), each run training the adapters, full and scratch
classifiers beside the majority class; then OUT/report.md, per label the test accuracy and macro-F1 (mean ± sd over
seeds; a seed draws the users' split, the initial weights and the data order).

    transrec pretrain --config ml100k-text --set data.path=data/ml-100k-users     # data with user attributes
    transrec export --run runs/ml100k-text --out exports/ml100k-text
    python benchmarks/user_transfer.py --from exports/ml100k-text --out runs/user-transfer
    # smoke: --seeds 1 --set train.max_steps=2 --set train.epochs=1

The data set defaults to the one the export was trained on (the same users, as in PeterRec). A run that has its
results.json is not run again: an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transrec.launcher.cli import main as transrec
from transrec.launcher.transfer import mean_sd

LABELS = ("gender", "age", "occupation")


def run(args) -> list[dict]:
    """Every (label, seed) run not run yet; their results."""
    data = args.data or json.loads((args.init_from / "manifest.json").read_text())["dataset"]
    results = []
    for label in args.labels.split(","):
        for seed in range(args.seeds):
            name = f"{label}-s{seed}"
            done = args.out / "runs" / name / "results.json"
            if not done.exists():
                sets = [f"data.path={data}", f"output_dir={args.out / 'runs'}", f"name={name}", f"train.seed={seed}",
                        *args.overrides]
                code = transrec(["finetune", "--task", "user-attribute", "--label", label, "--from", str(args.init_from),
                                 "--config", args.config, *[arg for value in sets for arg in ("--set", value)]])
                if code:
                    sys.exit(code)
            results.append(json.loads(done.read_text()))
    return results


def report(results: list[dict]) -> str:
    lines = ["| label | classes | users train/valid/test | classifier | seeds | test accuracy | test macro-F1 | "
             "valid macro-F1 | best epoch | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label]
        majority = [r["majority"] for r in runs]
        about = f"{label} | {len(runs[0]['classes'])} | {'/'.join(map(str, runs[0]['users'].values()))}"
        lines.append(f"| {about} | majority class | {len(runs)} | "
                     f"{mean_sd([m['test']['accuracy'] for m in majority])} | "
                     f"{mean_sd([m['test']['macro_f1'] for m in majority])} | "
                     f"{mean_sd([m['valid']['macro_f1'] for m in majority])} | - | - |")
        for mode in runs[0]["modes"]:
            records = [r["modes"][mode] for r in runs]
            best = [record["best"] for record in records]
            lines.append(f"| {about} | {mode} | {len(runs)} | "
                         f"{mean_sd([b['test']['accuracy'] for b in best])} | "
                         f"{mean_sd([b['test']['macro_f1'] for b in best])} | "
                         f"{mean_sd([b['valid']['macro_f1'] for b in best])} | "
                         f"{mean_sd([b['epoch'] for b in best], 1)} | {mean_sd([r['seconds'] for r in records], 0)} |")
    return (f"User-attribute transfer from {results[0]['from']} on the users of {results[0]['data']} (split 70/15/15 "
            "per class): test metrics of each classifier's epoch with the best valid macro-F1, mean ± sd over "
            "seeds.\n\n" + "\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="init_from", required=True, type=Path, help="export directory")
    parser.add_argument("--data", default="", help="data set with user attributes (default: the export's)")
    parser.add_argument("--config", default="ml100k-text", help="the runs' training settings (a file or a preset)")
    parser.add_argument("--labels", default=",".join(LABELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applies to every run")
    parser.add_argument("--out", required=True, type=Path, help="runs/ and report.md go here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    text = report(run(arguments))
    (arguments.out / "report.md").write_text(text)
    print(text)
