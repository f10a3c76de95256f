"""Checkpoints that survive crashes: DeepSpeed's files plus what DeepSpeed does not keep (every RNG and the
loader's position, per rank), published only once complete, verified before use.

Where they live and how a tag is published (a directory every node mounts, or object storage):
`checkpoint_store`. Save: every rank writes and hashes its own files, rank 0 writes the manifest and publishes
the tag, then moves `latest` and keeps the newest `keep` tags (and the protected ones, e.g. the best). Load:
the newest tag whose files match its manifest; a damaged one (a file missing, truncated or changed) is skipped
with a `CheckpointWarning` that names what is wrong. On another number of ranks than saved it, the tag is
first converted to DeepSpeed's universal format (<tag>/universal/) and every rank loads that; the loader's
position counts samples of all ranks, so the data goes on at the right sample.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from transrec.fileio import describe_files
from transrec.trainer.checkpoint_store import MANIFEST, STAGING, CheckpointStore, step_of
from transrec.trainer.distributed import all_gather_object, barrier, rank_and_world

UNIVERSAL = "universal"  # tag_dir/universal: the tag converted for another world size
SHARED_STATE = "shared_state.pt"  # state every rank holds alike, written once


class CheckpointWarning(UserWarning):
    pass


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, store: CheckpointStore, tag: str, trainer_state: dict, keep: int, protected: set[str],
         shared_state: dict | None = None) -> None:
    """Saves the engine and every rank's trainer state as `tag`, publishes it, then prunes to `keep` tags.
    `shared_state` (the same on every rank, e.g. the item-vector bank) is written once, by rank 0."""
    rank, world = rank_and_world()
    if rank == 0:
        store.begin(tag)
    barrier()
    private = store.private_dir(tag, rank)
    engine.save_checkpoint(str(private), tag=tag, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, private / tag / f"rank{rank}_state.pt")
    if rank == 0:
        torch.save(shared_state or {}, private / tag / SHARED_STATE)
    files = describe_files(private / tag, flush=True)  # each rank hashes its own files
    store.put(private, tag)
    every_rank = all_gather_object(files)  # (and once gathered, every rank's files are in place)
    if rank == 0:
        manifest = {"tag": tag, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                    "files": dict(sorted(kv for files in every_rank for kv in files.items()))}
        store.publish(tag, manifest, keep, protected)
    barrier()


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, in a local directory (`checkpoint_dir`/`tag`): the store itself, or a
    download from it (`downloaded`: removed once loaded). On another world size than it was saved with,
    DeepSpeed loads it through a universal checkpoint (optimizer state per parameter, any partitioning)."""

    checkpoint_dir: Path
    tag: str
    saved_world: int
    downloaded: bool = False

    @property
    def universal(self) -> bool:
        return self.saved_world != rank_and_world()[1]


def _warn_damaged(store: CheckpointStore, tag: str, found: list[str]) -> None:
    warnings.warn(f"checkpoint {store.where(tag)} is damaged, trying an older one: " + "; ".join(found),
                  CheckpointWarning, stacklevel=3)


def newest_intact_tag(store: CheckpointStore, below: int | None = None) -> str | None:
    """The newest checkpoint (of a step `below`, if given) that passes its manifest; each newer damaged one is
    reported by a warning. None when there is no checkpoint at all; an error when every one is damaged."""
    tags = store.tags()
    for tag in reversed(tags):
        if below is not None and step_of(tag) >= below:
            continue
        found = store.problems(tag)
        if not found:
            return tag
        _warn_damaged(store, tag, found)
    if tags:
        raise RuntimeError(f"every checkpoint under {store} is damaged (see the warnings)")
    return None


def find_resume_point(store: CheckpointStore) -> ResumePoint | None:
    """The newest intact checkpoint, chosen by rank 0 and fetched by every rank (from object storage: a download,
    checked file by file); None: start afresh. Call it before `deepspeed.initialize`: a universal load must be
    configured there."""
    rank, _ = rank_and_world()
    below = None
    while True:
        choice: list = [(None, None)]  # (tag, error)
        if rank == 0:
            try:
                choice = [(newest_intact_tag(store, below), None)]
            except RuntimeError as err:  # raised on every rank, not only on rank 0
                choice = [(None, str(err))]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        tag, error = choice[0]
        if error is not None:
            raise RuntimeError(error)
        if tag is None:
            return None
        local, found = store.fetch(tag)
        damaged = sorted({problem for problems in all_gather_object(found) for problem in problems})
        if not damaged:
            break
        shutil.rmtree(local)  # only a download can be damaged here: `problems` checked the directory store
        if rank == 0:
            _warn_damaged(store, tag, damaged)
        below = step_of(tag)
    manifest = json.loads((local / tag / MANIFEST).read_text())
    point = ResumePoint(local, tag, manifest["world_size"], downloaded=not store.is_directory)
    if point.universal and (rank == 0 or point.downloaded):  # each download is converted by its own rank
        to_universal(local / tag)
    barrier()
    return point


def to_universal(tag_dir: Path) -> Path:
    """Converts a checkpoint to DeepSpeed's universal format in tag_dir/universal (once)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tag_dir / UNIVERSAL
    if not out.is_dir():
        staging = tag_dir / (UNIVERSAL + STAGING)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(staging), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        staging.rename(out)
    return out


def load(engine, point: ResumePoint) -> tuple[dict, dict]:
    """Restores the engine (model, optimizer, LR schedule) from `point`; returns this rank's trainer state and
    the shared state.

    On another world size, a rank the checkpoint has no state for takes rank 0's (the loader position and the
    counters are global) but keeps its own fresh RNG."""
    rank, _ = rank_and_world()
    engine_tag = f"{point.tag}/{UNIVERSAL}" if point.universal else point.tag
    groups = engine.optimizer.param_groups
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    load_path, _ = engine.load_checkpoint(str(point.checkpoint_dir), tag=engine_tag)
    if load_path is None:
        raise RuntimeError(f"checkpoint {point.checkpoint_dir / engine_tag} could not be loaded")
    if point.universal:
        # DeepSpeed 0.19.8's ZeRO-3 universal load gives every param group the first group's hyperparameters
        # (lr, weight_decay...) and one shared `step` tensor, which each group's update then increments:
        # put back each group's own values, at the restored schedule's learning rate, and a step of its own.
        for group, own_values, lr in zip(groups, hyperparameters, engine.lr_scheduler.get_last_lr()):
            group.update(own_values, lr=lr)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for param_state in inner.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
    own = rank < point.saved_world
    state = torch.load(point.checkpoint_dir / point.tag / f"rank{rank if own else 0}_state.pt", weights_only=True)
    rng = state.pop("rng")
    if own:
        restore_rng_state(rng)
    shared = torch.load(point.checkpoint_dir / point.tag / SHARED_STATE, weights_only=True)
    if point.downloaded:
        shutil.rmtree(point.checkpoint_dir)
    return state, shared


def consolidated_state_dict(store: CheckpointStore, tag: str | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full model weights of a ZeRO checkpoint of any stage (default: the latest), gathered in one process in
    `dtype`. From ZeRO-3 partitions, one tensor at a time: the ranks' fp32 files are memory-mapped, each weight
    is joined from its pieces and cast on its own, so a 16-bit result never needs a full fp32 copy beside it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    tag = tag or store.latest()
    if tag is None or tag not in store.tags():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} under {store}")
    local, found = None, store.problems(tag)  # (object storage: sizes before a download, sha256 after it)
    try:
        if not found:
            local, found = store.fetch(tag)
        if found:
            raise ValueError(f"checkpoint {store.where(tag)} is damaged: " + "; ".join(found))
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays the command's output
            return to_torch_tensor(get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag, lazy_mode=True),
                                   dtype=dtype)
    finally:
        if local is not None and not store.is_directory:
            shutil.rmtree(local)
