"""Exact resume on the real stack (2 torchrun ranks x DeepSpeed ZeRO-1/2/3 on gloo, dropout on), resume on fewer
and on more ranks, ZeRO-3 with gradient-checkpointed towers over frozen lower blocks, the optimizer offloaded.

48 users in batches of 8 on 2 ranks: 3 steps per epoch, 2 epochs, a checkpoint every step. A run resumed from its
checkpoint of step 4 (one step into the second epoch, so mid-epoch; `resumable_copy`) must retrace the
uninterrupted run bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import LAUNCH_STEPS as STEPS
from tests.launched import global_batches, losses, resumable_copy
from transrec.dataloading.dataset_format import USERS_PER_SAMPLE
from transrec.trainer.checkpoint import consolidated_state_dict
from transrec.trainer.checkpoint_store import CheckpointStore

STOP = 4
PLAIN = ("train.precision=fp32", "model.negatives=inbatch", "model.sampled_negatives=16")


@pytest.mark.parametrize(("stage", "precision", "negatives"), [(1, "fp32", "inbatch"), (3, "fp32", "inbatch"),
                                                                (2, "bf16", "bank")])
def test_resume_mid_epoch_is_bit_identical(runs, stage, precision, negatives):
    """Each ZeRO stage. bf16 too: DeepSpeed keeps fp32 master weights, saved in the checkpoint, and recasts the
    bf16 ones. The item-vector bank (negatives of every item encoded so far, 16 drawn per step) is checkpointed
    too."""
    overrides = (f"train.precision={precision}", f"model.negatives={negatives}", "model.sampled_negatives=16")
    reference = runs(f"ref{stage}{precision}{negatives}", stage, *overrides)
    name = resumable_copy(reference, STOP, f"resumed{stage}{precision}{negatives}")
    tag = reference.parent / name / "checkpoints" / f"step{STOP}"
    state = torch.load(tag / "rank0_state.pt", weights_only=True)
    # 1 of the epoch's 3 steps done: 16 sequences, in train samples of USERS_PER_SAMPLE
    assert state["epoch"] == 1 and state["loader"]["samples_in_epoch"] == 16 // USERS_PER_SAMPLE
    if negatives == "bank":
        bank = torch.load(tag / "shared_state.pt", weights_only=True)["bank"]
        assert bank["filled"].any() and bank["vectors"][bank["filled"]].abs().sum() > 0  # the items encoded so far
    resumed = runs(name, stage, *overrides, resume=True)

    assert len(losses(reference)) == STEPS
    assert losses(resumed) == losses(reference)  # every step's loss and learning rate, bitwise
    assert global_batches(resumed) == global_batches(reference)
    final_reference = consolidated_state_dict(CheckpointStore(reference / "checkpoints"), f"step{STEPS}")
    final_resumed = consolidated_state_dict(CheckpointStore(resumed / "checkpoints"), f"step{STEPS}")
    assert final_reference.keys() == final_resumed.keys()
    for key, tensor in final_reference.items():
        assert torch.equal(tensor, final_resumed[key]), key


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_fewer_ranks_continues_at_the_right_sample(runs, stage):
    """2 ranks x 8 stopped at step 4, resumed on 1 rank x 16 (the same global batch) through DeepSpeed's
    universal checkpoint: the rest of the epoch is every sample not yet seen, once, in the global batches of
    the 2-rank run, and the LR schedule goes on unchanged. The losses are not bitwise those of the 2-rank
    run: one mean over 16 sequences is not the mean of two means over 8, and rank 1's dropout stream is gone."""
    reference = runs(f"ref{stage}fp32inbatch", stage, *PLAIN)
    resumed = runs(resumable_copy(reference, STOP, f"fewer{stage}"), stage, *PLAIN, "train.batch_size=16", nproc=1,
                   resume=True)

    assert (resumed / "checkpoints" / f"step{STOP}" / "universal").is_dir()
    batches = global_batches(resumed)
    assert batches == global_batches(reference)  # the same samples in every global batch, steps 1..6
    second_epoch = [i for step in (4, 5, 6) for i in batches[step]]
    assert sorted(second_epoch) == list(range(48))  # no sample replayed or skipped
    assert [lr for _, _, lr in losses(resumed)] == [lr for _, _, lr in losses(reference)]
    assert [step for step, _, _ in losses(resumed)] == list(range(1, STEPS + 1))


def test_resume_on_more_ranks_consumes_every_sample_once(runs):
    """1 rank x 16 stopped at step 4 (mid-epoch), resumed on 2 ranks x 8 through the universal checkpoint: over
    the two runs, by the sample audit, every sample of each epoch was trained once, in the global batches of a
    2-rank run that never stopped, on its LR schedule."""
    reference = runs("ref2fp32inbatch", 2, *PLAIN)
    one_rank = runs("one-rank", 2, *PLAIN, "train.batch_size=16", f"train.max_steps={STOP}", nproc=1)
    resumed = runs(resumable_copy(one_rank, STOP, "more"), 2, *PLAIN, resume=True)

    assert (resumed / "checkpoints" / f"step{STOP}" / "universal").is_dir()
    batches = global_batches(resumed)  # steps 1-4: the one rank's, 5-6: both ranks'
    assert batches == global_batches(reference)
    for epoch in ((1, 2, 3), (4, 5, 6)):
        assert sorted(i for step in epoch for i in batches[step]) == list(range(48))
    assert [lr for _, _, lr in losses(resumed)] == [lr for _, _, lr in losses(reference)]


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank process group for in-process trainers, kept for the module: DeepSpeed caches its groups
    (deepspeed.utils.groups), so a second group in the same process would meet stale ones."""
    from transrec.network import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_offloaded_optimizer_state_lives_on_the_cpu(one_rank_group, launch_dataset, tmp_path, monkeypatch, stage):
    """`train.offload_optimizer`, checked on the optimizer (the losses would match with offload ignored): DeepSpeed's
    ZeRO optimizer runs offloaded, its fp32 master weights and Adam's moments, after a step, are CPU tensors,
    while on a GPU the model's weights are not."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from transrec.config import load_config
    from transrec.trainer import loop, run_dir

    monkeypatch.setattr(loop, "matmul_peak", lambda dtype, device: 1e12)  # (a benchmark, of no use here)
    cfg = run_dir.prepare(load_config("tiny", [f"data.path={launch_dataset}", f"output_dir={tmp_path}",
                                               "name=offload", f"train.zero_stage={stage}",
                                               "train.offload_optimizer=true", "train.max_steps=1",
                                               "eval.every_epochs=0"]), resume=False)
    trainer = loop.Trainer(cfg)
    try:
        assert trainer.fit()["steps"] == 1
        optimizer = trainer.engine.optimizer
        if stage == 3:
            assert isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) and optimizer.offload_optimizer
            masters = optimizer.fp32_partitioned_groups_flat
        else:
            assert isinstance(optimizer, DeepSpeedZeroOptimizer) and optimizer.cpu_offload
            masters = optimizer.single_partition_of_fp32_groups
        moments = [tensor for state in optimizer.optimizer.state.values() for name, tensor in state.items()
                   if name.startswith("exp_avg")]  # Adam's first and second moments
        assert masters and moments and all(t.device.type == "cpu" for t in [*masters, *moments])
        assert all(p.device == trainer.device for p in trainer.model.parameters())
    finally:
        trainer.loader.close()


def test_zero3_gradient_checkpointing_over_frozen_blocks_matches(runs):
    """ZeRO-3 + non-reentrant checkpointing of both towers, whose lower blocks are frozen (tiny.yaml:
    trainable_blocks 1 of 2): trains, and gives exactly the losses of the run without checkpointing."""
    plain = runs("ref3fp32inbatch", 3, *PLAIN)
    checkpointed = runs("gc3", 3, *PLAIN, "model.gradient_checkpointing=true", "train.max_steps=3")
    assert losses(checkpointed) == losses(plain)[:3]


def test_optimizer_offload_trains_like_the_plain_run_and_resumes_exactly(runs):
    """`train.offload_optimizer` under ZeRO-3 (DeepSpeed's CPU offload of the optimizer states and step): the same
    losses as without it, and the run resumed at step STOP retraces the uninterrupted offloaded run bitwise."""
    offload = (*PLAIN, "train.offload_optimizer=true")
    offloaded = runs("offload3", 3, *offload)
    reference = runs("ref3fp32inbatch", 3, *PLAIN)
    assert [step for step, _, _ in losses(offloaded)] == list(range(1, STEPS + 1))
    # DeepSpeed's CPU Adam rounds differently from torch's Adam: the same losses to float32 precision, not bitwise
    torch.testing.assert_close([loss for _, loss, _ in losses(offloaded)], [loss for _, loss, _ in losses(reference)],
                               rtol=1e-5, atol=1e-6)
    resumed = runs(resumable_copy(offloaded, STOP, "offload3-resumed"), 3, *offload, resume=True)
    assert losses(resumed) == losses(offloaded)
