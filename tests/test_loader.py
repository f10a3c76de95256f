from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from transrec.network import free_port
from transrec.config import DataConfig
from transrec.dataloading.images import ImageDecodeError, ImageDecoder
from transrec.dataloading.loader import EvalLoader, TrainLoader, _ShardedSequences
from transrec.dataloading.dataset_format import USERS_PER_SAMPLE
from transrec.writers.synthetic import prepare_synthetic

BATCH, MAX_SEQ_LEN, NEGATIVES = 16, 6, 2
REPO = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def released_streaming_datasets():
    """One live StreamingDataset per directory per process: no test leaves one behind, even when it fails.
    (Not clean_stale_shared_memory(): it unlinks the shared memory of every streaming user of the machine.)"""
    yield
    gc.collect()


def make_loader(dataset: Path, workers: int = 1, decoder=None, mode: str = "mom") -> TrainLoader:
    return TrainLoader(DataConfig(loader_workers=workers), dataset, batch_size=BATCH, max_seq_len=MAX_SEQ_LEN,
                       num_negatives=NEGATIVES, seed=3, rank=0, world_size=1, decoder=decoder, mode=mode)


def fingerprint(batch) -> list[tuple]:
    """Per sequence: its id and the global ids of its negatives (what resumption must reproduce)."""
    ids = batch.items.ids
    return [(int(s), tuple(ids[batch.negatives[row][batch.history_mask[row]]].flatten().tolist()))
            for row, s in enumerate(batch.users)]


def test_one_epoch_covers_every_sequence_once_with_images(tiny_dataset):
    loader = make_loader(tiny_dataset, decoder=ImageDecoder(16, backend="dali"))
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # 120 sequences / 16
    ids = [i for b in batches for i in b.users.tolist()]
    assert sorted(ids) == list(range(120)) and ids != sorted(ids)  # all once, shuffled
    for batch in batches:
        assert batch.items.images.shape == (len(batch.items.image_rows), 3, 16, 16)
    assert loader.state_dict()["samples_in_epoch"] == 120 // USERS_PER_SAMPLE and list(loader) == []  # all done
    loader.close()


def test_batch_size_is_a_multiple_of_the_sequences_per_sample(tiny_dataset):
    with pytest.raises(ValueError, match=rf"batch size 12 is not a multiple of users_per_sample={USERS_PER_SAMPLE}, "
                                         rf"the train sequences per sample of .*manifest\.json"):
        TrainLoader(DataConfig(), tiny_dataset, batch_size=12, max_seq_len=MAX_SEQ_LEN, num_negatives=NEGATIVES,
                    seed=3, rank=0, world_size=1, decoder=None)


def test_jobs_on_one_machine_register_streaming_shared_memory_in_turn(tiny_dataset):
    """Two jobs starting together must not pick the same shared-memory prefix: a loader waits while another
    job's leader holds the registration lock, and starts when it is released."""
    import fcntl
    import threading

    from transrec.dataloading.loader import SHM_LOCK

    built = []
    with open(SHM_LOCK, "a") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: built.append(make_loader(tiny_dataset)))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not built  # waiting for its turn
        fcntl.flock(other_job, fcntl.LOCK_UN)
    thread.join(timeout=60)
    assert len(built) == 1 and len(list(built[0])) == 8
    built[0].close()


def test_epochs_reshuffle_deterministically(tiny_dataset):
    def epoch_orders() -> list[list[int]]:
        loader = make_loader(tiny_dataset, workers=0)
        orders = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            orders.append([i for b in loader for i in b.users.tolist()])
        loader.close()
        return orders

    first, again = epoch_orders(), epoch_orders()
    assert first == again and first[0] != first[1]
    assert sorted(first[0]) == sorted(first[1]) == list(range(120))


def test_resume_yields_exactly_the_rest_of_the_epoch(tiny_dataset):
    loader = make_loader(tiny_dataset, workers=2)
    loader.set_epoch(1)
    full = [fingerprint(b) for b in loader]
    loader.close()

    loader = make_loader(tiny_dataset, workers=2)
    loader.set_epoch(1)
    taken = []
    for batch in loader:  # more batches than these are prefetched: they must not count
        taken.append(fingerprint(batch))
        if len(taken) == 3:
            break
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["samples_in_epoch"] == 3 * BATCH // USERS_PER_SAMPLE
    loader.close()

    resumed = make_loader(tiny_dataset, workers=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    resumed.set_epoch(1)  # the trainer's usual call: the current epoch keeps its position
    rest = [fingerprint(b) for b in resumed]
    assert taken + rest == full
    resumed.set_epoch(2)
    assert sorted(s for b in resumed for s, _ in fingerprint(b)) == list(range(120))
    resumed.close()


def test_text_mode_sends_every_item_to_the_text_encoder(tiny_dataset):
    loader = make_loader(tiny_dataset, workers=0, decoder=ImageDecoder(16, backend="pil"), mode="text")
    batch = next(iter(loader))
    assert batch.items.text_rows.tolist() == list(range(len(batch.items.ids)))
    assert len(batch.items.image_rows) == 0 and batch.items.images.shape == (0, 3, 16, 16)
    loader.close()


def test_decode_errors_reach_the_trainer(tiny_dataset):
    class BrokenDecoder:
        def decode(self, jpegs, item_ids):
            raise ImageDecodeError(f"item {item_ids[0]}: cannot decode its image")

    loader = make_loader(tiny_dataset, decoder=BrokenDecoder())
    with pytest.raises(ImageDecodeError, match="item"):
        next(iter(loader))
    loader.close()


def test_a_hung_loader_worker_fails_the_rank_instead_of_hanging_it(tiny_dataset):
    """A loader worker that stops answering (here SIGSTOPped; in the wild, one killed mid-write, whose half-written
    pipe the DataLoader then reads forever) must fail the rank, so the group restarts from its checkpoint."""
    import psutil

    loader = TrainLoader(DataConfig(stall_timeout_s=2), tiny_dataset, batch_size=BATCH, max_seq_len=MAX_SEQ_LEN,
                         num_negatives=NEGATIVES, seed=3, rank=0, world_size=1, decoder=None)
    batches = iter(loader)
    next(batches)
    workers = psutil.Process().children()
    assert workers
    for worker in workers:
        worker.suspend()
    # without the stall timeout this would wait for ever: let the workers go on after a minute, so that a
    # regression fails below instead of hanging the suite
    resume = threading.Timer(60, lambda: [worker.resume() for worker in workers])
    resume.start()
    try:
        with pytest.raises(RuntimeError, match=r"no train batch in 2 s \(data.stall_timeout_s\)"):
            for _ in batches:  # what was decoded before the workers stopped comes first
                pass
    finally:
        resume.cancel()
        for worker in workers:
            worker.resume()
    for thread in threading.enumerate():  # the prefetch thread left waiting on them ends with its next batch
        if thread.name == "transrec-prefetch":
            thread.join(timeout=60)
            assert not thread.is_alive()
    loader.close()


RANK_SCRIPT = """
import json, sys
from transrec.network import free_port
from transrec.config import DataConfig
from transrec.dataloading.loader import TrainLoader
rank = int(sys.argv[2])
loader = TrainLoader(DataConfig(loader_workers=1), sys.argv[1], batch_size=16, max_seq_len=6, num_negatives=1,
                     seed=0, rank=rank, world_size=2, decoder=None)
print(json.dumps({"len": len(loader), "batches": [b.users.tolist() for b in loader]}))
"""


def test_two_ranks_read_disjoint_parts_covering_all(tmp_path):
    """128 users: 16 train samples, 8 per rank (with an odd count streaming would repeat one to even them)."""
    data = tmp_path / "data"
    prepare_synthetic(data, **{**TINY, "users": 128})
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(data), str(rank)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()  # no-op for a finished one; a hung rank must not outlive the test
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    parts = [[i for batch in r["batches"] for i in batch] for r in results]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(128))
    assert [len(r["batches"]) for r in results] == [r["len"] for r in results] == [4, 4]


ORPHAN_SCRIPT = """
import json, sys, time
import psutil
from transrec.config import DataConfig
from transrec.dataloading.collate import TrainCollator
from transrec.dataloading.loader import TrainLoader
collate, calls = TrainCollator.__call__, [0]
def blocked_after_the_first(self, samples):  # (in the worker: as one stuck in streaming's barrier)
    calls[0] += 1
    if calls[0] > 1:
        time.sleep(300)
    return collate(self, samples)
TrainCollator.__call__ = blocked_after_the_first
loader = TrainLoader(DataConfig(loader_workers=1), sys.argv[1], batch_size=16, max_seq_len=6, num_negatives=1,
                     seed=0, rank=0, world_size=1, decoder=None)
batches = iter(loader)
next(batches)  # (kept: a closed iterator would join the blocked worker)
me = psutil.Process()
print(json.dumps([c.pid for c in me.children() if c.cmdline() == me.cmdline()]), flush=True)
time.sleep(300)
"""


def test_a_loader_worker_dies_with_its_rank(tmp_path):
    """A rank SIGKILLed while its DataLoader worker is blocked: the worker dies with it at once (else it keeps
    the rank's sockets open, and Ray never sees the rank die). Its own data set: the killed rank's streaming
    state stays behind."""
    import psutil

    prepare_synthetic(tmp_path / "data", **TINY)
    rank = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path / "data")], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    workers = []
    try:
        workers = [psutil.Process(pid) for pid in json.loads(rank.stdout.readline())]
        assert len(workers) == 1
        rank.kill()
        rank.wait()
        _, alive = psutil.wait_procs(workers, timeout=3)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        rank.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def test_eval_ranks_get_equal_batches_covering_every_user(tiny_dataset):
    sequences = _ShardedSequences(tiny_dataset / "eval")
    seen_users = []
    shapes = []
    for rank in range(3):
        loader = EvalLoader(tiny_dataset, "test", batch_size=16, max_seq_len=MAX_SEQ_LEN, rank=rank, world_size=3)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 40 users per rank
        shapes.append([tuple(b.target.shape) for b in batches])
        for batch in batches:
            for row in np.flatnonzero(batch.valid.numpy()):
                user = int(batch.users[row])
                items = sequences[user]["items"]
                assert batch.target[row] == items[-1]
                history = batch.history[row][batch.history_mask[row]]
                assert history.tolist() == items[:-1][-MAX_SEQ_LEN:].tolist()
                seen = batch.seen[row]
                assert sorted(seen[seen >= 0].tolist()) == sorted(items[:-1].tolist())
                seen_users.append(user)
    assert shapes[0] == shapes[1] == shapes[2] == [(16,), (16,), (8,)]
    assert sorted(seen_users) == list(range(120))


def test_eval_pads_ranks_with_fewer_users(tiny_dataset):
    loaders = [EvalLoader(tiny_dataset, "valid", batch_size=32, max_seq_len=4, rank=r, world_size=7) for r in range(7)]
    batches = [list(loader) for loader in loaders]  # 120 users over 7 ranks: 18 or 17 each
    assert {len(b) for b in batches} == {1} and {tuple(b[0].target.shape) for b in batches} == {(18,)}
    assert sum(int(b[0].valid.sum()) for b in batches) == 120
    assert batches[-1][0].valid.tolist() == [True] * 17 + [False]
    assert torch.all(batches[-1][0].history_mask.any(1))  # no all-masked row, padding included


def test_train_and_eval_stream_from_s3_like_the_local_copy(tiny_dataset, s3_bucket, tmp_path):
    client, bucket = s3_bucket
    for path in tiny_dataset.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"sets/tiny/{path.relative_to(tiny_dataset)}")
    remote, cache = f"s3://{bucket}/sets/tiny", tmp_path / "cache"

    streamed = TrainLoader(DataConfig(loader_workers=1, cache_dir=str(cache)), remote, batch_size=BATCH,
                           max_seq_len=MAX_SEQ_LEN, num_negatives=NEGATIVES, seed=3, rank=0, world_size=1,
                           decoder=None)
    from_s3 = [fingerprint(b) for b in streamed]
    streamed.close()
    local = make_loader(tiny_dataset)
    assert from_s3 == [fingerprint(b) for b in local]  # the same epoch, sample for sample
    local.close()
    # the train shards came through streaming's cache, the rest was fetched once and checked against the manifest
    cached = {p.relative_to(next(cache.iterdir())).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert {"manifest.json", "items/tokens.npy", "train/index.json"} <= cached
    assert any(name.startswith("train/") and name.endswith(".mds") for name in cached)

    evaluated = [b.target.tolist() for b in EvalLoader(remote, "test", 64, MAX_SEQ_LEN, 0, 1, cache_dir=str(cache))]
    assert evaluated == [b.target.tolist() for b in EvalLoader(tiny_dataset, "test", 64, MAX_SEQ_LEN, 0, 1)]
