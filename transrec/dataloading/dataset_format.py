"""The dataset format, read and written by every part of transrec: its version, files, columns, manifest,
errors, the tokenizer a data set carries, and how a train sample packs its block of sequences. Written only
by `transrec.writers.dataset_writer.DatasetWriter`; importable without streaming or transformers (the CLI's).


```
DIR/manifest.json            counts, tokenizer, split rule, skipped rows, sha256 of sources and of every file
DIR/tokenizer/               tokenizer.save_pretrained(): the dataset is self-contained
DIR/items/modality.npy       int8 [N]: 0 = text, 1 = image, 2 = video
DIR/items/tokens.npy         int32 [N, max_text_len], right-padded with the tokenizer's pad id
DIR/items/token_lengths.npy  int32 [N]
DIR/items/image_offsets.npy  int64 [N+1]: item i's JPEG = images.bin[off[i]:off[i+1]] (empty for text items)
DIR/items/images.bin         concatenated JPEG bytes
DIR/items/video_offsets.npy  int64 [N+1]: item i's clip = videos.bin[off[i]:off[i+1]] (empty for other items)
DIR/items/videos.bin         concatenated clips, each a WebM file (VP9) as encoded: no frame is stored decoded
DIR/items/video_frames.npy   int32 [N]: the frames of item i's clip (0 for other items)
DIR/items/popularity.npy     int64 [N]: occurrences of each item in the train part of all sequences
DIR/items/items.jsonl        {"index", "source_id", "text", "modality"} per item, for humans
DIR/train/                   MDS shards of blocks {"users", "lengths", "items"}: up to `users_per_sample`
                             sequences per sample, each minus its last two items, concatenated
DIR/eval/                    MDS shards {"user", "items"}: the full sequence (valid = items[-2], test = items[-1])
DIR/users/attributes.json    (where the source has them) {name: {"classes": [...], "codes": [...]}}: per user
                             attribute, user u's class is classes[codes[u]] (UserAttribute; -1 = unknown)
```
A train sample holds a block of sequences because streaming's per-epoch partition and shuffle are int64 arrays
over all samples, built in every loader worker: blocks divide that memory (at 1B interactions, 35M users are
4.3M samples of 8). The users of a block (consecutive users of the source) always share a batch. Evaluation
reads its split by user, without streaming: one sequence per sample.

Sequences written in parallel (`SequenceWriter` per part, in other processes) lie in `train/partNNNNN/` and
`eval/partNNNNN/`, each a shard set of its own, joined by one `index.json` per split (streaming's merge_index).
A directory appears complete or not at all: it is built in a temp dir beside DIR and renamed into place.

The video files came later within format 2: a data set without them reads as one with no video item.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.dataloading import resolve_pretrained_path

FORMAT_VERSION = 2  # 2: train samples are blocks of sequences
MANIFEST = "manifest.json"
USERS_PER_SAMPLE = 8  # train sequences per sample of a large data set (synthetic's default)
MIN_INTERACTIONS = 3  # train needs one item, valid and test one each
SPLIT_RULE = (
    "leave-one-out by timestamp (stable): train = all but last two, valid = second to last, test = last"
)
TRAIN_COLUMNS = {"users": "ndarray:int64", "lengths": "ndarray:int64", "items": "ndarray:int64"}
EVAL_COLUMNS = {"user": "int64", "items": "ndarray:int64"}
VIDEO_ARRAYS = ("video_offsets", "video_frames")  # absent from data sets written before video items
CLIP_START = (0x1A, 0x45, 0xDF, 0xA3)  # the EBML magic that begins every WebM (Matroska) file
USER_ATTRIBUTES = "users/attributes.json"
UNKNOWN_CLASS = -1  # the code of a user whose value the source does not give


class DataError(ValueError):
    """Bad input data; the message names the file and the 1-based line."""


class DatasetFileError(RuntimeError):
    """A file of a dataset directory is missing or differs from what the manifest recorded."""


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetFileError(f"{path}: missing (not a dataset directory written by transrec prepare?)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise DatasetFileError(f"{path}: format {manifest.get('format')}, this transrec reads format "
                               f"{FORMAT_VERSION}: prepare the data set again")
    return manifest


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained_path(name), local_files_only=True)


def pack_sequences(users: list[int], sequences: list[np.ndarray]) -> dict:
    """A train sample: a block of users' sequences."""
    return {"users": np.asarray(users, np.int64), "lengths": np.array([len(s) for s in sequences], np.int64),
            "items": np.concatenate(sequences).astype(np.int64, copy=False)}


def unpack_sequences(sample: dict) -> list[dict]:
    """A train sample -> its sequences {"user", "items"}."""
    ends = np.cumsum(sample["lengths"])
    if len(sample["users"]) != len(ends) or (len(ends) and ends[-1] != len(sample["items"])):
        raise ValueError(f"{len(sample['users'])} users, {len(ends)} lengths summing to "
                         f"{ends[-1] if len(ends) else 0}, {len(sample['items'])} items")
    return [{"user": int(user), "items": items}
            for user, items in zip(sample["users"], np.split(sample["items"], ends[:-1]))]


@dataclass
class UserAttribute:
    """One attribute of every user of a data set (USER_ATTRIBUTES): its classes, and each user's class number
    (UNKNOWN_CLASS where the source gives no value)."""

    classes: list[str]
    codes: np.ndarray  # int64 [num_users], by the user's number in the data set (the sequences' "user")

    @classmethod
    def from_values(cls, values: list[str | None], classes: list[str] | None = None) -> "UserAttribute":
        """From each user's value (None: unknown); `classes` in the order they are numbered (default: sorted)."""
        classes = sorted({v for v in values if v is not None}) if classes is None else list(classes)
        number = {name: code for code, name in enumerate(classes)}
        return cls(classes, np.array([UNKNOWN_CLASS if v is None else number[v] for v in values], np.int64))


def dump_user_attributes(attributes: dict[str, UserAttribute]) -> str:
    return json.dumps({name: {"classes": a.classes, "codes": a.codes.tolist()} for name, a in attributes.items()})


def load_user_attributes(path: Path) -> dict[str, UserAttribute]:
    return {name: UserAttribute(entry["classes"], np.asarray(entry["codes"], np.int64))
            for name, entry in json.loads(path.read_text()).items()}
