"""MovieLens in RecBole atomic files (`*.inter`, `*.item`) -> a dataset directory, optionally one of two
domains with disjoint users and items, a share of its items shown as SYNTHETIC posters."""
from __future__ import annotations

import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from transrec.batch import IMAGE
from transrec.dataloading.dataset_format import DataError
from transrec.fileio import sha256_file
from transrec.writers.dataset_writer import DatasetWriter, ItemRecord, choose_modalities
from transrec.writers.posters import SHAPES, render_poster, tag_color

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
            if not line.endswith("\n"):  # a file cut short: its last row may parse, and be wrong
                problems(kind, path, line_no, "the file ends inside this row (truncated?)")
                continue
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
SPLITS = ("random", "genre")
SOURCE_GENRES = frozenset({"Drama", "Comedy"})  # the genre split: domain a = these movies, b = the rest


def split_domain(movies: list[Movie], sequences: list[np.ndarray], domain: str, seed: int, split: str = "random"
                 ) -> tuple[list[Movie], list[np.ndarray]]:
    """Domain "a" or "b" of two that share no user and no item: a seeded half of the users with their
    interactions on one side's items (the other halves are the other domain; interactions across them are in
    neither). The items are split in halves by a seeded permutation (`split` "random"), or by genre ("genre":
    a = every movie with a genre in SOURCE_GENRES, b = the rest). Items are renumbered within the domain."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be a or b (or empty for all), got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not domain:
        return movies, sequences
    rng = np.random.default_rng([seed, 1])
    wanted = domain == "a"
    if split == "genre":
        item_in_a = np.array([bool(SOURCE_GENRES.intersection(m.genres)) for m in movies])
        rng.permutation(len(movies))  # the users' halves are the same under both splits
    else:
        item_in_a = rng.permutation(len(movies)) < len(movies) // 2
    user_in_a = rng.permutation(len(sequences)) < len(sequences) // 2
    kept = np.flatnonzero(item_in_a == wanted)
    renumber = np.full(len(movies), -1, np.int64)
    renumber[kept] = np.arange(len(kept))
    return ([movies[i] for i in kept],
            [renumber[seq[item_in_a[seq] == wanted]] for seq, in_a in zip(sequences, user_in_a) if in_a == wanted])


def prepare_movielens(src: str | Path, out: str | Path, image_fraction: float = 0.0, skip_bad_rows: bool = False,
                      max_text_len: int = 32, tokenizer: str = "minilm", overwrite: bool = False,
                      image_size: int = 96, seed: int = 0, domain: str = "", users_per_sample: int = 1,
                      split: str = "random") -> dict:
    """MovieLens in RecBole atomic files (`*.inter`, `*.item` in `src`) -> dataset directory `out`.

    Item text = "Title (Year) Genre1 Genre2". A seeded share `image_fraction` of the items become image
    items whose JPEG is a poster rendered from their metadata. With `domain` "a" or "b", only that one of
    two domains with disjoint users and items, its items a random half or one side of a genre split (`split`,
    see split_domain). One user per train sample by default: at
    this size streaming's per-sample arrays cost nothing, and the shuffle is per user. Returns the manifest.
    """
    src = Path(src)
    inter_path, item_path = _find_one(src, ".inter"), _find_one(src, ".item")
    problems = _RowProblems(skip_bad_rows)
    movies = _read_movies(item_path, problems)
    sequences = _read_sequences(inter_path, {m.source_id: i for i, m in enumerate(movies)}, problems)
    movies, sequences = split_domain(movies, sequences, domain, seed, split)
    modality = choose_modalities(len(movies), image_fraction, seed)
    with DatasetWriter(out, tokenizer, max_text_len, overwrite, users_per_sample) as writer:
        writer.write_items(_movie_records(movies, modality, image_size), len(movies))
        for sequence in sequences:
            writer.add_sequence(sequence)
        return writer.commit(
            name=inter_path.stem, source="movielens", synthetic_images=bool((modality == IMAGE).any()),
            image_fraction=image_fraction, skipped=dict(problems.counts),
            sources={p.name: sha256_file(p) for p in (inter_path, item_path)}, image_size=image_size, seed=seed,
            domain=domain or "all", domain_split=split if domain else "",
        )
