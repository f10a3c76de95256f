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


TEXT_TOWER = "item_encoder.text"  # the module whose FLOPs on padding slots are not useful work


class StepTimer:
    """Sequences, distinct items and model FLOPs per second since the window opened (one log window).

    FLOPs (forward and backward, as torch's FlopCounterMode counts them: matmuls and convolutions) are
    counted on the window's first step and taken as every step's, which keeps the counter's dispatch
    overhead off all other steps; batches differ only by their number of distinct items and tokens.
    `mfu` counts every FLOP computed; `mfu_real_tokens` leaves out the text tower's share spent on token slots
    that hold no token (padding), as the tower reports it (`real_token_share`).
    """

    def __init__(self, world: int, peak_flops: float, text_tower=None):
        self.world, self.peak, self.text_tower = world, peak_flops, text_tower
        self.start, self.steps, self.sequences, self.items = time.perf_counter(), 0, 0, 0
        self.step_flops = self.useful_flops = 0

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
        useful_per_s = self.useful_flops * self.steps / elapsed
        return {"seconds_per_step": elapsed / max(self.steps, 1), "sequences_per_s": self.sequences / elapsed,
                "items_encoded_per_s": self.items / elapsed,
                "tflops_per_s": flops_per_s * self.world / 1e12, "mfu": flops_per_s / self.peak,
                "mfu_real_tokens": useful_per_s / self.peak}


class _Counter(FlopCounterMode):
    def __init__(self, timer: StepTimer):
        super().__init__(display=False)
        self.timer = timer

    def __exit__(self, *args):
        result = super().__exit__(*args)
        total = self.get_total_flops()
        tower = self.timer.text_tower
        text = sum(sum(counts.values()) for name, counts in self.get_flop_counts().items()
                   if name.endswith("." + TEXT_TOWER))
        self.timer.step_flops = total
        self.timer.useful_flops = total - text * (1 - (tower.real_token_share if tower is not None else 1.0))
        return result
