"""`DatasetWriter`, the one writer of the dataset format (dataloading/dataset_format.py describes it), used by
every source (writers/movielens.py, writers/synthetic.py), and `SequenceWriter`, which writes one part of
the sequences (in another process, for large synthetic data sets).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from streaming import MDSWriter
from streaming.base.util import merge_index

from transrec.batch import IMAGE, TEXT, VIDEO
from transrec.dataloading.dataset_format import (EVAL_COLUMNS, FORMAT_VERSION, MANIFEST, MIN_INTERACTIONS,
                                                 SPLIT_RULE, TRAIN_COLUMNS, USER_ATTRIBUTES, DataError,
                                                 UserAttribute, dump_user_attributes, load_tokenizer,
                                                 pack_sequences)
from transrec.fileio import describe_files

SHARD_SIZE_LIMIT = "64mb"
TOKENIZE_CHUNK = 4096  # items tokenized per call: bounds memory for large catalogues
POPULARITY_BATCH = 10_000  # sequences whose items are counted together


@dataclass
class ItemRecord:
    source_id: str
    text: str  # tokenized for every item, whatever its modality
    modality: int  # TEXT, IMAGE or VIDEO
    jpeg: bytes | None  # the image of an IMAGE item; None for the others
    clip: bytes | None = None  # the clip (WebM) of a VIDEO item; None for the others
    clip_frames: int = 0  # the frames of that clip


def choose_modalities(num_items: int, image_fraction: float, seed: int, video_fraction: float = 0.0) -> np.ndarray:
    """int8 [N]: exactly round(image_fraction * N) IMAGE items, then round(video_fraction * N) VIDEO items, picked
    in that order along one seeded permutation (a video share leaves the image items of a seed as they were)."""
    for name, fraction in (("image_fraction", image_fraction), ("video_fraction", video_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    images, videos = round(image_fraction * num_items), round(video_fraction * num_items)
    if images + videos > num_items:
        raise ValueError(f"image_fraction {image_fraction} + video_fraction {video_fraction} exceed 1")
    modality = np.full(num_items, TEXT, np.int8)
    order = np.random.default_rng(seed).permutation(num_items)
    modality[order[:images]] = IMAGE
    modality[order[images:images + videos]] = VIDEO
    return modality


class SequenceWriter:
    """Writes users' chronological sequences (item indices) as MDS shards: `train/PART` gets each sequence
    minus its last two items, `users_per_sample` to a sample; `eval/PART` all of it, one per sample. Counts
    what it wrote; `part` "" = the split itself."""

    def __init__(self, root: Path, num_items: int, part: str = "", first_user: int = 0, users_per_sample: int = 1):
        if users_per_sample < 1:
            raise ValueError(f"users_per_sample must be 1 or more, got {users_per_sample}")
        self.train, self.eval = (MDSWriter(out=str(Path(root) / split / part), columns=columns,
                                           size_limit=SHARD_SIZE_LIMIT)
                                 for split, columns in (("train", TRAIN_COLUMNS), ("eval", EVAL_COLUMNS)))
        self.part, self.num_items, self.first_user = part, num_items, first_user
        self.users_per_sample = users_per_sample
        self._block: tuple[list[int], list[np.ndarray]] = ([], [])  # train sequences of the next sample
        self.num_users = self.num_interactions = self.short_users = 0
        self.popularity = np.zeros(num_items, np.int64)
        self._counted: list[np.ndarray] = []  # train items not yet in popularity (bincount in bulk: faster)

    def add(self, items: np.ndarray, train: bool = True) -> bool:
        """Writes one sequence; a too-short one is counted in short_users and not written. With `train` False
        the user is evaluated but not trained on (its train part is neither written nor counted)."""
        items = np.asarray(items, np.int64)
        if len(items) < MIN_INTERACTIONS:
            self.short_users += 1
            return False
        if items.min() < 0 or items.max() >= self.num_items:
            raise ValueError(f"sequence holds an item outside 0..{self.num_items - 1} (write_items first)")
        user = self.first_user + self.num_users
        if train:
            self._block[0].append(user)
            self._block[1].append(items[:-2])
            if len(self._block[0]) == self.users_per_sample:
                self._write_block()
            self._counted.append(items[:-2])
            if len(self._counted) >= POPULARITY_BATCH:
                self._count_popularity()
        self.eval.write({"user": user, "items": items})
        self.num_users += 1
        self.num_interactions += len(items)
        return True

    def _write_block(self) -> None:
        if self._block[0]:
            self.train.write(pack_sequences(*self._block))
            self._block = ([], [])

    def _count_popularity(self) -> None:
        if self._counted:
            self.popularity += np.bincount(np.concatenate(self._counted), minlength=self.num_items)
            self._counted = []

    def close(self) -> dict:
        """Finishes the shards (and their index.json); returns the counts, as DatasetWriter.add_part takes them."""
        self._write_block()
        self.train.finish()
        self.eval.finish()
        self._count_popularity()
        return {"part": self.part, "num_users": self.num_users, "num_interactions": self.num_interactions,
                "short_users": self.short_users, "popularity": self.popularity}


class DatasetWriter:
    """Writes one dataset directory atomically.

    Use as a context manager: `write_items` once, then the sequences, either `add_sequence` per user
    (chronological item indices) or, from other processes, a `SequenceWriter(writer.tmp, num_items, part)`
    per part whose `close()` result goes to `add_part`; then, where the source has them, `write_user_attributes`;
    then `commit(**manifest_fields)` renames the
    finished temp dir to `out`. On an exception the temp dir is removed and `out` is untouched.
    """

    def __init__(self, out: str | Path, tokenizer: str, max_text_len: int, overwrite: bool = False,
                 users_per_sample: int = 1):
        self.out = Path(out).absolute()
        self.users_per_sample = users_per_sample
        self.overwrite = overwrite
        self._check_target()
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_text_len = max_text_len
        self.num_items = 0
        self.num_users = 0
        self.num_interactions = 0
        self.skipped = Counter({"short_users": 0})
        self._popularity = np.zeros(0, np.int64)
        self._modality_counts = {"text": 0, "image": 0, "video": 0}
        self._sequences: SequenceWriter | None = None  # add_sequence's writer, opened on first use
        self._parts: list[str] = []

    def _check_target(self) -> None:
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True to replace it")

    def __enter__(self) -> "DatasetWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / "items").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish_sequences()
        shutil.rmtree(self.tmp, ignore_errors=True)  # after commit it no longer exists

    def write_items(self, records: Iterable[ItemRecord], num_items: int) -> None:
        """Tokenizes every item's text and stores the JPEGs of image items and the clips of video items, in record
        order (= item index)."""
        items_dir = self.tmp / "items"
        tokens = np.lib.format.open_memmap(items_dir / "tokens.npy", "w+", np.int32, (num_items, self.max_text_len))
        lengths = np.zeros(num_items, np.int32)
        modality = np.zeros(num_items, np.int8)
        offsets = np.zeros(num_items + 1, np.int64)
        video_offsets = np.zeros(num_items + 1, np.int64)
        video_frames = np.zeros(num_items, np.int32)
        count = 0
        with (open(items_dir / "images.bin", "wb") as images, open(items_dir / "videos.bin", "wb") as videos,
              open(items_dir / "items.jsonl", "w") as listing):
            for chunk in _chunks(records, TOKENIZE_CHUNK):
                if count + len(chunk) > num_items:
                    raise ValueError(f"more than the announced {num_items} item records")
                rows = slice(count, count + len(chunk))
                tokens[rows], lengths[rows] = self._tokenize([r.text for r in chunk])
                for index, record in enumerate(chunk, start=count):
                    modality[index] = record.modality
                    if record.modality == IMAGE:
                        images.write(record.jpeg)
                    elif record.modality == VIDEO:
                        if not record.clip or record.clip_frames < 1:
                            raise ValueError(f"item {record.source_id}: a video item needs a clip of 1 or more frames")
                        videos.write(record.clip)
                        video_frames[index] = record.clip_frames
                    offsets[index + 1], video_offsets[index + 1] = images.tell(), videos.tell()
                    listing.write(json.dumps({"index": index, "source_id": record.source_id, "text": record.text,
                                              "modality": int(record.modality)}) + "\n")
                count += len(chunk)
        if count != num_items:
            raise ValueError(f"{count} item records, {num_items} announced")
        tokens.flush()
        del tokens
        np.save(items_dir / "token_lengths.npy", lengths)
        np.save(items_dir / "modality.npy", modality)
        np.save(items_dir / "image_offsets.npy", offsets)
        np.save(items_dir / "video_offsets.npy", video_offsets)
        np.save(items_dir / "video_frames.npy", video_frames)
        self.num_items = num_items
        self._popularity = np.zeros(num_items, np.int64)
        self._modality_counts = {name: int((modality == code).sum())
                                 for name, code in (("text", TEXT), ("image", IMAGE), ("video", VIDEO))}

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_text_len, padding="max_length",
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].sum(1).astype(np.int32)

    def add_sequence(self, items: np.ndarray, train: bool = True) -> bool:
        """Writes one user's chronological sequence; a too-short one is counted in skipped and not written.
        `train` False: evaluated only (SequenceWriter.add)."""
        if self._sequences is None:
            if self._parts:
                raise ValueError("add_sequence after add_part: a dataset is written one way or the other")
            self._sequences = SequenceWriter(self.tmp, self.num_items, users_per_sample=self.users_per_sample)
        return self._sequences.add(items, train)

    def add_part(self, counts: dict) -> None:
        """Takes a part written by `SequenceWriter(self.tmp, num_items, part, first_user, users_per_sample)` (its
        close() result)."""
        if self._sequences is not None or not counts["part"]:
            raise ValueError("add_part takes named parts, and no add_sequence beside them")
        self._parts.append(counts["part"])
        self._add_counts(counts)

    def _add_counts(self, counts: dict) -> None:
        self.num_users += counts["num_users"]
        self.num_interactions += counts["num_interactions"]
        self.skipped["short_users"] += counts["short_users"]
        self._popularity += counts["popularity"]

    def write_user_attributes(self, attributes: dict[str, UserAttribute]) -> None:
        """Every user's attributes, codes in the order the users' sequences were written: after the last one."""
        self._finish_sequences()  # the sequences end here: how many users there are is known
        for name, attribute in attributes.items():
            if len(attribute.codes) != self.num_users:
                raise ValueError(f"user attribute {name!r} has {len(attribute.codes)} values, for "
                                 f"{self.num_users} users")
        path = self.tmp / USER_ATTRIBUTES
        path.parent.mkdir(exist_ok=True)
        path.write_text(dump_user_attributes(attributes))

    def _finish_sequences(self) -> None:
        if self._sequences is not None:
            self._add_counts(self._sequences.close())
            self._sequences = None

    def commit(self, name: str, source: str, synthetic_images: bool, image_fraction: float,
               skipped: dict | None = None, sources: dict | None = None, synthetic_videos: bool = False,
               video_fraction: float = 0.0, **extra) -> dict:
        """Finishes every file, writes the manifest and renames the directory into place. Returns the manifest."""
        self._finish_sequences()  # the MDS shards and their index.json
        if self.num_users == 0:
            raise DataError(f"{name}: no user has {MIN_INTERACTIONS} or more interactions")
        for split in ("train", "eval"):  # parts written in parallel: one index per split over all of them
            if self._parts:
                merge_index([str(self.tmp / split / part / "index.json") for part in self._parts],
                            str(self.tmp / split))
        np.save(self.tmp / "items" / "popularity.npy", self._popularity)
        self.tokenizer.save_pretrained(self.tmp / "tokenizer")
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "source": source,
            "synthetic_images": synthetic_images,
            "synthetic_videos": synthetic_videos,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "users_per_sample": self.users_per_sample,
            "modality_counts": self._modality_counts,
            "tokenizer": self.tokenizer_name,
            "max_text_len": self.max_text_len,
            "image_fraction": image_fraction,
            "video_fraction": video_fraction,
            "split": SPLIT_RULE,
            "skipped": {**(skipped or {}), **self.skipped},
            "sources": sources or {},
            **extra,
            "files": describe_files(self.tmp),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self._move_into_place()
        return manifest

    def _move_into_place(self) -> None:
        self._check_target()
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        os.replace(self.out, old / "dataset")
        os.replace(self.tmp, self.out)
        shutil.rmtree(old)


def _chunks(records: Iterable[ItemRecord], size: int) -> Iterator[list[ItemRecord]]:
    chunk: list[ItemRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
