"""The item table of a dataset directory: O(1) access to any item's tokens (memory-mapped) and JPEG (pread)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
import numpy as np
import torch

from transrec.batch import IMAGE, TEXT, ItemBatch
from transrec.dataloading.images import ImageDecoder, decode_or_blank
from transrec.dataloading.dataset_format import DatasetFileError, read_manifest
from transrec.fileio import sha256_file

log = logging.getLogger("transrec.data")
ITEM_ARRAYS = ("modality", "tokens", "token_lengths", "image_offsets", "popularity")
VERIFY_MODES = ("full", "size")
# Which encoder gets an item (= model.item_encoder): by its modality, every item as text, every item as an
# image, or none (an ID table needs only `ids`).
ITEM_MODES = ("mom", "text", "image", "id")


def size_problem(size: int, expected: int) -> str | None:
    return None if size == expected else f"{size} bytes, the manifest says {expected} (truncated or replaced?)"


def file_problems(root: str | Path, manifest: dict, mode: str = "full", skip: tuple[str, ...] = ()):
    """Yields (relpath, what is wrong) for every file of `manifest["files"]`, but those under `skip` prefixes,
    that is missing or has another size, or (mode "full") another sha256."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {mode!r}")
    root = Path(root)
    for relpath, expected in manifest["files"].items():
        if relpath.startswith(skip):
            continue
        path = root / relpath
        if not path.is_file():
            yield relpath, "missing"
        elif wrong_size := size_problem(path.stat().st_size, expected["bytes"]):
            yield relpath, wrong_size
        elif mode == "full" and sha256_file(path) != expected["sha256"]:
            yield relpath, "sha256 differs from the manifest (corrupted?)"


class ItemStore:
    """Items of a dataset directory, opened lazily per process so that it pickles into DataLoader workers.

    Opening checks the whole directory against its manifest (`verify`: "full" = sizes and sha256, "size");
    `unverified` names path prefixes not to check (a remote dataset's train shards, which stream). A problem
    raises DatasetFileError, but that of a file present under a `tolerate` prefix, which goes to
    `file_problems` (relpath -> message) for the caller to handle.
    """

    def __init__(self, root: str | Path, verify: str = "full", unverified: tuple[str, ...] = (),
                 tolerate: tuple[str, ...] = ()):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.file_problems: dict[str, str] = {}
        for relpath, problem in file_problems(self.root, self.manifest, mode=verify, skip=unverified):
            problem = f"{self.root / relpath}: {problem}"
            if not (relpath.startswith(tolerate) and (self.root / relpath).is_file()):
                raise DatasetFileError(problem)
            self.file_problems[relpath] = problem
        self._open_pid: int | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._images_fd: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_open_pid=None, _arrays={}, _images_fd=None)  # reopened in each process, not copied
        return state

    def _array(self, name: str) -> np.ndarray:
        if self._open_pid != os.getpid():
            items = self.root / "items"
            self._arrays = {n: np.load(items / f"{n}.npy", mmap_mode="r") for n in ITEM_ARRAYS}
            # JPEGs are read with pread, not mapped: a map would keep every JPEG read so far resident in each
            # process (a page holds several), growing it with the catalogue; the page cache still shares them
            self._images_fd = os.open(items / "images.bin", os.O_RDONLY)
            self._open_pid = os.getpid()
        return self._arrays[name]

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def modality(self) -> np.ndarray:
        return self._array("modality")

    @property
    def token_lengths(self) -> np.ndarray:
        return self._array("token_lengths")

    def image_spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the JPEGs of `ids` start in images.bin, and their sizes (0: no image)."""
        offsets = self._array("image_offsets")
        return offsets[ids], offsets[np.asarray(ids) + 1] - offsets[ids]

    def features(self, name: str) -> np.ndarray:
        """float32 [N, width], memory-mapped: the item features `name` (`transrec features`), checked with every
        other file when the store opened."""
        if name not in self.manifest.get("features", {}):
            known = ", ".join(self.manifest.get("features", {})) or "none"
            raise DatasetFileError(f"{self.root}: no item features {name!r} (has: {known}); compute them with "
                                   f"`transrec features --data {self.root} --name {name} ...`")
        return np.load(self.root / "features" / f"{name}.npy", mmap_mode="r")

    @property
    def popularity(self) -> np.ndarray:
        """int64 [N] train counts, a writable copy (small; torch.as_tensor warns on read-only memory maps)."""
        return np.array(self._array("popularity"))

    def tokens(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int64 [n, L] and attention mask int64 [n, L] of `ids`, L = the longest of them (>= 1)."""
        ids = np.asarray(ids, np.int64)
        lengths = self._array("token_lengths")[ids]
        width = max(1, int(lengths.max(initial=0)))
        token_ids = self._array("tokens")[ids, :width].astype(np.int64)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return token_ids, mask

    def image_heads(self, ids: np.ndarray, size: int = 2) -> np.ndarray:
        """uint8 [n, size]: the first bytes of the images of `ids` (each at least `size` long)."""
        heads = [self._read_image(int(start), size) for start in self.image_spans(ids)[0]]
        return np.array(heads, np.uint8).reshape(-1, size)

    def jpeg(self, index: int) -> np.ndarray:
        """The encoded JPEG of item `index` (empty for a text item)."""
        offsets = self._array("image_offsets")
        return self._read_image(int(offsets[index]), int(offsets[index + 1] - offsets[index]))

    def _read_image(self, start: int, size: int) -> np.ndarray:
        self._array("image_offsets")  # opens images.bin in this process
        out = np.empty(size, np.uint8)
        if size and os.preadv(self._images_fd, [out], start) != size:
            raise DatasetFileError(f"{self.root / 'items' / 'images.bin'}: ends before byte {start + size} "
                                   "(truncated since it was checked?)")
        return out

    def item_batch(self, ids: np.ndarray, decoder: ImageDecoder | None = None, mode: str = "mom") -> ItemBatch:
        """The ItemBatch of distinct items `ids`, rows routed by `mode` (see ITEM_MODES); images decoded when a
        decoder is given (an image that does not decode is logged and shown blank), else only their JPEGs
        gathered."""
        ids = np.asarray(ids, np.int64)
        text_rows, image_rows = self.route(ids, mode)
        input_ids, attention_mask = self.tokens(ids[text_rows])
        jpegs = [self.jpeg(i) for i in ids[image_rows]]
        images = None
        if decoder is not None:
            images, errors = decode_or_blank(decoder, jpegs, ids[image_rows])
            for error in errors:
                log.warning("%s: %s; shown blank", self.root / "items" / "images.bin", error)
        return ItemBatch(
            ids=torch.from_numpy(ids.copy()),
            text_rows=torch.from_numpy(text_rows),
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            image_rows=torch.from_numpy(image_rows),
            images=images,
            jpegs=jpegs,
        )

    def route(self, ids: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(text rows, image rows) of `ids` under `mode`."""
        rows, none = np.arange(len(ids)), np.zeros(0, np.int64)
        modality = self.modality[ids]
        if mode == "mom":
            return np.flatnonzero(modality == TEXT), np.flatnonzero(modality == IMAGE)
        if mode == "text":  # every item has a text
            return rows, none
        if mode == "image":
            if (modality != IMAGE).any():
                raise ValueError(f"item {ids[modality != IMAGE][0]} has no image: mode 'image' needs a data set "
                                 "whose items are all images (prepare with image_fraction=1)")
            return none, rows
        if mode == "id":
            return none, none
        raise ValueError(f"item mode must be one of {ITEM_MODES}, got {mode!r}")
