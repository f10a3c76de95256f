"""The dataset format's version, file names, manifest and errors: what the CLI needs, without streaming or
transformers. The format itself is described, and written, in prepare.py."""
from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 2  # 2: train samples are blocks of sequences
MANIFEST = "manifest.json"
USERS_PER_SAMPLE = 8  # train sequences per sample of a large data set (synthetic's default)


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
