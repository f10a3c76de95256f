"""MFU: the model's FLOPs per second over the machine's matmul peak, measured in the same process."""
from __future__ import annotations

import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of a large square matmul on this process's threads (or its GPU): the best of `repeats`."""
    size = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)  # its own: the run's RNG streams must not move
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class StepTimer:
    """Sequences, distinct items and model FLOPs per second since the window opened (one log window).

    FLOPs (forward and backward, as torch's FlopCounterMode counts them: matmuls and convolutions) are
    counted on the window's first step and taken as every step's, which keeps the counter's dispatch
    overhead off all other steps; batches differ only by their number of distinct items and tokens.
    """

    def __init__(self, world: int, peak_flops: float):
        self.world, self.peak = world, peak_flops
        self.start, self.steps, self.sequences, self.items, self.step_flops = time.perf_counter(), 0, 0, 0, 0

    def counting(self) -> contextlib.AbstractContextManager:
        """Wraps one step's forward and backward: counts its FLOPs on the window's first step."""
        if self.steps:
            return contextlib.nullcontext()
        return _Counter(self)

    def add(self, sequences: int, items: int) -> None:
        self.steps += 1
        self.sequences += sequences
        self.items += items

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        flops_per_s = self.step_flops * self.steps / elapsed  # this rank's
        return {"sequences_per_s": self.sequences / elapsed, "items_encoded_per_s": self.items / elapsed,
                "tflops_per_s": flops_per_s * self.world / 1e12, "mfu": flops_per_s / self.peak}


class _Counter(FlopCounterMode):
    def __init__(self, timer: StepTimer):
        super().__init__(display=False)
        self.timer = timer

    def __exit__(self, *args):
        result = super().__exit__(*args)
        self.timer.step_flops = self.get_total_flops()
        return result
