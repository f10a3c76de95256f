"""MFU: FLOPs counted on a window's first step, over the measured matmul peak."""
import time

import pytest
import torch

from transrec.trainer.mfu import StepTimer, matmul_peak


def test_step_timer_counts_forward_and_backward_flops_of_the_first_step():
    timer = StepTimer(world=2, peak_flops=1e9)
    a, b = torch.randn(64, 32, requires_grad=True), torch.randn(32, 16)
    for _ in range(3):
        with timer.counting():
            (a @ b).sum().backward()  # forward 2*64*32*16, backward (grad of a only) as much again
        timer.add(sequences=4, items=10)
    assert timer.step_flops == 2 * (2 * 64 * 32 * 16)
    timer.start = time.perf_counter() - 2.0  # the window has lasted 2 s
    rates = timer.rates()
    per_rank = 3 * timer.step_flops / 2.0  # three steps at the first step's count
    assert rates["mfu"] == pytest.approx(per_rank / 1e9, rel=1e-3)
    assert rates["tflops_per_s"] == pytest.approx(2 * per_rank / 1e12, rel=1e-3)  # both ranks
    assert rates["sequences_per_s"] == pytest.approx(12 / 2.0, rel=1e-3)


def test_matmul_peak_is_a_plausible_rate_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    peak = matmul_peak(torch.float32, torch.device("cpu"), repeats=1)
    assert torch.equal(torch.rand(3), expected)  # a resumed run measures it again: it must not shift dropout
    assert 1e9 < peak < 1e14  # any CPU between one slow core and a large socket
