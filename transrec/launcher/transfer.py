"""`transrec transfer`: what a pretrained model buys a target platform, against how much of its data there is.

Given an export (pretrained on a source) and a target data set that shares no user or item with the source,
for each share of the target's training users (writers/subsample.py: evaluation always on every user, with
the same histories) and each seed, it runs on the cluster (the embedded one unless `cluster.address` is set):
- popularity (the kept users' train counts) and zero-shot (the export as it is): no training;
- two-stage: the export's towers frozen, the projections and the user encoder trained;
- fine-tuned: every weight (`full`), the towers' top blocks (`top-k`), or adapters only;
- scratch: the config's own architecture and starting weights (MiniLM included), no export;
each trained run early-stopped on valid NDCG@10 (the config's `train.patience`). It writes OUT/report.md (mean
± sd over seeds of test HR@10 and NDCG@10, seconds to the best checkpoint) and OUT/report.png (test NDCG@10
against the share of users kept), built from the runs' own results files. A run that has its results.json
is not run again: an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

METHODS: dict[str, tuple[bool, list[str]]] = {  # trained method -> (starts from the export?, its overrides)
    "two-stage": (True, ["train.finetune_mode=top_k", "train.finetune_blocks=0"]),
    "fine-tuned": (True, ["train.finetune_mode=full"]),
    "top-k": (True, ["train.finetune_mode=top_k"]),
    "adapters": (True, ["train.finetune_mode=adapters"]),
    "scratch": (False, []),
}
REPORTED = ("popularity", "zero-shot", *METHODS)


def mean_sd(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--fractions: {text!r} is not a comma-separated list of numbers") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions: each share of users must be in (0, 1], got {text!r}")
    return fractions


def run_name(method: str, fraction: float, seed: int) -> str:
    return f"{method}-users{fraction:g}-seed{seed}"


def run_study(export: Path, data: Path, config: str, overrides: list[str], fractions: list[float], seeds: int,
              out: Path, methods: tuple[str, ...] = tuple(METHODS)) -> list[dict]:
    """Runs every (share, seed, method) not run yet, then writes the report; returns its rows."""
    from transrec.cluster.launch import prepare_and_train
    from transrec.config import load_config
    from transrec.models import TransRec
    from transrec.trainer.evaluate import evaluate_model
    from transrec.writers.subsample import subsample_train_users

    base = [*overrides, f"output_dir={out / 'runs'}"]
    zero_shot_file = out / "zero-shot.json"
    if not zero_shot_file.exists():  # every share evaluates the same users with the same histories
        results = evaluate_model(TransRec.from_pretrained(export), str(data), load_config(config, base))
        zero_shot_file.write_text(json.dumps(results, indent=2))
    for fraction in fractions:
        for seed in range(seeds):
            target = out / "data" / f"users{fraction:g}-seed{seed}"
            if not (target / "manifest.json").exists():
                subsample_train_users(data, target, fraction, seed, overwrite=True)
            for method in methods:
                name = run_name(method, fraction, seed)
                if (out / "runs" / name / "results.json").exists():
                    continue
                from_export, sets = METHODS[method]
                cfg = load_config(config, [*base, f"name={name}", f"data.path={target}", f"train.seed={seed}",
                                           f"data.shuffle_seed={seed}", *sets,
                                           *([f"init_from={export}"] if from_export else [])])
                prepare_and_train(cfg, resume=False)
    rows = collect(out, fractions, seeds, methods)
    write_report(rows, out)
    return rows


def collect(out: Path, fractions: list[float], seeds: int, methods: tuple[str, ...]) -> list[dict]:
    """One row per (share, seed, method) from the runs' results files: test metrics, seconds."""
    zero_shot = json.loads((out / "zero-shot.json").read_text())["test"]
    rows = []
    for fraction in fractions:
        for seed in range(seeds):
            runs = {m: json.loads((out / "runs" / run_name(m, fraction, seed) / "results.json").read_text())
                    for m in methods}
            any_run = next(iter(runs.values()))
            rows.append({"method": "popularity", "fraction": fraction, "seed": seed,
                         **any_run["popularity"]["test"]})
            rows.append({"method": "zero-shot", "fraction": fraction, "seed": seed, **zero_shot})
            for method, results in runs.items():
                test = {k.removeprefix("test/"): v for k, v in results["best"].items() if k.startswith("test/")}
                rows.append({"method": method, "fraction": fraction, "seed": seed, **test,
                             "seconds_to_best": results["seconds_to_best"], "seconds": results["seconds"]})
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    fractions = sorted({r["fraction"] for r in rows})
    methods = [m for m in REPORTED if any(r["method"] == m for r in rows)]
    cell = {(f, m): [r for r in rows if r["fraction"] == f and r["method"] == m] for f in fractions for m in methods}
    lines = ["| users kept | method | seeds | test HR@10 | test NDCG@10 | NDCG@10 / scratch | seconds to best | "
             "training seconds |", "|---|---|---|---|---|---|---|---|"]
    for fraction in fractions:
        scratch = statistics.mean(r["ndcg@10"] for r in cell[fraction, "scratch"]) if "scratch" in methods else 0.0
        for method in methods:
            runs = cell[fraction, method]
            ndcg = [r["ndcg@10"] for r in runs]
            ratio = f"{statistics.mean(ndcg) / scratch:.2f}" if scratch else "-"
            lines.append(f"| {fraction:.0%} | {method} | {len(runs)} | {mean_sd([r['hr@10'] for r in runs])} | "
                         f"{mean_sd(ndcg)} | {ratio} | {mean_sd([r['seconds_to_best'] for r in runs if 'seconds' in r], 0)} | "
                         f"{mean_sd([r['seconds'] for r in runs if 'seconds' in r], 0)} |")
    (out / "report.md").write_text("Test metrics on the target, full ranking over its items, mean ± sd over seeds "
                                   "(each seed: its own share of users, initial weights and data order).\n\n"
                                   + "\n".join(lines) + "\n")
    plot(cell, fractions, methods, out / "report.png")


def plot(cell: dict, fractions: list[float], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(8, 5))
    for method in methods:
        means = [statistics.mean(r["ndcg@10"] for r in cell[f, method]) for f in fractions]
        sds = [statistics.stdev([r["ndcg@10"] for r in cell[f, method]]) if len(cell[f, method]) > 1 else 0.0
               for f in fractions]
        style = {"linestyle": "--", "color": "grey"} if method == "popularity" else {"marker": "o"}
        axes.errorbar(fractions, means, yerr=sds, label=method, capsize=3, **style)
    axes.set(xlabel="share of the target's training users kept", ylabel="test NDCG@10", xscale="log")
    axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
