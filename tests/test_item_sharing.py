"""Each distinct item of the global batch encoded once across ranks: two ranks train exactly as one process
encoding the union would (loss and gradients), and every item is encoded by exactly one rank."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_models import NUM_ITEMS, make_batch, model_config
from transrec.models import TransRec
from transrec.trainer.item_sharing import assign_owners, share_items

# the two ranks' users: they share items 0, 1, 2 and 9
RANK_SEQUENCES = [[[0, 1, 2, 3, 4], [2, 5, 0, 7]], [[9, 1, 6], [8, 2, 10, 12, 0, 9], [11, 13, 14]]]


def build_model() -> TransRec:
    torch.manual_seed(0)
    return TransRec(model_config(loss="softmax", negatives="inbatch", mask_seen=True))


def reference(sequences: list) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, one batch of every rank's users: the mean loss over all positions and its gradients."""
    model = build_model()
    loss = model(make_batch([s for rank in sequences for s in rank], T=6, k=0)).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# the two-rank steps the tests check, name -> (each rank's users, items shared across ranks)
STEPS = {"shared": (RANK_SEQUENCES, True),
         "empty-shared": ([RANK_SEQUENCES[0], []], True),  # rank 1's samples were all bad
         "empty-unshared": ([RANK_SEQUENCES[0], []], False)}


def rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """One step of each of STEPS (one process group: a spawned process takes seconds to import the stack)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, (sequences, enabled) in STEPS.items():
        model = build_model()
        batch = make_batch(sequences[rank], T=6, k=0)
        shared = share_items(batch, int(model.predicting(batch).sum()), enabled)
        encoded = shared.batch.items.ids.tolist()
        output = model(shared.batch, gather=shared.gather, normalizer=shared.normalizer)
        output.loss.backward()
        grads = {}
        for param_name, p in model.named_parameters():  # as DeepSpeed does: the ranks' gradients averaged
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[param_name] = p.grad / world
        losses = [None] * world
        dist.all_gather_object(losses, output.loss.item())
        if rank == 0:
            torch.save({"loss": sum(losses) / world, "grads": grads, "union": shared.batch.row_ids.tolist(),
                        "positions": shared.positions}, f"{out}.{name}")
        torch.save({"encoded": encoded}, f"{out}.{name}.rank{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, tuple[dict, list[list[int]]]]:
    """name of STEPS -> (rank 0's record, the items each rank encoded) of that step on two ranks."""
    from transrec.network import free_port

    out = str(tmp_path_factory.mktemp("ranks") / "ranks.pt")
    mp.spawn(rank_worker, args=(2, free_port(), out), nprocs=2)
    return {name: (torch.load(f"{out}.{name}"), [torch.load(f"{out}.{name}.rank{r}")["encoded"] for r in range(2)])
            for name in STEPS}


def assert_trains_as(ranks: dict, sequences: list) -> None:
    """The ranks' mean loss and averaged gradients are those of one process on every rank's users at once."""
    loss, grads = reference(sequences)
    assert ranks["loss"] == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == ranks["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_ranks_train_as_one_process_encoding_the_union(two_ranks):
    ranks, encoded = two_ranks["shared"]
    assert_trains_as(ranks, RANK_SEQUENCES)
    union = sorted({i for sequences in RANK_SEQUENCES for s in sequences for i in s})
    assert ranks["union"] == union
    assert sorted(encoded[0] + encoded[1]) == union  # every item once, by one rank
    assert abs(len(encoded[0]) - len(encoded[1])) <= 1  # and the work split evenly
    for r, ids in enumerate(encoded):  # each rank encodes only items its own batch holds (their content is there)
        assert set(ids) <= {i for s in RANK_SEQUENCES[r] for i in s}


@pytest.mark.parametrize("step", ["empty-shared", "empty-unshared"])
def test_a_rank_with_an_empty_batch_adds_nothing_and_dilutes_nothing(two_ranks, step):
    """Rank 1's samples were all bad: it steps with the others (the collectives), with an empty batch. The step
    is rank 0's batch alone, as one process would train it: the loss is normalized by the global positions,
    so the average over two ranks is not halved, whether the ranks share their items or not."""
    sequences, _ = STEPS[step]
    ranks, encoded = two_ranks[step]
    assert_trains_as(ranks, sequences)
    assert ranks["positions"] == sum(len(s) - 1 for s in RANK_SEQUENCES[0])
    assert encoded[1] == []


def test_owners_hold_their_items_and_balance():
    rng = np.random.default_rng(0)
    for world in (2, 3, 8):
        holders = rng.random((world, 500)) < rng.uniform(0.05, 0.9, (world, 1))
        holders[rng.integers(world, size=500), np.arange(500)] = True  # every item has a holder
        owner = assign_owners(holders)
        assert holders[owner, np.arange(500)].all()
        load = np.bincount(owner, minlength=world)
        # balanced: no item could move from its owner to one of its holders with 2 fewer items
        lightest_holder = np.where(holders, load[:, None], np.iinfo(np.int64).max).min(0)
        assert (lightest_holder >= load[owner] - 1).all()
        if world == 2:
            assert load.max() - load.min() <= 1 or load.min() == holders.sum(1).min()
        assert np.array_equal(owner, assign_owners(holders))  # every rank computes the same
    assert NUM_ITEMS > max(i for sequences in RANK_SEQUENCES for s in sequences for i in s)
