"""What the trainer iterates: `TrainLoader` (this rank's shuffled part, resumable) and `EvalLoader`.

Ranks: mosaicml-streaming partitions by the RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE environment
variables. torchrun and Ray Train set them; where they are unset, TrainLoader sets them from its rank and
world_size arguments, assuming one node. With WORLD_SIZE > 1, create the loader after torch.distributed
is initialized (streaming otherwise initializes a process group itself, from MASTER_ADDR / MASTER_PORT).
One TrainLoader per dataset per process: streaming allows one live dataset per local directory (`close()`
releases it).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import math
import os
import queue
import signal
import sys
import tempfile
import threading
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.format import reader_from_json
from streaming.base.storage import CloudDownloader
from torch.utils.data import DataLoader

from transrec.config import DataConfig
from transrec.dataloading.bad_data import (
    BLANKED, NO_BAD_ITEMS, BadRecord, BadRecordLog, check_sample, find_bad_items, log, stop,
)
from transrec.batch import Batch, EvalBatch
from transrec.dataloading.collate import HELD_OUT, TrainCollator, collate_eval
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.dataset_format import MANIFEST, DataError, DatasetFileError
from transrec.dataloading.dataset_format import read_manifest
from transrec.dataloading.item_store import ITEM_MODES, ItemStore
from transrec.dataloading.videos import VideoDecoder
from transrec.dataloading.dataset_format import MIN_INTERACTIONS, unpack_sequences

STREAMED_SPLIT = "train/"  # a remote dataset's train shards stream; every other file is fetched up front


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def local_dataset_dir(path: str | Path, cache_dir: str = "") -> Path:
    """A local dataset directory as is; for a remote one (s3://, gs://...) a local copy of everything but the
    train shards (manifest, items, tokenizer, eval shards), fetched once into `cache_dir`."""
    if not is_remote(path):
        return Path(path)
    root = str(path).rstrip("/")
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "transrec-cache")
    local = cache / hashlib.sha1(root.encode()).hexdigest()[:16]
    CloudDownloader.direct_download(f"{root}/{MANIFEST}", str(local / MANIFEST))
    for relpath in read_manifest(local)["files"]:
        if not relpath.startswith(STREAMED_SPLIT):
            CloudDownloader.direct_download(f"{root}/{relpath}", str(local / relpath))
    return local


def _use_rank(rank: int, world_size: int) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", rank),
                        ("LOCAL_WORLD_SIZE", world_size)):
        os.environ.setdefault(name, str(value))
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        if int(os.environ[name]) != value:
            raise ValueError(f"the environment says {name}={os.environ[name]}, the loader was given {value}")


# beside what it guards: streaming's shared memory is the machine's, whatever TMPDIR each job has
SHM_LOCK = (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())) / "transrec-streaming.lock"


@contextlib.contextmanager
def shm_registration_turn() -> Iterator[None]:
    """A StreamingDataset registers itself in shared memory under the first free prefix it finds: two jobs
    starting together on one machine can pick the same one (FileExistsError: /000012_locals). The local
    leaders (LOCAL_RANK 0, the ranks that register) of all jobs on the machine take turns; the others
    follow their leader through streaming's barriers."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        yield
        return
    with open(SHM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def die_with_parent(parent: int, _worker_id: int) -> None:
    """A DataLoader worker's init: SIGKILLed when the process that forked it dies. A forked worker holds
    every socket of that process, Ray's connection to its raylet included: a worker that outlives a killed
    rank (blocked in streaming's shared-memory barrier, say) keeps Ray from ever seeing that rank die, and
    the run from restarting."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


class _SequenceShards(StreamingDataset):
    """The train shards, whose samples are blocks of sequences (dataset_format.py). A sample comes as the list of its
    sequences {"user", "items", "sample_id", "file"}; one in a shard of `bad_shards` is not read, and one that
    cannot be read raises nothing: both come as [{"sample_id", "bad": BadRecord}], for the collate to skip."""

    files: list[str] = []  # per shard, for messages
    bad_shards: dict[int, str] = {}  # shard index -> what is wrong with it

    def get_item(self, sample_id: int, retry: int = 7) -> list[dict[str, Any]]:
        shard, _ = self.spanner[sample_id]
        file = self.files[shard]
        if shard in self.bad_shards:
            bad = BadRecord("bad_shard", file, f"sample {sample_id}", self.bad_shards[shard])
            return [{"sample_id": int(sample_id), "bad": bad}]
        return read_sequences(partial(StreamingDataset.get_item, self, sample_id, retry), sample_id, file)


def read_sequences(read: Callable[[], dict], sample_id: int, file: str) -> list[dict]:
    """The sequences {"user", "items", "sample_id", "file"} of the sample `read()` returns (a train sample
    holds a block of them, an eval sample one), or [{"sample_id", "bad": BadRecord}] if it does not decode."""
    try:
        sample = read()
        sequences = unpack_sequences(sample) if "users" in sample else [sample]
    except RuntimeError:
        raise  # streaming's own failure (a shard it cannot fetch, a dead thread): not one record's
    except Exception as err:  # the bytes of this sample do not decode
        bad = BadRecord("unreadable", file, f"sample {sample_id}", f"cannot be read: {err!r}")
        return [{"sample_id": int(sample_id), "bad": bad}]
    return [{**sequence, "sample_id": int(sample_id), "file": file} for sequence in sequences]


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Prefetcher:
    """Pulls items from `source` and applies `finish` in a background thread, up to `depth` items ahead,
    so that image and clip decoding overlaps the model's step. Errors are re-raised in the consumer; so is a
    wait of more than `stall_timeout_s` for the next item (a stalled source)."""

    def __init__(self, source: Iterator, finish: Callable[[Any], Any], depth: int, stall_timeout_s: float):
        self._source, self._finish, self._stall_timeout_s = source, finish, stall_timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transrec-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(self._finish(item)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            try:
                item = self._queue.get(timeout=self._stall_timeout_s)
            except queue.Empty:
                raise RuntimeError(f"no train batch in {self._stall_timeout_s:g} s (data.stall_timeout_s): a loader "
                                   f"worker died or hangs") from None
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._stall_timeout_s)  # a thread stuck in a stalled source is left behind
        self._source = None  # drops the DataLoader iterator, which shuts its workers down


class TrainLoader:
    """Batches of this rank's part of the train sequences, images and clips decoded ahead of the model (a clip's
    frames drawn anew each epoch, from the train seed, the epoch and the item: `videos.sample_frames`).

    Call `set_epoch(e)` before iterating epoch e (a different epoch starts from its beginning; the current
    one keeps its position, so after `load_state_dict` iterating yields exactly the rest of that epoch).
    `state_dict()` counts only the batches handed out, not those prefetched.

    Bad records (see bad_data.py): checked before training, then skipped and counted in `skipped` (this
    epoch's counts by kind, logged at its end); `found` counts what the pre-flight check found. A batch whose
    every sample is bad is handed out empty, and counted: the ranks step together, and its rank takes part in
    its step with nothing to learn (trainer/item_sharing.py).
    """

    def __init__(self, data_cfg: DataConfig, dataset_dir: str | Path, batch_size: int, max_seq_len: int,
                 num_negatives: int, seed: int, rank: int, world_size: int, decoder: ImageDecoder | None,
                 mode: str = "mom", prefetch_batches: int = 2, verify: str = "full", negatives: str = "inbatch",
                 sampled_negatives: int = 0, cloze_prob: float = 0.0, video_decoder: VideoDecoder | None = None):
        if mode not in ITEM_MODES:
            raise ValueError(f"item mode must be one of {ITEM_MODES}, got {mode!r}")
        _use_rank(rank, world_size)
        self.data_cfg, self.max_seq_len = data_cfg, max_seq_len
        self.num_negatives, self.seed, self.world_size = num_negatives, seed, world_size
        self.decoder, self.video_decoder = decoder, video_decoder
        self.mode, self.prefetch_batches = mode, prefetch_batches
        self.negatives, self.sampled_negatives = negatives, sampled_negatives  # what else a batch holds (collate)
        self.cloze_prob = cloze_prob
        self.policy = data_cfg.on_bad_record
        self.local_dir = local_dataset_dir(dataset_dir, data_cfg.cache_dir)
        streamed = (STREAMED_SPLIT,) if is_remote(dataset_dir) else ()
        tolerated = (STREAMED_SPLIT,) if self.policy == "skip" else ()  # a bad train shard is skipped
        self.store = ItemStore(self.local_dir, verify=verify, unverified=streamed, tolerate=tolerated)
        self.blocks_per_batch = self._blocks_per_batch(batch_size)
        remote = f"{str(dataset_dir).rstrip('/')}/train" if is_remote(dataset_dir) else None
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        with shm_registration_turn():
            # predownload and shuffle_block_size are streaming's defaults, said out loud (it logs them otherwise)
            self._stream = _SequenceShards(remote=remote, local=str(self.local_dir / "train"), shuffle=True,
                                           shuffle_seed=data_cfg.shuffle_seed, batch_size=self.blocks_per_batch,
                                           num_canonical_nodes=nodes, predownload=8 * self.blocks_per_batch,
                                           shuffle_block_size=max(4_000_000 // nodes, 1 << 18))
        self._check_data(scan_sequences=remote is None)
        self._bad = BadRecordLog()
        self.epoch = 0
        self._samples_in_epoch = 0  # handed out in this epoch by all ranks (ranks step in lockstep)
        # the shuffle's shape, fixed by the run that started the training (streaming's default for py1e)
        self._canonical_nodes, self._initial_nodes = nodes, nodes

    def _blocks_per_batch(self, batch_size: int) -> int:
        """Train samples per batch: each holds the manifest's `users_per_sample` sequences (dataset_format.py)."""
        users_per_sample = self.store.manifest["users_per_sample"]
        if batch_size % users_per_sample:
            raise ValueError(f"batch size {batch_size} is not a multiple of users_per_sample={users_per_sample}, "
                             f"the train sequences per sample of {self.local_dir / MANIFEST}")
        return batch_size // users_per_sample

    def _check_data(self, scan_sequences: bool) -> None:
        """The pre-flight check (bad_data.py): stops with on_bad_record=stop, else sets up the skipping."""
        shard_files = [f"{STREAMED_SPLIT}{shard.raw_data.basename}" for shard in self._stream.shards]
        problems = self.store.file_problems  # tolerated ones: train files, with on_bad_record=skip
        for relpath, problem in problems.items():
            if relpath not in shard_files:  # an index.json
                raise DatasetFileError(problem)
        self._stream.files = [str(self.local_dir / f) for f in shard_files]
        self._stream.bad_shards = {i: problems[f] for i, f in enumerate(shard_files) if f in problems}
        self.bad_items, found = find_bad_items(self.store, self.mode)
        found += [BadRecord("bad_shard", self._stream.files[i], "shard", problem)
                  for i, problem in self._stream.bad_shards.items()]
        if self.policy == "stop":
            if scan_sequences:
                sequences = _ShardedSequences(self.local_dir / "train")
                checks = (check_sample(sample, self.store.num_items, NO_BAD_ITEMS) for sample in sequences)
                found += [bad for bad in checks if bad]
            stop(found, self.local_dir)
        self.found = dict(Counter(record.kind for record in found))
        if found:
            log.warning("%s: %d bad record(s) %s; the samples holding them will be skipped. First: %s",
                        self.local_dir, len(found), self.found, "; ".join(map(str, found[:3])))

    @property
    def skipped(self) -> dict[str, int]:
        """This epoch's skipped records by kind (bad_data.KINDS)."""
        return dict(self._bad.counts)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(self._stream.length / self.blocks_per_batch)

    @property
    def epoch_finished(self) -> bool:
        """Every sample of the epoch has been handed out (also when the consumer stopped at the last batch)."""
        return self._samples_in_epoch >= self._stream.length * self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._samples_in_epoch = epoch, 0
            self._bad.reset()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self._samples_in_epoch, "streaming": self._stream_state(),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._samples_in_epoch = int(state["epoch"]), int(state["samples_in_epoch"])
        self._bad = BadRecordLog(state.get("skipped"))
        stream = state["streaming"]
        if stream["shuffle_seed"] != self.data_cfg.shuffle_seed:
            raise ValueError(f"the checkpoint's shuffle_seed is {stream['shuffle_seed']}, "
                             f"the config's {self.data_cfg.shuffle_seed}")
        self._canonical_nodes, self._initial_nodes = stream["num_canonical_nodes"], stream["initial_physical_nodes"]

    def _stream_state(self) -> dict:
        """StreamingDataset's resume state for our epoch and position. Built, never read from streaming: its
        shared memory is shared by the ranks of a node, so reading it races with another rank's write."""
        return {"epoch": self.epoch, "sample_in_epoch": self._samples_in_epoch,
                "num_canonical_nodes": self._canonical_nodes, "shuffle_seed": self.data_cfg.shuffle_seed,
                "initial_physical_nodes": self._initial_nodes}

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_finished:
            return
        # streaming starts each __iter__ from its resume state: point it at our epoch and position. Every
        # rank of a node writes the same state before its own workers read it, so the writes agree.
        self._stream.load_state_dict(self._stream_state())
        self._stream.next_epoch = self.epoch  # else a state older than streaming's epoch count is ignored
        collator = TrainCollator(self.store, self.max_seq_len, self.num_negatives, self.seed, self.epoch,
                                 self.mode, self.data_cfg.train_window, self.bad_items, self.negatives,
                                 self.sampled_negatives, self.cloze_prob)
        workers = self.data_cfg.loader_workers
        batches = DataLoader(self._stream, batch_size=self.blocks_per_batch, num_workers=workers,
                             collate_fn=collator, worker_init_fn=partial(die_with_parent, os.getpid()))
        # A DataLoader draws its workers' base seed from torch's global RNG when it starts iterating: at an
        # epoch's start in an uninterrupted run, but mid-epoch after a resume, which would shift every later
        # dropout mask. The data side never moves the model's random stream.
        with torch.random.fork_rng(devices=[]):
            started = iter(batches)
        prefetcher = _Prefetcher(started, self._decode, self.prefetch_batches, self.data_cfg.stall_timeout_s)
        try:
            for batch in prefetcher:
                self._samples_in_epoch += batch.stream_samples * self.world_size
                for record in batch.skipped:
                    self._bad.add(record)
                if len(batch.users) == 0:
                    self._bad.add(BadRecord("empty_batch", str(self.local_dir / "train"),
                                            f"a batch of epoch {self.epoch}",
                                            f"all its {len(batch.skipped)} samples were bad; it trains nothing"))
                yield batch
            if any(self.skipped.values()):
                log.warning("epoch %d: skipped %s", self.epoch, {k: v for k, v in self.skipped.items() if v})
        finally:
            prefetcher.close()

    def _decode(self, batch: Batch) -> Batch:
        problems = self.store.decode(batch.items, self.decoder, self.video_decoder, frame_seed=(self.seed, self.epoch))
        batch.skipped += [BadRecord(BLANKED[modality], str(self.store.content_file(modality)), f"item {e.item_id}",
                                    f"{str(e).removeprefix(f'item {e.item_id}: ')}; shown blank")
                          for modality, e in problems]
        return batch

    def close(self) -> None:
        """Releases the streaming dataset, so that another loader may open the same directory."""
        self._stream = None
        gc.collect()


class _ShardedSequences:
    """An MDS split without StreamingDataset (no partitioning, no shared memory), so that any number of
    evaluation loaders may be open at once. Iterating reads shard by shard, each shard file at once, and
    yields the sequences of every sample (see `read_sequences`); indexing returns sample `i` as stored (an
    eval sample is one sequence)."""

    def __init__(self, split_dir: Path):
        self.split_dir = Path(split_dir)
        index = json.loads((split_dir / "index.json").read_text())
        self._shards = [reader_from_json(str(split_dir), None, info) for info in index["shards"]]
        self._starts = np.cumsum([0] + [shard.samples for shard in self._shards])

    def __iter__(self) -> Iterator[dict]:
        for shard, start in zip(self._shards, self._starts):
            file = str(self.split_dir / shard.raw_data.basename)
            data = Path(file).read_bytes()
            offsets = np.frombuffer(data, np.uint32, shard.samples + 1, offset=4)
            for i in range(shard.samples):
                sample = partial(shard.decode_sample, data[offsets[i]:offsets[i + 1]])
                yield from read_sequences(sample, start + i, file)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._shards[shard].get_item(index - int(self._starts[shard]))


class EvalLoader:
    """EvalBatches of this rank's users (users rank::world_size). Every rank yields the same number of
    batches of the same sizes (padded with rows valid=False), as collective forward calls under ZeRO-3 need."""

    def __init__(self, dataset_dir: str | Path, split: str, batch_size: int, max_seq_len: int, rank: int,
                 world_size: int, cache_dir: str = ""):
        if split not in HELD_OUT:
            raise ValueError(f"split must be one of {list(HELD_OUT)}, got {split!r}")
        self.split, self.batch_size, self.max_seq_len = split, batch_size, max_seq_len
        local_dir = local_dataset_dir(dataset_dir, cache_dir)
        self._sequences = _ShardedSequences(local_dir / "eval")
        self.num_items = read_manifest(local_dir)["num_items"]
        self._mine = range(rank, len(self._sequences), world_size)  # O(1), however many users
        self._rows_per_rank = math.ceil(len(self._sequences) / world_size)  # the most any rank has

    def __len__(self) -> int:
        return math.ceil(self._rows_per_rank / self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        for start in range(0, self._rows_per_rank, self.batch_size):
            rows = min(self.batch_size, self._rows_per_rank - start)
            samples = [self._checked(int(i)) for i in self._mine[start:start + rows]]
            yield collate_eval(samples, self.split, self.max_seq_len, num_rows=rows)

    def _checked(self, index: int) -> dict:
        """Sample `index`, which must hold a train item, the valid and the test item, all in the catalogue:
        anything else would silently change every metric, so it stops the evaluation, naming the record."""
        sample = self._sequences[index]
        items = np.asarray(sample["items"])
        where = f"{self._sequences.split_dir}: sample {index} (user {sample['user']})"
        if len(items) < MIN_INTERACTIONS:
            raise DataError(f"{where} has {len(items)} items; evaluation needs {MIN_INTERACTIONS} "
                            "(train, valid, test)")
        if items.min() < 0 or items.max() >= self.num_items:
            raise DataError(f"{where} has item {items.max() if items.max() >= self.num_items else items.min()}, "
                            f"outside the catalogue's {self.num_items} items")
        return sample
