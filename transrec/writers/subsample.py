"""A copy of a data set in which only a share of the users are trained on: the transfer study's small targets.

Every user keeps its evaluation sequence (history, valid and test item) under the same user id, so each share
is evaluated on the same users with the same histories; only a seeded share of them keep their training
sequence. The kept users of a smaller share are among those of a larger one (one seeded permutation, cut at
each share). Items, texts, images, clips, the users' attributes and the tokenizer are the source's; popularity
counts the kept training sequences only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transrec.batch import IMAGE, VIDEO
from transrec.dataloading.dataset_format import USER_ATTRIBUTES, load_user_attributes, read_manifest
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import _ShardedSequences
from transrec.fileio import sha256_file
from transrec.writers.dataset_writer import DatasetWriter, ItemRecord


def kept_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """bool [num_users]: the users whose training sequence is kept (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng([seed, 7]).permutation(num_users)
    kept = np.zeros(num_users, bool)
    kept[order[:max(1, round(fraction * num_users))]] = True
    return kept


def subsample_train_users(src: str | Path, out: str | Path, fraction: float, seed: int,
                          overwrite: bool = False) -> dict:
    """Writes `out`: data set `src` with the training sequences of a seeded `fraction` of its users only.
    Returns the manifest, whose `subsample` says of what, how much and which seed."""
    src = Path(src)
    manifest = read_manifest(src)
    kept = kept_users(manifest["num_users"], fraction, seed)
    store = ItemStore(src)
    with open(src / "items" / "items.jsonl") as listing:
        items = [json.loads(line) for line in listing]
    records = (ItemRecord(item["source_id"], item["text"], item["modality"],
                          store.jpeg(i).tobytes() if item["modality"] == IMAGE else None,
                          store.clip(i).tobytes() if item["modality"] == VIDEO else None, int(store.video_frames[i]))
               for i, item in enumerate(items))
    with DatasetWriter(out, manifest["tokenizer"], manifest["max_text_len"], overwrite,
                       manifest["users_per_sample"]) as writer:
        writer.write_items(records, manifest["num_items"])
        for user, sample in enumerate(_ShardedSequences(src / "eval")):
            if sample["user"] != user:
                raise ValueError(f"{src / 'eval'}: sample {user} is user {sample['user']}; users must be 0..N-1 in "
                                 f"order")
            writer.add_sequence(sample["items"], train=bool(kept[user]))
        if USER_ATTRIBUTES in manifest["files"]:  # the same users: their attribute tasks run on the copy too
            writer.write_user_attributes(load_user_attributes(src / USER_ATTRIBUTES))
        copied = {k: manifest[k] for k in ("image_size", "clip_frames", "seed", "domain") if k in manifest}
        return writer.commit(
            name=f"{manifest['name']}-users{fraction:g}-seed{seed}", source=manifest["source"],
            synthetic_images=manifest["synthetic_images"], image_fraction=manifest["image_fraction"],
            synthetic_videos=manifest.get("synthetic_videos", False),
            video_fraction=manifest.get("video_fraction", 0.0),
            skipped=manifest["skipped"], sources={"manifest.json": sha256_file(src / "manifest.json")},
            subsample={"of": str(src.absolute()), "fraction": fraction, "seed": seed, "train_users": int(kept.sum())},
            **copied)
