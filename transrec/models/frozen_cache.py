"""Per item, the output of a tower's frozen part (the layers below its trainable blocks): a fixed function of
the item's content, so it is computed once, on the item's first encoding, and reused at every later step."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


class FrozenOutputCache:
    """item id -> frozen-part output. Holds catalogue-sized memory once every item has been seen; per process
    (every rank keeps its own), so it fits ZeRO-1/2, whose ranks hold every frozen weight, not ZeRO-3."""

    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}

    def lookup(self, item_ids: torch.Tensor,
               compute: Callable[[list[int]], Iterable[torch.Tensor]]) -> list[torch.Tensor]:
        """The outputs of `item_ids`, in order; `compute(rows)` yields those of the rows not cached yet."""
        ids = item_ids.tolist()
        missing = [row for row, item in enumerate(ids) if item not in self.outputs]
        if missing:
            for row, output in zip(missing, compute(missing)):
                self.outputs[ids[row]] = output.clone()
        return [self.outputs[item] for item in ids]

    def clear(self) -> None:
        self.outputs.clear()
