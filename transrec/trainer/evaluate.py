"""Full-ranking evaluation: every item of the catalogue encoded once, every eval user ranked against all.

Items are split across ranks in equal-sized slices (each rank makes the same number of forward calls,
which ZeRO-3 needs, since its parameters are gathered collectively), gathered into one matrix, then each
rank scores its own users chunk by chunk. The user's history is masked out of the candidates; the
target never is.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from transrec.batch import EvalBatch
from transrec.trainer.distributed import all_reduce_values, rank_and_world
from transrec.trainer.metrics import add_sums, count_higher, means, metric_sums


@torch.no_grad()
def encode_catalogue(model, store, decoder, batch_size: int, device: torch.device, mode: str,
                     video_decoder=None) -> torch.Tensor:
    """[num_items, dim] float32 vectors of every item, each encoded exactly once across the ranks (`decoder` and
    `video_decoder` decode images and clips, whose frames are sampled evenly)."""
    rank, world = rank_and_world()
    num_items = store.num_items
    per_rank = math.ceil(num_items / world)
    own = np.arange(rank * per_rank, (rank + 1) * per_rank)
    own = np.where(own < num_items, own, num_items - 1)  # pad the last slice so all ranks call equally
    chunks = []
    for start in range(0, per_rank, batch_size):
        ids = own[start : start + batch_size]
        distinct, inverse = np.unique(ids, return_inverse=True)
        items = store.item_batch(distinct, decoder, mode, video_decoder).to(device)
        chunks.append(model.encode_items(items).float()[torch.from_numpy(inverse).to(device)])
    mine = torch.cat(chunks)
    if world > 1:
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        mine = torch.cat(gathered)
    return mine[:num_items]


def _excluded(batch: EvalBatch, start: int, stop: int) -> torch.Tensor:
    """[B, stop-start] True where a candidate of this chunk is in the user's history and is not the target."""
    seen = batch.seen
    in_chunk = (seen >= start) & (seen < stop) & (seen != batch.target[:, None])
    mask = torch.zeros(seen.shape[0], stop - start, dtype=torch.bool, device=seen.device)
    rows = torch.arange(seen.shape[0], device=seen.device)[:, None].expand_as(seen)
    mask[rows[in_chunk], seen[in_chunk] - start] = True
    return mask


def target_ranks(user_vecs: torch.Tensor, item_vecs: torch.Tensor, batch: EvalBatch, chunk: int = 65536) -> torch.Tensor:
    """Rank of each user's target among all items, scoring `chunk` items at a time."""
    target_scores = (user_vecs * item_vecs[batch.target]).sum(-1)
    ranks = torch.zeros_like(batch.target)
    for start in range(0, item_vecs.shape[0], chunk):
        stop = min(start + chunk, item_vecs.shape[0])
        scores = user_vecs @ item_vecs[start:stop].T
        ranks += count_higher(scores, target_scores, _excluded(batch, start, stop))
    return ranks


def history_target_ranks(model, item_vecs: torch.Tensor, candidates: torch.Tensor, batch: EvalBatch,
                         biased: bool = False) -> torch.Tensor:
    """Rank of each user's target among `candidates` (`model.scoring` of `item_vecs`; with `biased`, an item bias
    appended as one more column), the user encoded from the vectors of its history's items."""
    history = item_vecs[batch.history].to(next(model.parameters()).dtype)
    user_vecs = model.scoring(model.encode_users(history, batch.history_mask).float())
    if biased:  # score = user . item + bias: one more dimension, 1 on the user's side
        user_vecs = torch.cat([user_vecs, user_vecs.new_ones(len(user_vecs), 1)], 1)
    return target_ranks(user_vecs, candidates, batch)


@torch.no_grad()
def evaluate_splits(model, item_vecs: torch.Tensor, loaders: dict, ks: list[int], device: torch.device,
                    item_bias: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """HR@K and NDCG@K (means over all users of every rank) of `model` on each eval split of `loaders`.
    `item_bias` [N] is added to every user's score of each item (a prior, such as weighted log popularity)."""
    candidates = model.scoring(item_vecs)  # (a normalized copy with a temperature: once for all splits)
    if item_bias is not None:
        candidates = torch.cat([candidates, item_bias.to(candidates)[:, None]], 1)
    results = {}
    for split, loader in loaders.items():
        sums: dict[str, float] = {}
        for batch in loader:
            batch = batch.to(device)
            ranks = history_target_ranks(model, item_vecs, candidates, batch, biased=item_bias is not None)
            add_sums(sums, metric_sums(ranks, ks, batch.valid))
        results[split] = means(all_reduce_values(sums))
    return results


def evaluate_popularity(popularity: np.ndarray, loader, ks: list[int]) -> dict[str, float]:
    """The popularity baseline under the same protocol: every user gets the train-count ranking."""
    scores = torch.from_numpy(np.asarray(popularity, dtype=np.float64))
    sums: dict[str, float] = {}
    for batch in loader:
        user_scores = scores[None].expand(batch.target.shape[0], -1)
        ranks = count_higher(user_scores, scores[batch.target], _excluded(batch, 0, scores.shape[0]))
        add_sums(sums, metric_sums(ranks, ks, batch.valid))
    return means(all_reduce_values(sums))


def encode_data_set(model, store, cfg, device: torch.device) -> torch.Tensor:
    """encode_catalogue in one process, with the image and video decoders that `cfg.data` and the model ask for."""
    from transrec.dataloading.videos import item_decoders

    decoder, video_decoder = item_decoders(model.cfg, cfg.data)
    return encode_catalogue(model, store, decoder, cfg.eval.item_batch_size, device, model.item_mode, video_decoder)


def evaluate_model(model, data_path: str, cfg, splits=("valid", "test"), device: torch.device | None = None,
                   prior_weights: tuple[float, ...] = ()) -> dict:
    """One-process evaluation of a plain (non-DeepSpeed) model on a prepared dataset: metrics per split; for each
    of `prior_weights` w, also with w x the data set's log popularity added to every score (`prior{w:g}`)."""
    from transrec.dataloading.item_store import ItemStore
    from transrec.dataloading.loader import EvalLoader
    from transrec.trainer.finetune import load_item_features

    device = device or torch.device("cpu")
    model = model.to(device).eval()
    store = ItemStore(data_path)
    load_item_features(model, store)
    item_vecs = encode_data_set(model, store, cfg, device)
    loaders = {split: EvalLoader(data_path, split, cfg.eval.batch_size, model.cfg.max_seq_len, 0, 1)
               for split in splits}
    results = evaluate_splits(model, item_vecs, loaders, cfg.eval.ks, device)
    model.set_item_popularity(torch.as_tensor(store.popularity))  # this data set's, for the prior
    for weight in prior_weights:
        bias = weight * model.popularity.log()
        results[f"prior{weight:g}"] = evaluate_splits(model, item_vecs, loaders, cfg.eval.ks, device, bias)
    for split, loader in loaders.items():
        results[f"{split}_popularity"] = evaluate_popularity(store.popularity, loader, cfg.eval.ks)
    return results
