"""Shared fixtures: a scratch TMPDIR, a clean environment per test, tiny prepared data sets."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ML100K = (Path(__file__).parents[1] / "../shared/data/ml-100k").resolve()
TINY = dict(users=120, items=80, seed=0, image_fraction=0.5, min_len=4, max_len=12, topics=8, image_size=32)


def flip_last_byte(path: Path) -> None:
    """Damages a file without changing its size: only a checksum can tell."""
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir() -> Path:
    """mosaicml-streaming leaves *_filelock files in tempfile.gettempdir(): keep them in the test's scratch.
    A short path: Ray puts its sockets under TMPDIR, and a socket path may not exceed 107 bytes (pytest's own
    /tmp/pytest-of-USER/pytest-NNN/... leaves too little room for Ray's session directory)."""
    path = Path(tempfile.mkdtemp(prefix="transrec-test-"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(path), str(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(autouse=True)
def restore_environment():
    """Loaders set RANK / WORLD_SIZE... when unset; no test may leak them into the next."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from transrec.dataloading.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_synthetic(out, **TINY)
    return out


@pytest.fixture(scope="session")
def ml100k_dataset(tmp_path_factory) -> Path:
    from transrec.dataloading.prepare import prepare_movielens

    out = tmp_path_factory.mktemp("data") / "ml-100k"
    prepare_movielens(ML100K, out, image_fraction=0.25, image_size=32)
    return out
