"""Why a transfer study's fine-tuned row leads scratch on valid and not on test: each best checkpoint scored per
user on valid (history = train items), on test (history = train items + the valid item), and on test with the
valid item left out of the history (the same history as valid, the next target), averaged over seeds, with a
paired bootstrap 95% interval over users of fine-tuned minus scratch. With `--inter` (the source interactions
file of a `prepare movielens` target), users whose valid and test items share a timestamp are shown apart.

    python benchmarks/transfer_recency.py --study runs/transfer-genre-steps60-lr5e-4 --fractions 0.05,0.1 \\
        --seeds 3 --inter ../shared/data/ml-100k/ml-100k.inter
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import EvalLoader, _ShardedSequences
from transrec.launcher.transfer import run_name
from transrec.trainer.evaluate import encode_data_set, history_target_ranks
from transrec.trainer.export import load_checkpoint_model
from transrec.trainer.finetune import load_item_features
from transrec.trainer.metrics import ndcg_at
from transrec.trainer.run_dir import run_config

VIEWS = ("valid", "test", "test without the valid item")


def shifted_right(columns: torch.Tensor) -> torch.Tensor:
    """A left-padded [B, T] history without its last column: one more pad on the left."""
    return torch.cat([torch.zeros_like(columns[:, :1]), columns[:, :-1]], 1)


@torch.no_grad()
def per_user_ndcg(run: Path) -> dict[str, np.ndarray]:
    """NDCG@10 of every evaluated user of the run's best checkpoint, in each of VIEWS."""
    model, cfg, _ = load_checkpoint_model(run)
    store = ItemStore(cfg.data.path)
    load_item_features(model, store)
    items = encode_data_set(model, store, cfg, torch.device("cpu"))
    candidates = model.scoring(items)
    out = {}
    for view in VIEWS:
        split, values = view.split()[0], []
        for batch in EvalLoader(cfg.data.path, split, cfg.eval.batch_size, model.cfg.max_seq_len, 0, 1):
            if view == VIEWS[2]:  # left-padded: the last column is the valid item; shift it out
                batch = dataclasses.replace(batch, history=shifted_right(batch.history),
                                            history_mask=shifted_right(batch.history_mask))
            ranks = history_target_ranks(model, items, candidates, batch)
            values.append(ndcg_at(ranks[batch.valid], 10).numpy())
        out[view] = np.concatenate(values)
    return out


def tied_users(data: Path, inter: Path) -> np.ndarray:
    """[users] True where the user's last two interactions (valid and test) have the same timestamp."""
    source_id = {r["index"]: r["source_id"] for r in map(json.loads, (data / "items" / "items.jsonl").open())}
    wanted, by_user = set(source_id.values()), defaultdict(list)
    for line in inter.read_text().splitlines()[1:]:
        user, item, _, when = line.split("\t")
        if item in wanted:
            by_user[user].append((float(when), item))
    last_two_tied = {}  # a user's items in order -> whether the last two share a timestamp
    for events in by_user.values():
        events.sort(key=lambda event: event[0])  # stable: ties keep file order, as `prepare movielens` does
        last_two_tied[tuple(item for _, item in events)] = len(events) > 1 and events[-1][0] == events[-2][0]
    return np.array([last_two_tied[tuple(source_id[int(i)] for i in sample["items"])]
                     for sample in _ShardedSequences(data / "eval")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--fractions", default="0.1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inter", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| users kept | view | users | fine-tuned | scratch | ratio | difference [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for fraction in map(float, args.fractions.split(",")):
        scores = {method: [per_user_ndcg(args.study / "runs" / run_name(method, fraction, seed))
                           for seed in range(args.seeds)] for method in ("fine-tuned", "scratch")}
        groups = {"all": None}
        if args.inter:
            scratch_run = args.study / "runs" / run_name("scratch", fraction, 0)
            tied = tied_users(Path(run_config(scratch_run).data.path), args.inter)
            groups.update({"valid and test in the same second": tied, "the others": ~tied})
        for view in VIEWS:
            fine, scratch = (np.mean([s[view] for s in scores[m]], 0) for m in ("fine-tuned", "scratch"))
            for group, keep in groups.items():
                f, s = (fine, scratch) if keep is None else (fine[keep], scratch[keep])
                diff = f - s
                boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
                low, high = np.percentile(boot, [2.5, 97.5])
                print(f"| {fraction:.0%} | {view}{'' if keep is None else f' ({group})'} | {len(diff)} | "
                      f"{f.mean():.4f} | {s.mean():.4f} | {f.mean() / s.mean():.2f} | "
                      f"{diff.mean():+.4f} [{low:+.4f}, {high:+.4f}] |")


if __name__ == "__main__":
    main()
