"""Zero-shot on a target with a popularity prior learned from content on the source (issue 13).

A zero-shot model knows nothing of which target items are popular. Here a ridge regression from the export's item
vectors to log train popularity is fitted on the source's catalogue and applied to the target's items; its
prediction, standardized, times a weight w is added to every score (w and the ridge's strength chosen on the
target's valid users). Beside it: the plain zero-shot model, and the prior from the target's own train counts (not
zero-shot: it reads the target's interactions; what `transrec transfer` reports as zero-shot+popularity).

    python benchmarks/zero_shot_prior.py --from exports/ml100k-genre-a --data data/ml-100k-genre-b

The source is the data set the export's manifest.json records. Prints a markdown table of valid and test NDCG@10.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from transrec.config import load_config
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import EvalLoader
from transrec.models import TransRec
from transrec.trainer.evaluate import encode_data_set, evaluate_splits

WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
RIDGE = (1.0, 100.0, 10_000.0)


def standardized(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((values - values.mean()) / values.std()).float()


def log_popularity(store: ItemStore) -> np.ndarray:
    return np.log(np.maximum(np.asarray(store.popularity, np.float64), 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="export", required=True, type=Path)
    parser.add_argument("--data", required=True, help="the target data set")
    parser.add_argument("--config", default="ml100k-text", help="its eval settings (batch sizes, decoders)")
    args = parser.parse_args()
    cfg, model = load_config(args.config), TransRec.from_pretrained(args.export, dtype=torch.float32).eval()
    source_path = json.loads((args.export / "manifest.json").read_text())["dataset"]
    device = torch.device("cpu")

    source, target = ItemStore(source_path), ItemStore(args.data)
    source_vectors, target_vectors = (encode_data_set(model, store, cfg, device) for store in (source, target))
    loaders = {split: EvalLoader(args.data, split, cfg.eval.batch_size, model.cfg.max_seq_len, 0, 1)
               for split in ("valid", "test")}

    def ndcg(bias: torch.Tensor | None) -> dict[str, float]:
        results = evaluate_splits(model, target_vectors, loaders, [10], device, bias)
        return {split: metrics["ndcg@10"] for split, metrics in results.items()}

    x = source_vectors.double().numpy()
    mean, y, target_popularity = x.mean(0), log_popularity(source), log_popularity(target)
    centred, target_centred = x - mean, target_vectors.double().numpy() - mean
    rows = [("zero-shot", "-", ndcg(None))]
    learned = []
    for strength in RIDGE:
        coef = np.linalg.solve(centred.T @ centred + strength * np.eye(x.shape[1]), centred.T @ (y - y.mean()))
        predicted = target_centred @ coef
        correlation = spearman(predicted, target_popularity)
        for weight in WEIGHTS:
            learned.append((f"ridge {strength:g}, w {weight:g}, Spearman on the target {correlation:.2f}",
                            ndcg(weight * standardized(predicted))))
    label, scores = max(learned, key=lambda row: row[1]["valid"])
    rows.append(("zero-shot + prior learned from content on the source", label, scores))
    own = [(f"w {w:g}", ndcg(w * standardized(target_popularity))) for w in WEIGHTS]
    label, scores = max(own, key=lambda row: row[1]["valid"])
    rows.append(("zero-shot + the target's own train popularity (not zero-shot)", label, scores))
    print("| scores | chosen on valid | valid NDCG@10 | test NDCG@10 |\n|---|---|---|---|")
    for name, label, scores in rows:
        print(f"| {name} | {label} | {scores['valid']:.4f} | {scores['test']:.4f} |")


if __name__ == "__main__":
    main()
