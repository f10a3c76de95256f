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
    assert rates["seconds_per_step"] == pytest.approx(2.0 / 3, rel=1e-3)


def test_matmul_peak_is_a_plausible_rate_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    peak = matmul_peak(torch.float32, torch.device("cpu"), repeats=1)
    assert torch.equal(torch.rand(3), expected)  # a resumed run measures it again: it must not shift dropout
    assert 1e9 < peak < 1e14  # any CPU between one slow core and a large socket


def test_real_token_mfu_leaves_out_the_text_towers_padding_slots():
    from transrec.config import TextEncoderConfig
    from transrec.models.text_encoder import TextItemEncoder

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=500)
    lengths = torch.tensor([3, 9, 2, 5])
    input_ids = torch.randint(1, 500, (4, 9)) * (torch.arange(9) < lengths[:, None])
    attention_mask = (input_ids > 0).long()

    class Model(torch.nn.Module):  # the tower where TransRec keeps it, and a head outside it
        def __init__(self, pack_width: int):
            super().__init__()
            self.item_encoder = torch.nn.Module()
            self.item_encoder.text = TextItemEncoder(TextEncoderConfig(pretrained="", config=tiny,
                                                                       trainable_blocks=-1, pack_width=pack_width), 8)
            self.head = torch.nn.Linear(8, 1)

        def forward(self):
            return self.head(self.item_encoder.text(input_ids, attention_mask)).sum()

    for pack_width, slots in ((0, 4 * 9), (10, 2 * 10)):  # padded: 4 rows of 9; packed: [9] and [5, 3, 2]
        model = Model(pack_width)
        timer = StepTimer(world=1, peak_flops=1e9, text_tower=model.item_encoder.text)
        with timer.counting():
            model().backward()
        assert model.item_encoder.text.real_token_share == pytest.approx(19 / slots)
        assert timer.useful_flops < timer.step_flops
        head = 3 * 2 * 4 * 8  # the head's forward and backward (input and weight gradients), 4 items
        tower = timer.step_flops - head
        assert timer.useful_flops == pytest.approx(head + tower * 19 / slots)
