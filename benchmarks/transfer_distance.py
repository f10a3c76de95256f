"""Transfer against domain distance: several `transrec transfer` studies, one per target world (its shift from
the source's), tabulated and plotted by shift (benchmarks/synthetic_transfer.sh runs them).

    python benchmarks/transfer_distance.py --fractions 0.1 --seeds 3 --methods fine-tuned,scratch \
        --out runs/transfer-distance 0=runs/transfer-shift0 0.5=runs/transfer-shift0.5 1=runs/transfer-shift1
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from transrec.launcher.transfer import ZERO_SHOT, collect, parse_fractions, quality_cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="SHIFT=STUDY_DIR, one per target")
    parser.add_argument("--fractions", default="0.1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="fine-tuned,scratch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    shown = ("popularity", *ZERO_SHOT, *methods)
    rows = []
    for study in args.studies:
        shift, directory = study.split("=", 1)
        rows += [{**row, "shift": float(shift)}
                 for row in collect(Path(directory), parse_fractions(args.fractions), args.seeds, methods)]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| shift | users kept | method | seeds | test HR@10 | test NDCG@10 | valid NDCG@10 | NDCG@10 / scratch |",
             "|---|---|---|---|---|---|---|---|"]
    curves: dict[tuple[float, str], list[tuple[float, float]]] = {}
    for shift, fraction in sorted({(r["shift"], r["fraction"]) for r in rows}):
        cell = {m: [r for r in rows if (r["shift"], r["fraction"], r["method"]) == (shift, fraction, m)] for m in shown}
        for method in shown:
            runs = cell[method]
            lines.append(f"| {shift:g} | {fraction:.0%} | {method} | {quality_cells(runs, cell.get('scratch', []))} |")
            curves.setdefault((fraction, method), []).append((shift, statistics.mean(r["ndcg@10"] for r in runs)))
    (args.out / "report.md").write_text("Test metrics on each target (SYNTHETIC data), by its world's shift from "
                                        "the source's; mean ± sd over seeds.\n\n" + "\n".join(lines) + "\n")
    plot(curves, args.out / "report.png")
    print((args.out / "report.md").read_text())


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(8, 5))
    for (fraction, method), points in curves.items():
        style = {"linestyle": "--", "color": "grey"} if method == "popularity" else {"marker": "o"}
        axes.plot(*zip(*points), label=f"{method}, {fraction:.0%} of users", **style)
    axes.set(xlabel="shift of the target's world from the source's (synthetic)", ylabel="test NDCG@10")
    axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
