"""Checkpoints that survive crashes: DeepSpeed's files plus what DeepSpeed does not keep (every RNG and the
loader's position, per rank), published only once complete, verified before use.

Layout: RUN/checkpoints/<tag>/ holds DeepSpeed's files, one `rank<r>_state.pt` per rank and `manifest.json`
(every other file's size and sha256, the world size, the ZeRO stage); RUN/checkpoints/latest names the
newest published tag.

Save: every rank writes into <tag>.tmp/; after a barrier rank 0 flushes and hashes every file, writes the
manifest, renames the directory to <tag>, and only then moves `latest`; it keeps the newest `keep` tags
(and the protected ones, e.g. the best). Load: the newest tag whose files match its manifest; a damaged one
(a file missing, truncated or changed) is skipped with a `CheckpointWarning` that names what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from transrec.dataloading.prepare import sha256_file
from transrec.trainer.evaluate import rank_and_world

MANIFEST = "manifest.json"
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
        for old in published_tags(checkpoint_dir)[:-keep]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoint_dir.glob(f"step*{STAGING}"):  # staging dirs of crashed saves
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()


def load_newest(engine, checkpoint_dir: Path) -> dict | None:
    """Restores the newest intact checkpoint (chosen by rank 0, the same on every rank) into the engine
    and returns this rank's trainer state; None when the run has no checkpoint yet."""
    rank, world = rank_and_world()
    choice = [newest_intact_tag(checkpoint_dir) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else load(engine, checkpoint_dir, choice[0])


def load(engine, checkpoint_dir: Path, tag: str) -> dict:
    """Restores the engine (model, optimizer, LR schedule) from `tag` and returns this rank's trainer state.

    On another world size (ZeRO-1/2 only, whose checkpoints are elastic), a rank the checkpoint has no state
    for takes rank 0's (the loader position and counters are global) but keeps its own fresh RNG."""
    rank, world = rank_and_world()
    saved_world, stage = read_manifest(checkpoint_dir / tag).get("world_size", world), engine.zero_optimization_stage()
    if saved_world != world and stage == 3:
        raise RuntimeError(f"checkpoint {tag} was saved by {saved_world} ranks; ZeRO-3 resumes only on as many "
                           f"(this run has {world})")
    load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"checkpoint {checkpoint_dir / tag} could not be loaded")
    own = rank < saved_world
    state = torch.load(checkpoint_dir / tag / f"rank{rank if own else 0}_state.pt", weights_only=True)
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
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays the command's output
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
