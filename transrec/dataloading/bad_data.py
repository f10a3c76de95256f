"""Bad records at training time: what is checked, when, and what `data.on_bad_record` (skip | stop) does.

Before training (TrainLoader's constructor):
- the dataset's files against the manifest (sizes, sha256 with verify="full"). A train shard that differs
  is, with "skip", left out: its samples are skipped unread. Any other file (the item table, an index.json,
  a missing shard) stops training with either policy: it cannot be skipped record by record.
- every item as the model will read it (`ItemStore.route`): an empty title for the text tower, no image
  bytes or bytes that are not a JPEG for the image tower, no clip or bytes that are not a WebM file for the
  video tower. With "skip", a sample that holds such an item is skipped and negatives are never drawn from them.
- with "stop" only, every train sequence of a local dataset: an item id outside the catalogue, or fewer
  than MIN_TRAIN_ITEMS items (nothing to predict), and every train sample that does not decode.
With "stop", anything found stops here, before the first step, with a DataError listing what was found.

While training, with either policy (the pre-flight check cannot see everything: a remote dataset's
shards, a JPEG or clip whose body is corrupt), nothing raises because of one record: a train sample (a block of
sequences, dataset_format.py) that cannot be read or lies in a bad shard is dropped from its batch (one record for
the sample); a sequence that holds an unknown or bad item or is too short is dropped (one record for it); an
image that neither the decoder nor PIL can decode, or a clip that neither it nor PyAV can (a truncated clip whose
sampled frames lie past its end), is replaced by a blank one (zeros, the normalized mean). Each is a
BadRecord naming its file and record, logged (the first MAX_LOGGED of each kind per epoch) and counted in
TrainLoader.skipped. Evaluation encodes every item, bad ones too: an image or clip that does not decode is
logged and shown blank (ItemStore.item_batch).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.batch import IMAGE, VIDEO
from transrec.dataloading.item_store import CONTENT, ItemStore, log
from transrec.dataloading.dataset_format import CLIP_START, DataError
from transrec.dataloading.dataset_format import load_tokenizer

MIN_TRAIN_ITEMS = 2  # a sample trains on (history, next item) pairs: it needs two items
MAX_LOGGED = 5  # records logged per kind per epoch; the rest are only counted
MAX_LISTED = 20  # records listed in a stop's message
# What TrainLoader.skipped counts: samples ("bad_shard", "unreadable") or sequences (the others) dropped, by
# reason, but "blank_image" and "blank_clip" (images and clips replaced) and "empty_batch" (batches whose every
# sequence was bad, handed out empty: trainer/loop.py steps on the other ranks' batches, or not at all).
KINDS = ("bad_shard", "unreadable", "unknown_item", "too_short", "empty_title", "missing_image", "not_a_jpeg",
         "missing_video", "not_a_clip", "blank_image", "blank_clip", "empty_batch")
JPEG_START = (0xFF, 0xD8)
BLANKED = {IMAGE: "blank_image", VIDEO: "blank_clip"}  # the kind of a decoded item shown blank, by modality
# per content modality: the kind and problem of no bytes, those of bytes that do not start as they must, and how
UNUSABLE = {
    IMAGE: ("missing_image", "an image item with no image", "not_a_jpeg",
            "its image bytes do not start like a JPEG (FF D8)", JPEG_START),
    VIDEO: ("missing_video", "a video item with no clip", "not_a_clip",
            "its clip does not start like a WebM file (1A 45 DF A3)", CLIP_START),
}


@dataclass(frozen=True)
class BadRecord:
    kind: str  # one of KINDS
    file: str
    record: str  # "sample 17 (user 5)", "item 42"
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.problem}"


@dataclass(frozen=True)
class BadItems:
    """The items found bad before training, sorted, with the kind of each."""

    ids: np.ndarray  # int64 [n], sorted
    kinds: np.ndarray  # str [n]

    def first_in(self, items: np.ndarray) -> tuple[int, str] | None:
        """(item, kind) of the first bad item of `items`, or None."""
        if not len(self.ids):
            return None
        hits = items[np.isin(items, self.ids)]
        return (int(hits[0]), str(self.kinds[np.searchsorted(self.ids, hits[0])])) if len(hits) else None


NO_BAD_ITEMS = BadItems(np.zeros(0, np.int64), np.zeros(0, str))


def find_bad_items(store: ItemStore, mode: str) -> tuple[BadItems, list[BadRecord]]:
    """Items whose routed content is unusable: empty title (text route), no image or not a JPEG (image route), no
    clip or not a WebM file (video route)."""
    ids = np.arange(store.num_items)
    text_rows, image_rows, video_rows = store.route(ids, mode)
    found: dict[str, np.ndarray] = {}
    files = {"empty_title": "items/tokens.npy"}
    problems = {"empty_title": "empty title (its text has no token)"}
    if len(text_rows):
        empty_length = len(load_tokenizer(str(store.root / "tokenizer"))("")["input_ids"])  # special tokens only
        found["empty_title"] = text_rows[store.token_lengths[text_rows] <= empty_length]
    for modality, rows in ((IMAGE, image_rows), (VIDEO, video_rows)):
        missing, no_bytes, malformed, bad_start, start = UNUSABLE[modality]
        offsets, file = CONTENT[modality]
        files.update({missing: f"items/{offsets}.npy", malformed: f"items/{file}"})
        problems.update({missing: no_bytes, malformed: bad_start})
        if len(rows):
            _, sizes = store.content_spans(rows, modality)
            found[missing] = rows[sizes == 0]
            present = rows[sizes >= len(start)]
            found[malformed] = present[(store.content_heads(present, modality, len(start)) != start).any(1)]
    records = [BadRecord(kind, str(store.root / files[kind]), f"item {i}", problems[kind])
               for kind, items in found.items() for i in items]
    if not records:
        return NO_BAD_ITEMS, []
    all_ids = np.concatenate(list(found.values()))
    all_kinds = np.concatenate([np.full(len(v), k) for k, v in found.items()])
    order = np.argsort(all_ids, kind="stable")
    return BadItems(all_ids[order], all_kinds[order]), records


def check_sample(sample: dict, num_items: int, bad_items: BadItems) -> BadRecord | None:
    """The problem of one train sequence {"user", "items", "sample_id", "file"?} (or of its sample, "bad"), or
    None if it is usable."""
    if "bad" in sample:  # set by the reader: an unreadable sample, or one in a bad shard
        return sample["bad"]
    items = np.asarray(sample["items"])
    record = f"sample {sample['sample_id']} (user {sample['user']})"
    file = sample.get("file", "train")

    def bad(kind: str, problem: str) -> BadRecord:
        return BadRecord(kind, file, record, problem)

    if len(items) < MIN_TRAIN_ITEMS:
        return bad("too_short", f"{len(items)} train item(s), a sample needs {MIN_TRAIN_ITEMS} (one to predict)")
    outside = items[(items < 0) | (items >= num_items)]
    if len(outside):
        return bad("unknown_item", f"item {outside[0]} is not in the catalogue (0..{num_items - 1})")
    hit = bad_items.first_in(items)
    if hit is not None:
        return bad(hit[1], f"holds item {hit[0]}, which has a bad record ({hit[1]})")
    return None


class BadRecordLog:
    """Counts bad records by kind and logs the first MAX_LOGGED of each kind (until `reset`)."""

    def __init__(self, counts: dict | None = None):
        self.counts = Counter({kind: 0 for kind in KINDS})
        self.counts.update(counts or {})

    def add(self, record: BadRecord) -> None:
        self.counts[record.kind] += 1
        if self.counts[record.kind] <= MAX_LOGGED:
            log.warning("skipped: %s", record)
        if self.counts[record.kind] == MAX_LOGGED:
            log.warning("further %s records are only counted", record.kind)

    def reset(self) -> None:
        self.counts = Counter({kind: 0 for kind in KINDS})


def stop(found: list[BadRecord], where: str | Path) -> None:
    """With on_bad_record=stop: raises a DataError that lists `found` (if anything was)."""
    if not found:
        return
    kinds = Counter(record.kind for record in found)
    listed = "\n".join(f"  {record}" for record in found[:MAX_LISTED])
    more = f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    raise DataError(f"{where}: {len(found)} bad record(s) ({dict(kinds)}); data.on_bad_record=stop, so training "
                    f"does not start:\n{listed}{more}\nFix the data, or set data.on_bad_record=skip to skip them.")
