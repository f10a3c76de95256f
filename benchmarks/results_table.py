"""Prints a markdown table of test metrics: popularity first, then each run (the checkpoint with the best valid
NDCG@10, from RUN/results.json) or evaluation (the JSON that `transrec evaluate` prints, saved to a file)."""
import json
import sys
from pathlib import Path

COLUMNS = ["hr@10", "ndcg@10", "hr@20", "ndcg@20"]


def row(name: str, test: dict, epoch="-", valid="-") -> str:
    return f"| {name} | " + " | ".join(f"{test[c]:.4f}" for c in COLUMNS) + f" | {epoch} | {valid} |"


def main(sources: list[str]) -> None:
    print("| model | " + " | ".join(f"test {c}" for c in COLUMNS) + " | best epoch | valid ndcg@10 |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for i, source in enumerate(map(Path, sources)):
        if source.suffix == ".json":  # `transrec evaluate` output
            results = json.loads(source.read_text())
            popularity, line = results["test_popularity"], row(source.stem, results["test"])
        else:
            results = json.loads((source / "results.json").read_text())
            best = results["best"]
            popularity = results["popularity"]["test"]
            line = row(results["name"], {c: best[f"test/{c}"] for c in COLUMNS}, best["epoch"],
                       f"{best['valid/ndcg@10']:.4f}")
        if i == 0:
            print(row("popularity", popularity))
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
