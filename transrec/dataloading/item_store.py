"""The item table of a dataset directory: O(1) access to any item's tokens (memory-mapped), JPEG and clip (pread)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
import numpy as np
import torch

from transrec.batch import IMAGE, TEXT, VIDEO, ItemBatch
from transrec.dataloading import images, videos
from transrec.dataloading.decoding import DecodeError
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.videos import VideoDecoder
from transrec.dataloading.dataset_format import (USER_ATTRIBUTES, VIDEO_ARRAYS, DatasetFileError, UserAttribute,
                                                 load_user_attributes, read_manifest)
from transrec.fileio import sha256_file

log = logging.getLogger("transrec.data")
ITEM_ARRAYS = ("modality", "tokens", "token_lengths", "image_offsets", "popularity")
# the encoded content of image and video items: (offsets array, bytes file) under items/
CONTENT = {IMAGE: ("image_offsets", "images.bin"), VIDEO: ("video_offsets", "videos.bin")}
VERIFY_MODES = ("full", "size")
# Which encoder gets an item (= model.item_encoder): by its modality, every item as text, every item as an
# image, every item as a video, or none (an ID table needs only `ids`).
ITEM_MODES = ("mom", "text", "image", "video", "id")


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
        self.catalogue = str(self.root.resolve())  # what an ItemBatch's ids index (towers cache per catalogue)
        self.manifest = read_manifest(self.root)
        self.file_problems: dict[str, str] = {}
        for relpath, problem in file_problems(self.root, self.manifest, mode=verify, skip=unverified):
            problem = f"{self.root / relpath}: {problem}"
            if not (relpath.startswith(tolerate) and (self.root / relpath).is_file()):
                raise DatasetFileError(problem)
            self.file_problems[relpath] = problem
        self._open_pid: int | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._fds: dict[int, int] = {}  # modality -> its bytes file, open in this process

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_open_pid=None, _arrays={}, _fds={})  # reopened in each process, not copied
        return state

    def _array(self, name: str) -> np.ndarray:
        if self._open_pid != os.getpid():
            items = self.root / "items"
            self._arrays = {n: np.load(items / f"{n}.npy", mmap_mode="r") for n in ITEM_ARRAYS}
            if (items / "videos.bin").is_file():
                self._arrays.update({n: np.load(items / f"{n}.npy", mmap_mode="r") for n in VIDEO_ARRAYS})
            else:  # a data set written before video items (dataset_format.py): it has none
                self._arrays.update(video_offsets=np.zeros(self.num_items + 1, np.int64),
                                    video_frames=np.zeros(self.num_items, np.int32))
            # JPEGs and clips are read with pread, not mapped: a map would keep every one read so far resident in
            # each process (a page holds several), growing it with the catalogue; the page cache still shares them
            self._fds = {modality: os.open(items / file, os.O_RDONLY)
                         for modality, (_, file) in CONTENT.items() if (items / file).is_file()}
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

    @property
    def video_frames(self) -> np.ndarray:
        """int32 [N]: the frames of each item's clip (0: not a video item)."""
        return self._array("video_frames")

    def content_spans(self, ids: np.ndarray, modality: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the encoded content (JPEG or clip, CONTENT) of `ids` starts in its file, and its size (0: none)."""
        offsets = self._array(CONTENT[modality][0])
        return offsets[ids], offsets[np.asarray(ids) + 1] - offsets[ids]

    def features(self, name: str) -> np.ndarray:
        """float32 [N, width], memory-mapped: the item features `name` (`transrec features`), checked with every
        other file when the store opened."""
        if name not in self.manifest.get("features", {}):
            known = ", ".join(self.manifest.get("features", {})) or "none"
            raise DatasetFileError(f"{self.root}: no item features {name!r} (has: {known}); compute them with "
                                   f"`transrec features --data {self.root} --name {name} ...`")
        return np.load(self.root / "features" / f"{name}.npy", mmap_mode="r")

    def user_attribute(self, name: str) -> UserAttribute:
        """Every user's attribute `name` (a user-attribute task's labels), checked with every other file when the
        store opened."""
        if USER_ATTRIBUTES not in self.manifest["files"]:
            raise DatasetFileError(f"{self.root}: the data set has no user attributes ({USER_ATTRIBUTES}): its source "
                                   f"gave none (`transrec prepare movielens` reads them from a *.user file)")
        attributes = load_user_attributes(self.root / USER_ATTRIBUTES)
        if name not in attributes:
            raise DatasetFileError(f"{self.root / USER_ATTRIBUTES}: no user attribute {name!r} "
                                   f"(has: {', '.join(attributes)})")
        return attributes[name]

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

    def content_heads(self, ids: np.ndarray, modality: int, size: int) -> np.ndarray:
        """uint8 [n, size]: the first bytes of the JPEGs or clips of `ids` (each at least `size` long)."""
        heads = [self._read(modality, int(start), size) for start in self.content_spans(ids, modality)[0]]
        return np.array(heads, np.uint8).reshape(-1, size)

    def jpeg(self, index: int) -> np.ndarray:
        """The encoded JPEG of item `index` (empty for an item that is not an image)."""
        return self._content(IMAGE, index)

    def clip(self, index: int) -> np.ndarray:
        """The encoded clip (WebM bytes) of item `index` (empty for an item that is not a video)."""
        return self._content(VIDEO, index)

    def _content(self, modality: int, index: int) -> np.ndarray:
        offsets = self._array(CONTENT[modality][0])
        return self._read(modality, int(offsets[index]), int(offsets[index + 1] - offsets[index]))

    def _read(self, modality: int, start: int, size: int) -> np.ndarray:
        self._array("modality")  # opens the files in this process
        out = np.empty(size, np.uint8)
        if size and os.preadv(self._fds[modality], [out], start) != size:
            raise DatasetFileError(f"{self.root / 'items' / CONTENT[modality][1]}: ends before byte {start + size} "
                                   "(truncated since it was checked?)")
        return out

    def item_batch(self, ids: np.ndarray, decoder: ImageDecoder | None = None, mode: str = "mom",
                   video_decoder: VideoDecoder | None = None) -> ItemBatch:
        """The ItemBatch of distinct items `ids`, rows routed by `mode` (see ITEM_MODES); images decoded when a
        decoder is given, clips (their frames sampled evenly) when a video decoder is (one that does not decode
        is logged and shown blank), else only their bytes gathered."""
        ids = np.asarray(ids, np.int64)
        text_rows, image_rows, video_rows = self.route(ids, mode)
        input_ids, attention_mask = self.tokens(ids[text_rows])
        items = ItemBatch(
            ids=torch.from_numpy(ids.copy()),
            text_rows=torch.from_numpy(text_rows),
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            image_rows=torch.from_numpy(image_rows),
            images=None,
            jpegs=[self.jpeg(i) for i in ids[image_rows]],
            video_rows=torch.from_numpy(video_rows),
            encoded_clips=[self.clip(i) for i in ids[video_rows]],
            catalogue=self.catalogue,
        )
        for modality, error in self.decode(items, decoder, video_decoder):
            log.warning("%s: %s; shown blank", self.content_file(modality), error)
        return items

    def content_file(self, modality: int) -> Path:
        """The file of the encoded images or clips (CONTENT)."""
        return self.root / "items" / CONTENT[modality][1]

    def decode(self, items: ItemBatch, decoder: ImageDecoder | None, video_decoder: VideoDecoder | None,
               frame_seed: tuple[int, ...] | None = None) -> list[tuple[int, DecodeError]]:
        """Decodes the images and clips of `items` in place with the decoders given, each clip's frames drawn with
        `frame_seed` (`videos.sample_frames`; None: evenly). Returns (modality, error) of each image or clip that
        does not decode, shown blank."""
        problems: list[tuple[int, DecodeError]] = []
        if decoder is not None:
            items.images, errors = images.decode_or_blank(decoder, items.jpegs, items.ids[items.image_rows])
            problems += [(IMAGE, error) for error in errors]
        if video_decoder is not None:
            ids = items.ids[items.video_rows].numpy()
            frame_indices = video_decoder.frame_indices(self.video_frames[ids], ids, frame_seed)
            items.clips, errors = videos.decode_or_blank(video_decoder, items.encoded_clips, frame_indices, ids)
            items.frame_indices = torch.from_numpy(frame_indices)
            problems += [(VIDEO, error) for error in errors]
        return problems

    def route(self, ids: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text rows, image rows, video rows) of `ids` under `mode`."""
        rows, none = np.arange(len(ids)), np.zeros(0, np.int64)
        modality = self.modality[ids]
        if mode == "mom":
            return tuple(np.flatnonzero(modality == code) for code in (TEXT, IMAGE, VIDEO))
        if mode == "text":  # every item has a text
            return rows, none, none
        for name, code, routed in (("image", IMAGE, (none, rows, none)), ("video", VIDEO, (none, none, rows))):
            if mode == name:
                if (modality != code).any():
                    raise ValueError(f"item {ids[modality != code][0]} has no {name}: mode {name!r} needs a data set "
                                     f"whose items are all {name}s (prepare with {name}_fraction=1)")
                return routed
        if mode == "id":
            return none, none, none
        raise ValueError(f"item mode must be one of {ITEM_MODES}, got {mode!r}")
