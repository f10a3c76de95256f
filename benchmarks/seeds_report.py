"""A table (markdown) and a plot (PNG) of runs repeated over seeds: `RUN-s<seed>` directories are grouped by RUN.

Per model: test HR@10 and NDCG@10 of the checkpoint with the best valid NDCG@10 (mean ± sd over seeds), the
valid NDCG@10 it was chosen by, time to that checkpoint (the run's own training seconds), the wall time of the
whole `transrec pretrain` command (from WALLS, lines `{"name", "wall_s"}`, when given), optimizer steps and
seconds per step. The popularity baseline comes first. The PNG shows valid NDCG@10 against training seconds,
one line per run, one colour per model.

    python benchmarks/seeds_report.py --out runs/ml100k-report [--walls runs/ml100k-walls.jsonl] runs/ml100k-*-s*
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transrec.launcher.transfer import mean_sd


def load(run: Path, walls: dict[str, float]) -> dict:
    results = json.loads((run / "results.json").read_text())
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return {"name": results["name"], "results": results, "wall": walls.get(results["name"]),
            "curve": [(r["seconds"], r["valid/ndcg@10"]) for r in evals if r.get("kind") == "eval"]}


def table(groups: dict[str, list[dict]]) -> str:
    lines = ["| model | seeds | test HR@10 | test NDCG@10 | valid NDCG@10 | time to best (s) | wall (s) | steps | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    popularity = next(iter(groups.values()))[0]["results"]["popularity"]
    lines.append(f"| popularity | - | {popularity['test']['hr@10']:.4f} | {popularity['test']['ndcg@10']:.4f} "
                 f"| {popularity['valid']['ndcg@10']:.4f} | - | - | - | - |")
    for model, runs in groups.items():
        best = [r["results"]["best"] for r in runs]
        walls = [r["wall"] for r in runs if r["wall"] is not None]
        steps = [r["results"]["steps"] for r in runs]
        per_step = [r["results"]["seconds"] / r["results"]["steps"] for r in runs]
        lines.append(" | ".join([
            f"| {model}", str(len(runs)), mean_sd([b["test/hr@10"] for b in best]),
            mean_sd([b["test/ndcg@10"] for b in best]), mean_sd([b["valid/ndcg@10"] for b in best]),
            mean_sd([r["results"]["seconds_to_best"] for r in runs], 0), mean_sd(walls, 0),
            mean_sd(steps, 0), mean_sd(per_step, 2)]) + " |")
    return "\n".join(lines)


def plot(groups: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(8, 5))
    for color, (model, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, groups.items()):
        for i, run in enumerate(runs):
            seconds, ndcg = zip(*run["curve"])
            axes.plot(seconds, ndcg, color=color, alpha=0.8, label=model if i == 0 else None)
    popularity = next(iter(groups.values()))[0]["results"]["popularity"]["valid"]["ndcg@10"]
    axes.axhline(popularity, color="grey", linestyle="--", label="popularity")
    axes.set(xlabel="training seconds", ylabel="valid NDCG@10", xscale="log")
    axes.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--walls", type=Path, help="JSON lines {name, wall_s} written by the benchmark script")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = parser.parse_args()
    walls = {}
    if args.walls and args.walls.exists():
        walls = {r["name"]: r["wall_s"] for r in map(json.loads, args.walls.read_text().splitlines())}
    groups: dict[str, list[dict]] = {}
    for run in sorted(args.runs):
        if (run / "results.json").exists():
            groups.setdefault(re.sub(r"-s\d+$", "", run.name), []).append(load(run, walls))
    report = table(groups)
    args.out.with_suffix(".md").write_text(report + "\n")
    plot(groups, args.out.with_suffix(".png"))
    print(report)


if __name__ == "__main__":
    main()
