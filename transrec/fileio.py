"""File helpers the writers of data sets, checkpoints and exports share: hashing, describing, flushing."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(root: Path, flush: bool = False) -> dict[str, dict]:
    """Every file under `root`: relative path -> size and sha256 (a manifest's `files`); with `flush`, each
    file is fsynced first, so the manifest never vouches for bytes still in the page cache."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if flush:
            fsync(path)
        files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
