"""Item features of a data set, written by `transrec features` (cluster/features.py): DIR/features/NAME.npy
(float32 [num_items, width], row i = item i) and DIR/features/NAME.json, both listed in the manifest (`features`
names them, `files` holds their sizes and sha256, so opening the data set checks them like any of its files).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from transrec.dataloading.dataset_format import MANIFEST, read_manifest
from transrec.fileio import describe_files, fsync

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class FeaturesWriter:
    """Rows written by item id into a memory-mapped temp file (bounded memory at any catalogue size, any order),
    then `commit` moves it into the data set and records it in the manifest; until then nothing changes."""

    def __init__(self, root: str | Path, name: str, width: int, overwrite: bool = False):
        if not NAME.fullmatch(name):
            raise ValueError(f"features name {name!r}: use letters, digits, '_', '-' and '.'")
        self.root, self.name = Path(root), name
        manifest = read_manifest(self.root)
        if name in manifest.get("features", {}) and not overwrite:
            raise FileExistsError(f"{self.root} has item features {name!r}; pass --overwrite to replace them")
        (self.root / "features").mkdir(exist_ok=True)
        self.tmp = self.root / "features" / f".{name}.npy.tmp-{os.getpid()}"
        self.table = np.lib.format.open_memmap(self.tmp, "w+", np.float32, (manifest["num_items"], width))
        self.written = np.zeros(manifest["num_items"], bool)

    def write(self, start: int, rows: np.ndarray) -> None:
        self.table[start:start + len(rows)] = rows
        self.written[start:start + len(rows)] = True

    def commit(self, meta: dict) -> dict:
        """Moves the table into place and lists it in the manifest (each file replaced atomically); returns
        the features' manifest entry."""
        if not self.written.all():
            raise RuntimeError(f"features {self.name}: items {np.flatnonzero(~self.written)[:5].tolist()}... "
                               "were never written")
        self.table.flush()
        del self.table
        fsync(self.tmp)
        relpaths = {suffix: f"features/{self.name}.{suffix}" for suffix in ("npy", "json")}
        os.replace(self.tmp, self.root / relpaths["npy"])
        entry = {**meta, "width": int(np.load(self.root / relpaths["npy"], mmap_mode="r").shape[1])}
        _write_atomic(self.root / relpaths["json"], json.dumps(entry, indent=1))
        manifest = read_manifest(self.root)
        manifest.setdefault("features", {})[self.name] = entry
        described = describe_files(self.root / "features", flush=True)
        manifest["files"].update({f"features/{path}": described[path] for path in
                                  (f"{self.name}.npy", f"{self.name}.json")})
        _write_atomic(self.root / MANIFEST, json.dumps(manifest, indent=1))
        return entry

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
