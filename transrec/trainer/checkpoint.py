"""DeepSpeed checkpoints plus what DeepSpeed does not keep: every RNG and the loader's position, per rank.

Layout: RUN/checkpoints/<tag>/ holds DeepSpeed's files and one `rank<r>_state.pt` per rank;
RUN/checkpoints/latest names the newest complete tag (DeepSpeed writes it after all ranks saved).
"""
from __future__ import annotations

import contextlib
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from transrec.trainer.evaluate import rank_and_world


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


def latest_tag(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def save(engine, checkpoint_dir: Path, tag: str, trainer_state: dict, keep: int, protected: set[str]) -> None:
    """Saves the engine and this rank's trainer state under `tag`, then prunes to the newest `keep` tags."""
    rank, _ = rank_and_world()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    tag_dir = checkpoint_dir / tag
    tmp = tag_dir / f"rank{rank}_state.pt.tmp"
    torch.save({**trainer_state, "rng": rng_state()}, tmp)
    tmp.replace(tag_dir / f"rank{rank}_state.pt")
    if dist.is_initialized():
        dist.barrier()  # every rank's files are complete before `latest` moves
    if rank == 0:
        pointer_tmp = checkpoint_dir / "latest.tmp"
        pointer_tmp.write_text(tag)
        pointer_tmp.replace(checkpoint_dir / "latest")
        tags = sorted((p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                      key=lambda p: int(p.name.removeprefix("step")))
        for old in tags[:-keep]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load(engine, checkpoint_dir: Path, tag: str) -> dict:
    """Restores the engine (model, optimizer, LR schedule) and returns this rank's trainer state."""
    rank, _ = rank_and_world()
    load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"checkpoint {checkpoint_dir / tag} could not be loaded")
    state_file = checkpoint_dir / tag / f"rank{rank}_state.pt"
    if not state_file.exists():
        raise RuntimeError(f"{state_file} is missing: checkpoint {tag} was saved by fewer ranks than this run has")
    state = torch.load(state_file, weights_only=True)
    restore_rng_state(state.pop("rng"))
    return state


def consolidated_state_dict(checkpoint_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a ZeRO checkpoint of any stage, gathered in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} under {checkpoint_dir}")
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays the command's output
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
