"""Exact resume on the real stack (2 torchrun ranks x DeepSpeed ZeRO-2/3 on gloo, dropout on), resume on fewer
ranks, and ZeRO-3 with gradient-checkpointed towers over frozen lower blocks.

48 users in batches of 8 on 2 ranks: 3 steps per epoch, 2 epochs. A run stopped at step 4 (one step into the
second epoch, so mid-epoch) and resumed must retrace the uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from transrec.dataloading.dataset_format import USERS_PER_SAMPLE
from transrec.trainer.audit import read_audit
from transrec.trainer.checkpoint import consolidated_state_dict
from transrec.trainer.checkpoint_store import CheckpointStore
from transrec.trainer.torchrun_entry import launch

CONFIG = "tiny"
STOP, STEPS = 4, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from transrec.writers.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "syn"
    prepare_synthetic(out, users=48, items=40)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """train(name, stage, *overrides, nproc=2, resume=False) -> the run directory, cached per argument list."""
    output_dir = tmp_path_factory.mktemp("runs")
    done: dict[tuple, Path] = {}

    def train(name: str, stage: int, *overrides: str, nproc: int = 2, resume: bool = False) -> Path:
        key = (name, stage, overrides, nproc, resume)
        if key not in done:
            sets = [f"name={name}", f"output_dir={output_dir}", f"data.path={dataset}", "train.epochs=2",
                    "train.log_every=1", "train.log_sample_ids=true", f"train.zero_stage={stage}", *overrides]
            result = launch(nproc, CONFIG, sets, resume)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            done[key] = output_dir / name
        return done[key]

    return train


def losses(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of every train record of metrics.jsonl, in order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records if r["kind"] == "train"]


def global_batches(run: Path) -> dict[int, list[int]]:
    """Per step, the sample ids all ranks trained on (sorted)."""
    batches: dict[int, list[int]] = {}
    for path in (run / "samples").glob("rank*.jsonl"):
        for record in read_audit(path):
            if "ids" in record:
                batches.setdefault(record["step"], []).extend(record["ids"])
    return {step: sorted(ids) for step, ids in sorted(batches.items())}


def stopped_copy(runs, stage: int, name: str, *overrides: str) -> str:
    """A fresh copy of the run stopped at step STOP, to resume under another name."""
    stopped = runs(f"stop{stage}{'-'.join(overrides)}", stage, *overrides, f"train.max_steps={STOP}")
    shutil.copytree(stopped, stopped.parent / name)
    return name


@pytest.mark.parametrize(("stage", "precision", "negatives"), [(2, "fp32", "inbatch"), (3, "fp32", "inbatch"),
                                                                (2, "bf16", "bank")])
def test_resume_mid_epoch_is_bit_identical(runs, stage, precision, negatives):
    """bf16 too: DeepSpeed keeps fp32 master weights, saved in the checkpoint, and recasts the bf16 ones. The
    item-vector bank (negatives of every item encoded so far, 16 drawn per step) is checkpointed too."""
    overrides = (f"train.precision={precision}", f"model.negatives={negatives}", "model.sampled_negatives=16")
    reference = runs(f"ref{stage}{precision}{negatives}", stage, *overrides)
    name = stopped_copy(runs, stage, f"resumed{stage}{precision}{negatives}", *overrides)
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
    overrides = ("train.precision=fp32", "model.negatives=inbatch", "model.sampled_negatives=16")
    reference = runs(f"ref{stage}fp32inbatch", stage, *overrides)
    name = stopped_copy(runs, stage, f"fewer{stage}", *overrides)
    resumed = runs(name, stage, *overrides, "train.batch_size=16", nproc=1, resume=True)

    assert (resumed / "checkpoints" / f"step{STOP}" / "universal").is_dir()
    batches = global_batches(resumed)
    assert batches == global_batches(reference)  # the same samples in every global batch, steps 1..6
    second_epoch = [i for step in (4, 5, 6) for i in batches[step]]
    assert sorted(second_epoch) == list(range(48))  # no sample replayed or skipped
    assert [lr for _, _, lr in losses(resumed)] == [lr for _, _, lr in losses(reference)]
    assert [step for step, _, _ in losses(resumed)] == list(range(1, STEPS + 1))


def test_zero3_gradient_checkpointing_over_frozen_blocks_matches(runs):
    """ZeRO-3 + non-reentrant checkpointing of both towers, whose lower blocks are frozen (tiny.yaml:
    trainable_blocks 1 of 2): trains, and gives exactly the losses of the run without checkpointing."""
    overrides = ("train.precision=fp32", "model.negatives=inbatch", "model.sampled_negatives=16")
    plain = runs("ref3fp32inbatch", 3, *overrides)
    checkpointed = runs("gc3", 3, *overrides, "model.gradient_checkpointing=true", "train.max_steps=3")
    assert losses(checkpointed) == losses(plain)[:3]


@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_trains_like_the_plain_run_and_resumes_exactly(runs, stage):
    """`train.offload_optimizer` (DeepSpeed's CPU offload of the optimizer states and step): the same losses as
    without it, and a run stopped at step STOP resumes to the uninterrupted offloaded run's losses bitwise."""
    overrides = ("train.precision=fp32", "model.negatives=inbatch", "model.sampled_negatives=16")
    offload = (*overrides, "train.offload_optimizer=true")
    offloaded = runs(f"offload{stage}", stage, *offload)
    reference = runs(f"ref{stage}fp32inbatch", stage, *overrides)
    assert [step for step, _, _ in losses(offloaded)] == list(range(1, STEPS + 1))
    torch.testing.assert_close([loss for _, loss, _ in losses(offloaded)], [loss for _, loss, _ in losses(reference)])
    stopped = runs(f"offload{stage}-stop", stage, *offload, f"train.max_steps={STOP}")
    shutil.copytree(stopped, stopped.parent / f"offload{stage}-resumed")
    resumed = runs(f"offload{stage}-resumed", stage, *offload, resume=True)
    assert losses(resumed) == losses(offloaded)
