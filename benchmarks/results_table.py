"""Prints a markdown table of runs' results.json: popularity, then each run's test metrics (best valid NDCG@10)."""
import json
import sys
from pathlib import Path

COLUMNS = ["hr@10", "ndcg@10", "hr@20", "ndcg@20"]


def main(run_dirs: list[str]) -> None:
    print("| model | " + " | ".join(f"test {c}" for c in COLUMNS) + " | best epoch | valid ndcg@10 |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for i, run_dir in enumerate(run_dirs):
        results = json.loads((Path(run_dir) / "results.json").read_text())
        if i == 0:
            pop = results["popularity"]["test"]
            print("| popularity | " + " | ".join(f"{pop[c]:.4f}" for c in COLUMNS) + " | - | - |")
        best = results["best"]
        print(f"| {results['name']} | " + " | ".join(f"{best['test/' + c]:.4f}" for c in COLUMNS)
              + f" | {best['epoch']} | {best['valid/ndcg@10']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
