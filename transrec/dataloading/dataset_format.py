"""The dataset format's version, file names and errors: what the CLI needs, without streaming or transformers.
The format itself is described, and written, in prepare.py."""

FORMAT_VERSION = 2  # 2: train samples are blocks of sequences
MANIFEST = "manifest.json"
USERS_PER_SAMPLE = 8  # train sequences per sample of a large data set (synthetic's default)


class DataError(ValueError):
    """Bad input data; the message names the file and the 1-based line."""


class DatasetFileError(RuntimeError):
    """A file of a dataset directory is missing or differs from what the manifest recorded."""
