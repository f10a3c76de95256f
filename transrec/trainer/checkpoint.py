"""Checkpoints that survive crashes: DeepSpeed's files plus what DeepSpeed does not keep (every RNG and the
loader's position, per rank), published only once complete, verified before use.

Layout: RUN/checkpoints/<tag>/ holds DeepSpeed's files, one `rank<r>_state.pt` per rank and `manifest.json`
(every other file's size and sha256, the world size, the ZeRO stage); RUN/checkpoints/latest names the
newest published tag.

Save: every rank writes into <tag>.tmp/; after a barrier rank 0 flushes and hashes every file, writes the
manifest, renames the directory to <tag>, and only then moves `latest`; it keeps the newest `keep` tags
(and the protected ones, e.g. the best). Load: the newest tag whose files match its manifest; a damaged one
(a file missing, truncated or changed) is skipped with a `CheckpointWarning` that names what is wrong.
On another number of ranks than saved it, rank 0 first converts the tag to DeepSpeed's universal format
(<tag>/universal/) and every rank loads that; the loader's position counts samples of all ranks, so the
data goes on at the right sample.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from transrec.dataloading.prepare import sha256_file
from transrec.trainer.evaluate import rank_and_world

MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # tag_dir/universal: the tag converted for another world size
STAGING, REPLACED = ".tmp", ".old"


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


def rng_isolated(batches: Iterable) -> Iterator:
    """Yields from `batches` without letting it draw from the global RNGs the model's dropout uses.

    A DataLoader draws its workers' base seed from torch's global RNG when it starts iterating: at the
    start of an epoch in an uninterrupted run, but mid-epoch after a resume, which would shift every
    later dropout mask. Here the data side never moves the model's random stream."""
    iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, StopIteration)
        if batch is StopIteration:
            return
        yield batch


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step(tag_dir: Path) -> int:
    return int(tag_dir.name.removeprefix("step"))


def published_tags(checkpoint_dir: Path) -> list[Path]:
    """Tag directories (not staging or replaced ones), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p for p in checkpoint_dir.iterdir()
                   if p.is_dir() and p.name.startswith("step") and p.name.removeprefix("step").isdigit()), key=_step)


def latest_tag(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(tag_dir: Path, info: dict) -> None:
    """Flushes every file of `tag_dir` to disk and records its size and sha256, then writes the manifest."""
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        _fsync(path)
        files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    tmp = tag_dir / (MANIFEST + STAGING)
    tmp.write_text(json.dumps({**info, "files": files}, indent=1))
    _fsync(tmp)
    tmp.replace(tag_dir / MANIFEST)


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


def saved_bytes(tag_dir: Path) -> int:
    """Size of a checkpoint as saved (its manifest's files: not a universal conversion made later)."""
    return sum(f["bytes"] for f in read_manifest(tag_dir)["files"].values())


def problems(tag_dir: Path) -> list[str]:
    """What is wrong with a checkpoint directory, checked against its manifest; empty when it is intact."""
    try:
        manifest = read_manifest(tag_dir)
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (the save did not finish)"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{MANIFEST} is unreadable: {err}"]
    found = []
    for name, expected in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            found.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        elif sha256_file(path) != expected["sha256"]:
            found.append(f"{name} does not match its sha256")
    return found


def newest_intact_tag(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint that passes its manifest; each newer damaged one is reported by a warning.
    None when there is no checkpoint at all; an error when every one is damaged."""
    tags = published_tags(checkpoint_dir)
    for tag_dir in reversed(tags):
        found = problems(tag_dir)
        if not found:
            return tag_dir.name
        warnings.warn(f"checkpoint {tag_dir} is damaged, trying an older one: " + "; ".join(found),
                      CheckpointWarning, stacklevel=2)
    if tags:
        raise RuntimeError(f"every checkpoint under {checkpoint_dir} is damaged (see the warnings)")
    return None


def _publish(staging: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (e.g. an epoch end reached right after a resume)
        replaced = final.with_name(final.name + REPLACED)
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
        staging.rename(final)
        shutil.rmtree(replaced)
    else:
        staging.rename(final)


def save(engine, checkpoint_dir: Path, tag: str, trainer_state: dict, keep: int, protected: set[str]) -> None:
    """Saves the engine and every rank's trainer state as `tag`, publishes it, then prunes to `keep` tags."""
    rank, world = rank_and_world()
    staging = checkpoint_dir / (tag + STAGING)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    _barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=staging.name, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, staging / f"rank{rank}_state.pt")
    _barrier()  # every rank's files are complete
    if rank == 0:
        write_manifest(staging, {"tag": tag, "world_size": world, "zero_stage": engine.zero_optimization_stage()})
        _publish(staging, checkpoint_dir / tag)
        pointer = checkpoint_dir / ("latest" + STAGING)
        pointer.write_text(tag)
        pointer.replace(checkpoint_dir / "latest")
        for old in published_tags(checkpoint_dir)[:-max(keep, 1)]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
        for stale in [*checkpoint_dir.glob(f"step*{STAGING}"), *checkpoint_dir.glob(f"step*{REPLACED}")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by saves that crashed
    _barrier()


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from. On another world size than it was saved with, DeepSpeed loads
    it through a universal checkpoint (optimizer state per parameter, any partitioning; ZeRO 1-3)."""

    checkpoint_dir: Path
    tag: str
    saved_world: int

    @property
    def universal(self) -> bool:
        return self.saved_world != rank_and_world()[1]


def find_resume_point(checkpoint_dir: Path) -> ResumePoint | None:
    """The newest intact checkpoint, chosen by rank 0 and the same on every rank (None: start afresh).
    Call it before `deepspeed.initialize`: a universal load must be configured there."""
    rank, _ = rank_and_world()
    choice: list = [None]
    if rank == 0:
        tag = newest_intact_tag(checkpoint_dir)
        if tag is not None:
            choice = [ResumePoint(checkpoint_dir, tag, read_manifest(checkpoint_dir / tag)["world_size"])]
            if choice[0].universal:
                to_universal(checkpoint_dir / tag)
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


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


def load(engine, point: ResumePoint) -> dict:
    """Restores the engine (model, optimizer, LR schedule) from `point` and returns this rank's trainer state.

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
    return state


def consolidated_state_dict(checkpoint_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a ZeRO checkpoint of any stage, gathered in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} under {checkpoint_dir}")
    if (checkpoint_dir / tag / MANIFEST).exists() and (found := problems(checkpoint_dir / tag)):
        raise ValueError(f"checkpoint {checkpoint_dir / tag} is damaged: " + "; ".join(found))
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays the command's output
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
