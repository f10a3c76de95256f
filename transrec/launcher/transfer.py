"""`transrec transfer`: what a pretrained model buys a target platform, against how much of its data there is.

Given an export (pretrained on a source) and a target data set that shares no user or item with the source,
for each share of the target's training users (writers/subsample.py: evaluation always on every user, with
the same histories) and each seed, it runs on the cluster (the embedded one unless `cluster.address` is set):
- popularity (the kept users' train counts) and zero-shot (the export as it is), no training; and zero-shot with
  a popularity prior: score = user . item + w log p(item), p from the kept users' train counts, the weight w
  chosen on the target's valid split (PRIOR_WEIGHTS), since a model trained with the logQ correction scores how
  much more a user likes an item than its popularity says, and a new platform's popularity is known at once;
- two-stage: the export's towers frozen, the projections and the user encoder trained;
- fine-tuned: every weight (`full`), the towers' top blocks (`top-k`), or adapters only; or every weight with
  the user encoder started afresh (`fresh-user-encoder`: only the item towers transfer);
- scratch: the config's own architecture and starting weights (MiniLM included), no export;
each trained run early-stopped on valid NDCG@10 (the config's `train.patience` and `train.patience_steps`). It
writes OUT/report.md (the study's settings; mean ± sd over seeds of test HR@10 and NDCG@10, the valid NDCG@10 each
row was chosen at, seconds to the best checkpoint) and OUT/report.png (test NDCG@10 against the share of users
kept), built from the runs' own results files. A run that has its results.json is not run again, and one cut
short resumes from its latest checkpoint: an interrupted study goes on where it stopped.
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
    "fresh-user-encoder": (True, ["train.finetune_mode=full", "train.fresh_user_encoder=true"]),
    "scratch": (False, []),
}
ZERO_SHOT = ("zero-shot", "zero-shot+popularity")  # evaluated, not trained
REPORTED = ("popularity", *ZERO_SHOT, *METHODS)
PRIOR_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # of log popularity; scores are dot products of ~1-30


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
    from transrec.trainer.checkpoint_store import run_checkpoints
    from transrec.trainer.evaluate import evaluate_model
    from transrec.writers.subsample import subsample_train_users

    base = [*overrides, f"output_dir={out / 'runs'}"]
    study_cfg = load_config(config, base)
    exported = None  # read once, when a zero-shot evaluation is still to do
    for fraction in fractions:
        for seed in range(seeds):
            target = out / "data" / f"users{fraction:g}-seed{seed}"
            if not (target / "manifest.json").exists():
                subsample_train_users(data, target, fraction, seed, overwrite=True)
            if not (out / "runs" / run_name(ZERO_SHOT[-1], fraction, seed) / "results.json").exists():
                exported = exported or TransRec.from_pretrained(export)
                results = evaluate_model(exported, str(target), study_cfg, prior_weights=PRIOR_WEIGHTS)
                write_zero_shot(results, out / "runs", fraction, seed, study_cfg.eval.select_metric)
            for method in methods:
                name = run_name(method, fraction, seed)
                if (out / "runs" / name / "results.json").exists():
                    continue
                from_export, sets = METHODS[method]
                cfg = load_config(config, [*base, f"name={name}", f"data.path={target}", f"train.seed={seed}",
                                           f"data.shuffle_seed={seed}", *sets,
                                           *([f"init_from={export}"] if from_export else [])])
                prepare_and_train(cfg, resume=run_checkpoints(cfg).latest() is not None)
    rows = collect(out, fractions, seeds, methods)
    write_report(rows, out, f"`--from {export} --data {data} --config {config}`"
                 + "".join(f" `--set {item}`" for item in overrides))
    return rows


def write_zero_shot(results: dict, runs: Path, fraction: float, seed: int, select_metric: str) -> None:
    """The two zero-shot rows of a share and seed as results files shaped like a trained run's: the export as it
    is, and with the prior weight that scored best on valid."""
    def as_run(metrics: dict, **extra) -> dict:
        best = {f"{split}/{k}": v for split in ("valid", "test") for k, v in metrics[split].items()}
        popularity = {split: results[f"{split}_popularity"] for split in ("valid", "test")}
        return {"best": best, "popularity": popularity, **extra}

    weight = max(PRIOR_WEIGHTS, key=lambda w: results[f"prior{w:g}"]["valid"][select_metric])
    by_weight = {f"{w:g}": results[f"prior{w:g}"]["valid"][select_metric] for w in PRIOR_WEIGHTS}
    for method, run in ((ZERO_SHOT[0], as_run(results)),
                        (ZERO_SHOT[1], as_run(results[f"prior{weight:g}"], prior_weight=weight,
                                              valid_by_prior_weight=by_weight))):
        directory = runs / run_name(method, fraction, seed)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps(run, indent=2))


def collect(out: Path, fractions: list[float], seeds: int, methods: tuple[str, ...]) -> list[dict]:
    """One row per (share, seed, method) from the runs' results files: test metrics, seconds."""
    rows = []
    for fraction in fractions:
        for seed in range(seeds):
            runs = {m: json.loads((out / "runs" / run_name(m, fraction, seed) / "results.json").read_text())
                    for m in (*ZERO_SHOT, *methods)}
            popularity = runs[ZERO_SHOT[0]]["popularity"]
            rows.append({"method": "popularity", "fraction": fraction, "seed": seed, **popularity["test"],
                         "valid_ndcg@10": popularity["valid"]["ndcg@10"]})
            for method, results in runs.items():
                test = {k.removeprefix("test/"): v for k, v in results["best"].items() if k.startswith("test/")}
                seconds = {k: results[k] for k in ("seconds_to_best", "seconds") if k in results}
                rows.append({"method": method, "fraction": fraction, "seed": seed, **test, **seconds,
                             "valid_ndcg@10": results["best"]["valid/ndcg@10"]})
    return rows


def write_report(rows: list[dict], out: Path, study: str) -> None:
    """OUT/report.md (`study`: the settings, shown above the table) and OUT/report.png."""
    fractions = sorted({r["fraction"] for r in rows})
    methods = [m for m in REPORTED if any(r["method"] == m for r in rows)]
    cell = {(f, m): [r for r in rows if r["fraction"] == f and r["method"] == m] for f in fractions for m in methods}
    lines = ["| users kept | method | seeds | test HR@10 | test NDCG@10 | valid NDCG@10 | NDCG@10 / scratch | "
             "seconds to best | training seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for fraction in fractions:
        scratch = cell.get((fraction, "scratch"), [])
        for method in methods:
            runs = cell[fraction, method]
            trained = [r for r in runs if "seconds" in r]
            lines.append(f"| {fraction:.0%} | {method} | {quality_cells(runs, scratch)} | "
                         f"{mean_sd([r['seconds_to_best'] for r in trained], 0)} | "
                         f"{mean_sd([r['seconds'] for r in trained], 0)} |")
    (out / "report.md").write_text(f"Study: {study}\n\nTest metrics on the target, full ranking over its items, mean "
                                   "± sd over seeds (each seed: its own share of users, initial weights and data "
                                   "order); each trained row at its best valid NDCG@10 (shown), which is what a "
                                   "choice between rows may use.\n\n" + "\n".join(lines) + "\n")
    plot(cell, fractions, methods, out / "report.png")


def quality_cells(runs: list[dict], scratch: list[dict]) -> str:
    """The table cells of one row's runs: seeds | test HR@10 | test NDCG@10 | valid NDCG@10 | NDCG@10 / scratch's."""
    ndcg = [r["ndcg@10"] for r in runs]
    ratio = f"{statistics.mean(ndcg) / statistics.mean(r['ndcg@10'] for r in scratch):.2f}" if scratch else "-"
    return (f"{len(runs)} | {mean_sd([r['hr@10'] for r in runs])} | {mean_sd(ndcg)} | "
            f"{mean_sd([r['valid_ndcg@10'] for r in runs])} | {ratio}")


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
