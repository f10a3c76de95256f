"""Raw data -> a dataset directory; `DatasetWriter` is the one writer of the format, used by every source.

```
DIR/manifest.json            counts, tokenizer, split rule, skipped rows, sha256 of sources and of every file
DIR/tokenizer/               tokenizer.save_pretrained(): the dataset is self-contained
DIR/items/modality.npy       int8 [N]: 0 = text, 1 = image
DIR/items/tokens.npy         int32 [N, max_text_len], right-padded with the tokenizer's pad id
DIR/items/token_lengths.npy  int32 [N]
DIR/items/image_offsets.npy  int64 [N+1]: item i's JPEG = images.bin[off[i]:off[i+1]] (empty for text items)
DIR/items/images.bin         concatenated JPEG bytes
DIR/items/popularity.npy     int64 [N]: occurrences of each item in the train part of all sequences
DIR/items/items.jsonl        {"index", "source_id", "text", "modality"} per item, for humans
DIR/train/                   MDS shards of blocks {"users", "lengths", "items"}: up to `users_per_sample`
                             sequences per sample, each minus its last two items, concatenated
DIR/eval/                    MDS shards {"user", "items"}: the full sequence (valid = items[-2], test = items[-1])
```
A train sample holds a block of sequences because streaming's per-epoch partition and shuffle are int64 arrays
over all samples, built in every loader worker: blocks divide that memory (at 1B interactions, 35M users are
4.3M samples of 8). The users of a block (consecutive users of the source) always share a batch. Evaluation
reads its split by user, without streaming: one sequence per sample.

Sequences written in parallel (`SequenceWriter` per part, in other processes) lie in `train/partNNNNN/` and
`eval/partNNNNN/`, each a shard set of its own, joined by one `index.json` per split (streaming's merge_index).
A directory appears complete or not at all: it is built in a temp dir beside DIR and renamed into place.
"""
from __future__ import annotations

import array
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from streaming import MDSWriter
from streaming.base.util import merge_index

from transrec.dataloading import resolve_pretrained_path
from transrec.batch import IMAGE, TEXT
from transrec.dataloading.dataset_format import FORMAT_VERSION, MANIFEST, DataError
from transrec.dataloading.posters import SHAPES, render_poster, tag_color
from transrec.fileio import describe_files, sha256_file

MIN_INTERACTIONS = 3  # train needs one item, valid and test one each
SPLIT_RULE = (
    "leave-one-out by timestamp (stable): train = all but last two, valid = second to last, test = last"
)
TRAIN_COLUMNS = {"users": "ndarray:int64", "lengths": "ndarray:int64", "items": "ndarray:int64"}
EVAL_COLUMNS = {"user": "int64", "items": "ndarray:int64"}
SHARD_SIZE_LIMIT = "64mb"
TOKENIZE_CHUNK = 4096  # items tokenized per call: bounds memory for large catalogues
POPULARITY_BATCH = 10_000  # sequences whose items are counted together


@dataclass
class ItemRecord:
    source_id: str
    text: str  # tokenized for every item, whatever its modality
    modality: int  # TEXT or IMAGE
    jpeg: bytes | None  # the image of an IMAGE item; None for TEXT items


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained_path(name), local_files_only=True)



def choose_modalities(num_items: int, image_fraction: float, seed: int) -> np.ndarray:
    """int8 [N]: exactly round(fraction * N) IMAGE items, picked by a seeded permutation."""
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
    modality = np.full(num_items, TEXT, np.int8)
    chosen = np.random.default_rng(seed).permutation(num_items)[: round(image_fraction * num_items)]
    modality[chosen] = IMAGE
    return modality


def pack_sequences(users: list[int], sequences: list[np.ndarray]) -> dict:
    """A train sample: a block of users' sequences."""
    return {"users": np.asarray(users, np.int64), "lengths": np.array([len(s) for s in sequences], np.int64),
            "items": np.concatenate(sequences).astype(np.int64, copy=False)}


def unpack_sequences(sample: dict) -> list[dict]:
    """A train sample -> its sequences {"user", "items"}."""
    ends = np.cumsum(sample["lengths"])
    if len(sample["users"]) != len(ends) or (len(ends) and ends[-1] != len(sample["items"])):
        raise ValueError(f"{len(sample['users'])} users, {len(ends)} lengths summing to "
                         f"{ends[-1] if len(ends) else 0}, {len(sample['items'])} items")
    return [{"user": int(user), "items": items}
            for user, items in zip(sample["users"], np.split(sample["items"], ends[:-1]))]


class SequenceWriter:
    """Writes users' chronological sequences (item indices) as MDS shards: `train/PART` gets each sequence
    minus its last two items, `users_per_sample` to a sample; `eval/PART` all of it, one per sample. Counts
    what it wrote; `part` "" = the split itself."""

    def __init__(self, root: Path, num_items: int, part: str = "", first_user: int = 0, users_per_sample: int = 1):
        if users_per_sample < 1:
            raise ValueError(f"users_per_sample must be 1 or more, got {users_per_sample}")
        self.train, self.eval = (MDSWriter(out=str(Path(root) / split / part), columns=columns,
                                           size_limit=SHARD_SIZE_LIMIT)
                                 for split, columns in (("train", TRAIN_COLUMNS), ("eval", EVAL_COLUMNS)))
        self.part, self.num_items, self.first_user = part, num_items, first_user
        self.users_per_sample = users_per_sample
        self._block: tuple[list[int], list[np.ndarray]] = ([], [])  # train sequences of the next sample
        self.num_users = self.num_interactions = self.short_users = 0
        self.popularity = np.zeros(num_items, np.int64)
        self._counted: list[np.ndarray] = []  # train items not yet in popularity (bincount in bulk: faster)

    def add(self, items: np.ndarray) -> bool:
        """Writes one sequence; a too-short one is counted in short_users and not written."""
        items = np.asarray(items, np.int64)
        if len(items) < MIN_INTERACTIONS:
            self.short_users += 1
            return False
        if items.min() < 0 or items.max() >= self.num_items:
            raise ValueError(f"sequence holds an item outside 0..{self.num_items - 1} (write_items first)")
        user, train = self.first_user + self.num_users, items[:-2]
        self._block[0].append(user)
        self._block[1].append(train)
        if len(self._block[0]) == self.users_per_sample:
            self._write_block()
        self.eval.write({"user": user, "items": items})
        self._counted.append(train)
        if len(self._counted) >= POPULARITY_BATCH:
            self._count_popularity()
        self.num_users += 1
        self.num_interactions += len(items)
        return True

    def _write_block(self) -> None:
        if self._block[0]:
            self.train.write(pack_sequences(*self._block))
            self._block = ([], [])

    def _count_popularity(self) -> None:
        if self._counted:
            self.popularity += np.bincount(np.concatenate(self._counted), minlength=self.num_items)
            self._counted = []

    def close(self) -> dict:
        """Finishes the shards (and their index.json); returns the counts, as DatasetWriter.add_part takes them."""
        self._write_block()
        self.train.finish()
        self.eval.finish()
        self._count_popularity()
        return {"part": self.part, "num_users": self.num_users, "num_interactions": self.num_interactions,
                "short_users": self.short_users, "popularity": self.popularity}


class DatasetWriter:
    """Writes one dataset directory atomically.

    Use as a context manager: `write_items` once, then the sequences, either `add_sequence` per user
    (chronological item indices) or, from other processes, a `SequenceWriter(writer.tmp, num_items, part)`
    per part whose `close()` result goes to `add_part`; then `commit(**manifest_fields)` renames the
    finished temp dir to `out`. On an exception the temp dir is removed and `out` is untouched.
    """

    def __init__(self, out: str | Path, tokenizer: str, max_text_len: int, overwrite: bool = False,
                 users_per_sample: int = 1):
        self.out = Path(out).absolute()
        self.users_per_sample = users_per_sample
        self.overwrite = overwrite
        self._check_target()
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_text_len = max_text_len
        self.num_items = 0
        self.num_users = 0
        self.num_interactions = 0
        self.skipped = Counter({"short_users": 0})
        self._popularity = np.zeros(0, np.int64)
        self._modality_counts = {"text": 0, "image": 0}
        self._sequences: SequenceWriter | None = None  # add_sequence's writer, opened on first use
        self._parts: list[str] = []

    def _check_target(self) -> None:
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True to replace it")

    def __enter__(self) -> "DatasetWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / "items").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish_sequences()
        shutil.rmtree(self.tmp, ignore_errors=True)  # after commit it no longer exists

    def write_items(self, records: Iterable[ItemRecord], num_items: int) -> None:
        """Tokenizes every item's text and stores the JPEGs of image items, in record order (= item index)."""
        items_dir = self.tmp / "items"
        tokens = np.lib.format.open_memmap(items_dir / "tokens.npy", "w+", np.int32, (num_items, self.max_text_len))
        lengths = np.zeros(num_items, np.int32)
        modality = np.zeros(num_items, np.int8)
        offsets = np.zeros(num_items + 1, np.int64)
        count = 0
        with open(items_dir / "images.bin", "wb") as images, open(items_dir / "items.jsonl", "w") as listing:
            for chunk in _chunks(records, TOKENIZE_CHUNK):
                if count + len(chunk) > num_items:
                    raise ValueError(f"more than the announced {num_items} item records")
                rows = slice(count, count + len(chunk))
                tokens[rows], lengths[rows] = self._tokenize([r.text for r in chunk])
                for index, record in enumerate(chunk, start=count):
                    modality[index] = record.modality
                    if record.modality == IMAGE:
                        images.write(record.jpeg)
                    offsets[index + 1] = images.tell()
                    listing.write(json.dumps({"index": index, "source_id": record.source_id, "text": record.text,
                                              "modality": int(record.modality)}) + "\n")
                count += len(chunk)
        if count != num_items:
            raise ValueError(f"{count} item records, {num_items} announced")
        tokens.flush()
        del tokens
        np.save(items_dir / "token_lengths.npy", lengths)
        np.save(items_dir / "modality.npy", modality)
        np.save(items_dir / "image_offsets.npy", offsets)
        self.num_items = num_items
        self._popularity = np.zeros(num_items, np.int64)
        self._modality_counts = {"text": int((modality == TEXT).sum()), "image": int((modality == IMAGE).sum())}

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_text_len, padding="max_length",
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].sum(1).astype(np.int32)

    def add_sequence(self, items: np.ndarray) -> bool:
        """Writes one user's chronological sequence; a too-short one is counted in skipped and not written."""
        if self._sequences is None:
            if self._parts:
                raise ValueError("add_sequence after add_part: a dataset is written one way or the other")
            self._sequences = SequenceWriter(self.tmp, self.num_items, users_per_sample=self.users_per_sample)
        return self._sequences.add(items)

    def add_part(self, counts: dict) -> None:
        """Takes a part written by `SequenceWriter(self.tmp, num_items, part, first_user, users_per_sample)` (its
        close() result)."""
        if self._sequences is not None or not counts["part"]:
            raise ValueError("add_part takes named parts, and no add_sequence beside them")
        self._parts.append(counts["part"])
        self._add_counts(counts)

    def _add_counts(self, counts: dict) -> None:
        self.num_users += counts["num_users"]
        self.num_interactions += counts["num_interactions"]
        self.skipped["short_users"] += counts["short_users"]
        self._popularity += counts["popularity"]

    def _finish_sequences(self) -> None:
        if self._sequences is not None:
            self._add_counts(self._sequences.close())
            self._sequences = None

    def commit(self, name: str, source: str, synthetic_images: bool, image_fraction: float,
               skipped: dict | None = None, sources: dict | None = None, **extra) -> dict:
        """Finishes every file, writes the manifest and renames the directory into place. Returns the manifest."""
        self._finish_sequences()  # the MDS shards and their index.json
        if self.num_users == 0:
            raise DataError(f"{name}: no user has {MIN_INTERACTIONS} or more interactions")
        for split in ("train", "eval"):  # parts written in parallel: one index per split over all of them
            if self._parts:
                merge_index([str(self.tmp / split / part / "index.json") for part in self._parts],
                            str(self.tmp / split))
        np.save(self.tmp / "items" / "popularity.npy", self._popularity)
        self.tokenizer.save_pretrained(self.tmp / "tokenizer")
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "source": source,
            "synthetic_images": synthetic_images,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "users_per_sample": self.users_per_sample,
            "modality_counts": self._modality_counts,
            "tokenizer": self.tokenizer_name,
            "max_text_len": self.max_text_len,
            "image_fraction": image_fraction,
            "split": SPLIT_RULE,
            "skipped": {**(skipped or {}), **self.skipped},
            "sources": sources or {},
            **extra,
            "files": describe_files(self.tmp),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self._move_into_place()
        return manifest

    def _move_into_place(self) -> None:
        self._check_target()
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        os.replace(self.out, old / "dataset")
        os.replace(self.tmp, self.out)
        shutil.rmtree(old)


def _chunks(records: Iterable[ItemRecord], size: int) -> Iterator[list[ItemRecord]]:
    chunk: list[ItemRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk




# ---- MovieLens (RecBole atomic files) -------------------------------------------------------------------

ITEM_FIELDS = ("item_id", "movie_title", "release_year", "class")
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp")


@dataclass
class Movie:
    source_id: str
    title: str
    year: str
    genres: list[str]

    @property
    def text(self) -> str:
        return " ".join(part for part in (self.title, f"({self.year})" if self.year else "", " ".join(self.genres))
                        if part)


class _RowProblems:
    """Raises a DataError for a bad row, or counts it under `kind` when bad rows are skipped."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts = Counter({kind: 0 for kind in ("malformed_item_rows", "duplicate_item_rows",
                                                    "malformed_interaction_rows", "unknown_item_interactions")})

    def __call__(self, kind: str, path: Path, line_no: int, message: str) -> None:
        if not self.skip:
            raise DataError(f"{path}: line {line_no}: {message}")
        self.counts[kind] += 1


def _find_one(src: Path, suffix: str) -> Path:
    found = sorted(src.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DataError(f"{src}: expected exactly one *{suffix} file, found {len(found)}")
    return found[0]


def _read_atomic(path: Path, fields: tuple[str, ...], kind: str, problems: _RowProblems
                 ) -> Iterator[tuple[int, list[str]]]:
    """Yields (line number, values of `fields`) per well-formed row of a tab-separated atomic file."""
    with open(path, "rb") as f:
        try:
            header = f.readline().decode("utf-8").rstrip("\r\n").split("\t")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: line 1: header is not UTF-8 ({err})") from None
        names = [column.split(":", 1)[0] for column in header]
        missing = [name for name in fields if name not in names]
        if missing:
            raise DataError(f"{path}: line 1: header has no column {missing[0]!r} (columns: {', '.join(names)})")
        picks = [names.index(name) for name in fields]
        for line_no, raw in enumerate(f, start=2):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems(kind, path, line_no, f"not UTF-8 ({err})")
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline too many) are not rows
            values = line.rstrip("\r\n").split("\t")
            if len(values) != len(names):
                problems(kind, path, line_no, f"expected {len(names)} tab-separated columns, got {len(values)}")
                continue
            yield line_no, [values[i] for i in picks]


def _read_movies(path: Path, problems: _RowProblems) -> list[Movie]:
    movies: list[Movie] = []
    seen: set[str] = set()
    for line_no, (item_id, title, year, genres) in _read_atomic(path, ITEM_FIELDS, "malformed_item_rows", problems):
        if item_id in seen:
            problems("duplicate_item_rows", path, line_no, f"item_id {item_id!r} appears twice")
            continue
        if not title.strip():
            problems("malformed_item_rows", path, line_no, f"item_id {item_id!r} has an empty title")
            continue
        seen.add(item_id)
        movies.append(Movie(item_id, title.strip(), year.strip(), genres.split()))
    return movies


def _read_sequences(path: Path, item_index: dict[str, int], problems: _RowProblems) -> list[np.ndarray]:
    """Each user's items sorted by timestamp (stable: ties keep file order), users by first appearance."""
    user_index: dict[str, int] = {}
    users, items, times = array.array("q"), array.array("q"), array.array("d")
    for line_no, (user_id, item_id, timestamp) in _read_atomic(path, INTERACTION_FIELDS,
                                                              "malformed_interaction_rows", problems):
        try:
            when = float(timestamp)
        except ValueError:
            when = float("nan")
        if not np.isfinite(when):
            problems("malformed_interaction_rows", path, line_no, f"timestamp {timestamp!r} is not a number")
            continue
        if item_id not in item_index:
            problems("unknown_item_interactions", path, line_no, f"item_id {item_id!r} is not in the item file")
            continue
        users.append(user_index.setdefault(user_id, len(user_index)))
        items.append(item_index[item_id])
        times.append(when)
    if not users:
        return []
    user_arr, item_arr = np.frombuffer(users, np.int64), np.frombuffer(items, np.int64)
    order = np.lexsort((np.frombuffer(times, np.float64), user_arr))  # lexsort is stable
    starts = np.flatnonzero(np.diff(user_arr[order])) + 1
    return np.split(item_arr[order], starts)


def _movie_records(movies: list[Movie], modality: np.ndarray, image_size: int) -> Iterator[ItemRecord]:
    for index, movie in enumerate(movies):
        jpeg = None
        if modality[index] == IMAGE:
            title = f"{movie.title} ({movie.year})" if movie.year else movie.title
            jpeg = render_poster(title, [tag_color(g) for g in movie.genres], SHAPES[index % len(SHAPES)],
                                 seed=index, size=image_size)
        yield ItemRecord(movie.source_id, movie.text, int(modality[index]), jpeg)


DOMAINS = ("", "a", "b")


def split_domain(movies: list[Movie], sequences: list[np.ndarray], domain: str, seed: int
                 ) -> tuple[list[Movie], list[np.ndarray]]:
    """Domain "a" or "b" of two that share no user and no item: a seeded half of the users with their
    interactions on a seeded half of the items (the other halves are the other domain; interactions across
    them are in neither). Items are renumbered within the domain."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be a or b (or empty for all), got {domain!r}")
    if not domain:
        return movies, sequences
    rng = np.random.default_rng([seed, 1])
    wanted = domain == "a"
    item_in_a = rng.permutation(len(movies)) < len(movies) // 2
    user_in_a = rng.permutation(len(sequences)) < len(sequences) // 2
    kept = np.flatnonzero(item_in_a == wanted)
    renumber = np.full(len(movies), -1, np.int64)
    renumber[kept] = np.arange(len(kept))
    return ([movies[i] for i in kept],
            [renumber[seq[item_in_a[seq] == wanted]] for seq, in_a in zip(sequences, user_in_a) if in_a == wanted])


def prepare_movielens(src: str | Path, out: str | Path, image_fraction: float = 0.0, skip_bad_rows: bool = False,
                      max_text_len: int = 32, tokenizer: str = "minilm", overwrite: bool = False,
                      image_size: int = 96, seed: int = 0, domain: str = "", users_per_sample: int = 1) -> dict:
    """MovieLens in RecBole atomic files (`*.inter`, `*.item` in `src`) -> dataset directory `out`.

    Item text = "Title (Year) Genre1 Genre2". A seeded share `image_fraction` of the items become image
    items whose JPEG is a poster rendered from their metadata. With `domain` "a" or "b", only that one of
    two domains with disjoint users and items (see split_domain). One user per train sample by default: at
    this size streaming's per-sample arrays cost nothing, and the shuffle is per user. Returns the manifest.
    """
    src = Path(src)
    inter_path, item_path = _find_one(src, ".inter"), _find_one(src, ".item")
    problems = _RowProblems(skip_bad_rows)
    movies = _read_movies(item_path, problems)
    sequences = _read_sequences(inter_path, {m.source_id: i for i, m in enumerate(movies)}, problems)
    movies, sequences = split_domain(movies, sequences, domain, seed)
    modality = choose_modalities(len(movies), image_fraction, seed)
    with DatasetWriter(out, tokenizer, max_text_len, overwrite, users_per_sample) as writer:
        writer.write_items(_movie_records(movies, modality, image_size), len(movies))
        for sequence in sequences:
            writer.add_sequence(sequence)
        return writer.commit(
            name=inter_path.stem, source="movielens", synthetic_images=bool((modality == IMAGE).any()),
            image_fraction=image_fraction, skipped=dict(problems.counts),
            sources={p.name: sha256_file(p) for p in (inter_path, item_path)}, image_size=image_size, seed=seed,
            domain=domain or "all",
        )
