"""Where a softmax's negatives come from (`model.negatives`), beyond the batch's own items.

- inbatch: the distinct items of the global batch (every rank's; each encoded once, by one rank).
- catalogue: every item; the loader puts the whole catalogue into each batch, so the softmax is exact.
- mixed: the batch's items plus `sampled_negatives` items drawn uniformly by the loader (Yang et al. 2020).
- bank: the batch's items plus, without gradient, the newest vector of every other item encoded so far
  (`ItemVectorBank`; cross-batch negatives, Wang et al. 2021), or `sampled_negatives` of them per step.

`log_inclusion` is how likely each candidate is to be in the set, for the logQ correction.
"""
from __future__ import annotations

import torch


def log_inclusion(popularity: torch.Tensor, positions: int, sampled: int) -> torch.Tensor:
    """log q of candidates whose train frequency is `popularity` (shares summing to 1 over the catalogue): an
    item enters a batch of `positions` targets about positions * p times, and `sampled` uniform draws add
    sampled / N; q = min(1, both), so an item certain to be there is not corrected at all."""
    num_items = popularity.numel()
    return (positions * popularity + sampled / num_items).clamp_max(1).log()


class ItemVectorBank:
    """The newest vector of every item encoded so far (`update` with each step's fresh vectors of the global
    batch, identical on every rank); `negatives` hands out the others as extra candidates, without gradient.

    Vectors are as encoded (before any normalization for scoring) and stale by up to an epoch: the price of
    scoring a target against the whole catalogue without encoding it."""

    def __init__(self, num_items: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.vectors = torch.zeros(num_items, dim, dtype=dtype, device=device)
        self.filled = torch.zeros(num_items, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.vectors[ids] = vectors.detach().to(self.vectors.dtype)
        self.filled[ids] = True

    @torch.no_grad()
    def negatives(self, exclude: torch.Tensor, count: int = 0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, vectors) of the filled items not in `exclude`: all of them, or `count` drawn uniformly with
        replacement."""
        available = self.filled.clone()
        available[exclude] = False
        ids = available.nonzero().squeeze(1)
        if 0 < count < ids.numel():
            ids = ids[torch.randint(ids.numel(), (count,), generator=generator, device=ids.device)]
        return ids, self.vectors[ids]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors, "filled": self.filled}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["vectors"].shape != self.vectors.shape:
            raise ValueError(f"the checkpoint's item bank is {tuple(state['vectors'].shape)}, "
                             f"this model's {tuple(self.vectors.shape)}")
        self.vectors.copy_(state["vectors"])
        self.filled.copy_(state["filled"])
