"""Each distinct item of the global batch encoded once, by one rank, for every rank.

The ranks' batches overlap (on ml-100k two ranks' batches hold nearly the same ~1,500 items). Before the
forward, the ranks exchange their batches' item ids; each item of the union is given to one rank that holds
it (its content is loaded there), balanced so every rank encodes about union / world items. Each rank encodes
its share, the vectors are all-gathered (the gradient of each flows back to the rank that encoded it), and
every rank's loss scores its positions against the whole union: in-batch negatives across ranks.

The loss of each rank is its sum over positions divided by (global positions / world), so that DeepSpeed's
average of the ranks' gradients is the gradient of the mean over the global batch, as one process would
compute it, whether or not the ranks share their items. A rank whose batch is empty (all its samples were bad)
still takes part in the step, with a zero sum: it neither adds to the gradient nor dilutes it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from transrec.batch import Batch
from transrec.trainer.distributed import all_gather_padded, all_gather_with_grad, all_reduce_values, rank_and_world


def assign_owners(holders: np.ndarray) -> np.ndarray:
    """holders [world, G] bool (which ranks' batches hold each item of the union) -> the rank that encodes each.

    Items are grouped by the set of ranks that hold them, the most constrained sets first (an item one rank
    holds is that rank's); each group is spread over its holders so that the least loaded rise first
    (water-filling). A function of `holders` only, so every rank computes the same answer."""
    world, count = holders.shape
    owner = np.empty(count, np.int64)
    load = np.zeros(world, np.int64)
    sets, group = np.unique(holders, axis=1, return_inverse=True)
    for g in np.argsort(sets.sum(0), kind="stable"):
        items = np.flatnonzero(group.ravel() == g)
        ranks = np.flatnonzero(sets[:, g])
        shares = _water_fill(load[ranks], items.size)
        owner[items] = np.repeat(ranks, shares)
        load[ranks] += shares
    return owner


def _water_fill(loads: np.ndarray, count: int) -> np.ndarray:
    """How many of `count` new items each of these ranks takes so that the least loaded rise first."""
    order = np.argsort(loads, kind="stable")
    level = loads[order]
    k = 1  # the k least loaded take the items: raise them while that does not absorb `count`
    while k < len(level) and level[k] * k - level[:k].sum() < count:
        k += 1
    height, extra = divmod(int(level[:k].sum()) + count, k)
    shares = np.zeros(len(level), np.int64)
    shares[:k] = height - level[:k]
    shares[:extra] += 1
    result = np.empty_like(shares)
    result[order] = shares
    return result


@dataclass
class SharedItems:
    batch: Batch  # items: this rank's share; row_ids: the union of every rank's; rows renumbered into it
    gather: Callable[[torch.Tensor], torch.Tensor] | None  # vectors of the share -> of every row (None: 1 rank)
    positions: int  # predicting positions of the global batch (0: every rank's batch is empty)
    normalizer: float  # what the rank's summed loss is divided by


def share_items(batch: Batch, positions: int, enabled: bool = True) -> SharedItems:
    """Splits the encoding of the global batch's items over the ranks (a collective: every rank calls it once
    per step); `positions` = this rank's predicting positions. Not `enabled`: each rank keeps its own items."""
    rank, world = rank_and_world()
    total = round(all_reduce_values({"positions": float(positions)})["positions"])
    normalizer = max(total, 1) / world
    if world == 1 or not enabled:
        return SharedItems(batch, None, total, normalizer)
    every_rank = [ids.cpu().numpy() for ids in all_gather_padded(batch.row_ids)]
    union = np.unique(np.concatenate(every_rank))
    holders = np.stack([np.isin(union, ids, assume_unique=True) for ids in every_rank])
    owner = assign_owners(holders)
    counts = np.bincount(owner, minlength=world)
    longest = int(counts.max())
    # the row of the gathered [world * longest] vectors that holds each item of the union
    index_in_owner = np.zeros(union.size, np.int64)
    for r in range(world):
        index_in_owner[owner == r] = np.arange(counts[r])
    source = torch.from_numpy(owner * longest + index_in_owner).to(batch.row_ids.device)
    local_ids = batch.row_ids.cpu().numpy()
    own_rows = np.searchsorted(local_ids, union[owner == rank])
    renumber = torch.from_numpy(np.searchsorted(union, local_ids)).to(batch.row_ids.device)

    def gather(own: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([own, own.new_zeros(longest - own.shape[0], own.shape[1])])
        return all_gather_with_grad(padded).flatten(0, 1)[source]

    shared = replace(batch, items=batch.items.select(torch.from_numpy(own_rows)),
                     row_ids=torch.from_numpy(union).to(batch.row_ids.device),
                     history=renumber[batch.history], targets=renumber[batch.targets],
                     negatives=renumber[batch.negatives])
    return SharedItems(shared, gather, total, normalizer)
