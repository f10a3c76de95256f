"""Shared fixtures: a scratch TMPDIR, a clean environment per test, tiny prepared data sets."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest

ML100K = (Path(__file__).parents[1] / "../shared/data/ml-100k").resolve()
TINY = dict(users=120, items=80, seed=0, image_fraction=0.5, min_len=4, max_len=12, topics=8, image_size=32)
TINY_VIDEO = dict(TINY, image_fraction=0.3, video_fraction=0.3, clip_frames=8)  # clips of 8 frames, 32 x 32


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


@contextlib.contextmanager
def moto_s3(bucket: str = "transrec", host: str = "127.0.0.1"):
    """An S3 endpoint on `host` (moto's server; loopback by default) with one bucket, found the way S3 clients find any endpoint:
    S3_ENDPOINT_URL (mosaicml-streaming's boto3) and AWS_ENDPOINT_URL (pyarrow.fs), set in os.environ with test
    credentials until the block ends (processes started meanwhile, Ray's included, inherit them). Yields a
    boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    from transrec.network import free_port

    port = free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    endpoint = f"http://{host}:{port}"
    # moto's state is per process, not per server: start empty
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=60)
    settings = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket():
    """(boto3 client, bucket name) of a moto S3 endpoint for one test."""
    with moto_s3("transrec") as client:
        yield client, "transrec"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from transrec.writers.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_synthetic(out, **TINY)
    return out


@pytest.fixture(scope="session")
def tiny_video_dataset(tmp_path_factory) -> Path:
    """TINY with all three modalities: text, image and video items."""
    from transrec.writers.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny-video"
    prepare_synthetic(out, **TINY_VIDEO)
    return out


@pytest.fixture(scope="session")
def ml100k_dataset(tmp_path_factory) -> Path:
    from transrec.writers.movielens import prepare_movielens

    out = tmp_path_factory.mktemp("data") / "ml-100k"
    prepare_movielens(ML100K, out, image_fraction=0.25, image_size=32)
    return out


LAUNCH_STEPS = 6  # the runs of `runs`: 48 users in global batches of 16, 3 steps per epoch, 2 epochs


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory) -> Path:
    """48 synthetic users, 40 items: the data of the launched runs."""
    from transrec.writers.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "syn"
    prepare_synthetic(out, users=48, items=40)
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, launch_dataset):
    """train(name, stage, *overrides, nproc=2, resume=False) -> the run directory of the tiny config launched on
    torchrun ranks (2 epochs, a checkpoint every step, the sample audit on), cached per argument list."""
    from transrec.trainer.torchrun_entry import launch

    output_dir = tmp_path_factory.mktemp("runs")
    done: dict[tuple, Path] = {}

    def train(name: str, stage: int, *overrides: str, nproc: int = 2, resume: bool = False) -> Path:
        key = (name, stage, overrides, nproc, resume)
        if key not in done:
            sets = [f"name={name}", f"output_dir={output_dir}", f"data.path={launch_dataset}", "train.epochs=2",
                    "train.log_every=1", "train.log_sample_ids=true", "train.checkpoint_every=1",
                    f"train.keep_checkpoints={LAUNCH_STEPS}", f"train.zero_stage={stage}", *overrides]
            result = launch(nproc, "tiny", sets, resume)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            done[key] = output_dir / name
        return done[key]

    return train
