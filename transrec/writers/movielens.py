"""MovieLens in RecBole atomic files (`*.inter`, `*.item`) -> a dataset directory, optionally one of two
domains with disjoint users and items, a share of its items shown as SYNTHETIC posters or clips."""
from __future__ import annotations

import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from transrec.batch import IMAGE, VIDEO
from transrec.dataloading.dataset_format import DataError, UserAttribute
from transrec.fileio import sha256_file
from transrec.writers.dataset_writer import DatasetWriter, ItemRecord, choose_modalities
from transrec.writers.clips import CLIP_FRAMES, render_clip
from transrec.writers.posters import SHAPES, render_poster, tag_color

ITEM_FIELDS = ("item_id", "movie_title", "release_year", "class")
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp")
USER_FIELDS = ("user_id", "age", "gender", "occupation")
ATTRIBUTES = ("gender", "age", "occupation")  # what the data set keeps of each user (a user-attribute task's labels)
# age -> the first bucket whose bound it is under: ml-100k's ages in years and ml-1m's age codes (1, 18, 25, 35, 45,
# 50, 56: the lower ends of its ranges) fall into the same four
AGE_BUCKETS = ((25, "<25"), (35, "25-34"), (45, "35-44"), (float("inf"), "45+"))


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
                                                    "malformed_interaction_rows", "unknown_item_interactions",
                                                    "malformed_user_rows")})

    def __call__(self, kind: str, path: Path, line_no: int, message: str) -> None:
        if not self.skip:
            raise DataError(f"{path}: line {line_no}: {message}")
        self.counts[kind] += 1


def _find_one(src: Path, suffix: str, optional: bool = False) -> Path | None:
    found = sorted(src.glob(f"*{suffix}"))
    if len(found) > 1 or not (found or optional):
        raise DataError(f"{src}: expected {'at most' if optional else 'exactly'} one *{suffix} file, "
                        f"found {len(found)}")
    return found[0] if found else None


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


def _read_sequences(path: Path, item_index: dict[str, int], problems: _RowProblems
                    ) -> tuple[list[str], list[np.ndarray]]:
    """The users' source ids and each one's items sorted by timestamp (stable: ties keep file order), users by
    first appearance."""
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
        return [], []
    user_arr, item_arr = np.frombuffer(users, np.int64), np.frombuffer(items, np.int64)
    order = np.lexsort((np.frombuffer(times, np.float64), user_arr))  # lexsort is stable
    starts = np.flatnonzero(np.diff(user_arr[order])) + 1
    return list(user_index), np.split(item_arr[order], starts)


def _read_users(path: Path, problems: _RowProblems) -> dict[str, dict[str, str | None]]:
    """Source user id -> its ATTRIBUTES (age by bucket; None where the row leaves one empty), from a *.user file."""
    people: dict[str, dict[str, str | None]] = {}
    for line_no, (user_id, age, gender, occupation) in _read_atomic(path, USER_FIELDS, "malformed_user_rows", problems):
        if user_id in people or not age.strip().isdigit():
            problems("malformed_user_rows", path, line_no, f"user_id {user_id!r} appears twice" if user_id in people
                     else f"age {age!r} is not a whole number")
            continue
        bucket = next(name for bound, name in AGE_BUCKETS if int(age) < bound)
        people[user_id] = {"gender": gender.strip() or None, "age": bucket, "occupation": occupation.strip() or None}
    return people


def _user_attributes(people: dict[str, dict[str, str | None]], users: list[str]) -> dict[str, UserAttribute]:
    """Each attribute of `users` (source ids, in the data set's order; one with no row: unknown)."""
    classes = {"age": [name for _, name in AGE_BUCKETS]}  # in age order; the others sorted
    return {name: UserAttribute.from_values([people.get(user, {}).get(name) for user in users], classes.get(name))
            for name in ATTRIBUTES}


def _movie_records(movies: list[Movie], modality: np.ndarray, image_size: int) -> Iterator[ItemRecord]:
    for index, movie in enumerate(movies):
        title = f"{movie.title} ({movie.year})" if movie.year else movie.title
        look = (title, [tag_color(g) for g in movie.genres], SHAPES[index % len(SHAPES)], index, image_size)
        jpeg = render_poster(*look) if modality[index] == IMAGE else None
        clip = render_clip(*look) if modality[index] == VIDEO else None
        yield ItemRecord(movie.source_id, movie.text, int(modality[index]), jpeg, clip, CLIP_FRAMES if clip else 0)


DOMAINS = ("", "a", "b")
SPLITS = ("random", "genre")
SOURCE_GENRES = frozenset({"Drama", "Comedy"})  # the genre split: domain a = these movies, b = the rest


def split_domain(movies: list[Movie], users: list[str], sequences: list[np.ndarray], domain: str, seed: int,
                 split: str = "random") -> tuple[list[Movie], list[str], list[np.ndarray]]:
    """Domain "a" or "b" of two that share no user and no item: a seeded half of the users with their
    interactions on one side's items (the other halves are the other domain; interactions across them are in
    neither). The items are split in halves by a seeded permutation (`split` "random"), or by genre ("genre":
    a = every movie with a genre in SOURCE_GENRES, b = the rest). Items are renumbered within the domain."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be a or b (or empty for all), got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not domain:
        return movies, users, sequences
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
    mine = np.flatnonzero(user_in_a == wanted)
    return ([movies[i] for i in kept], [users[u] for u in mine],
            [renumber[sequences[u][item_in_a[sequences[u]] == wanted]] for u in mine])


def prepare_movielens(src: str | Path, out: str | Path, image_fraction: float = 0.0, skip_bad_rows: bool = False,
                      max_text_len: int = 32, tokenizer: str = "minilm", overwrite: bool = False,
                      image_size: int = 96, seed: int = 0, domain: str = "", users_per_sample: int = 1,
                      split: str = "random", video_fraction: float = 0.0) -> dict:
    """MovieLens in RecBole atomic files (`*.inter`, `*.item` in `src`) -> dataset directory `out`.

    Item text = "Title (Year) Genre1 Genre2". A seeded share `image_fraction` of the items become image
    items whose JPEG is a poster rendered from their metadata, a further `video_fraction` video items whose clip
    pans and zooms across that poster (SYNTHETIC both: clips.py). With `domain` "a" or "b", only that one of
    two domains with disjoint users and items, its items a random half or one side of a genre split (`split`,
    see split_domain). One user per train sample by default: at
    this size streaming's per-sample arrays cost nothing, and the shuffle is per user. Returns the manifest.
    With a `*.user` file in `src` (ml-100k, ml-1m), the data set keeps each user's gender, age bucket (<25, 25-34,
    35-44, 45+) and occupation: the labels of `transrec finetune --task user-attribute`.
    """
    src = Path(src)
    inter_path, item_path = _find_one(src, ".inter"), _find_one(src, ".item")
    user_path = _find_one(src, ".user", optional=True)
    problems = _RowProblems(skip_bad_rows)
    movies = _read_movies(item_path, problems)
    users, sequences = _read_sequences(inter_path, {m.source_id: i for i, m in enumerate(movies)}, problems)
    movies, users, sequences = split_domain(movies, users, sequences, domain, seed, split)
    people = _read_users(user_path, problems) if user_path else None
    modality = choose_modalities(len(movies), image_fraction, seed, video_fraction)
    with DatasetWriter(out, tokenizer, max_text_len, overwrite, users_per_sample) as writer:
        writer.write_items(_movie_records(movies, modality, image_size), len(movies))
        written = [user for user, sequence in zip(users, sequences) if writer.add_sequence(sequence)]
        if people is not None:
            writer.write_user_attributes(_user_attributes(people, written))
        return writer.commit(
            name=inter_path.stem, source="movielens", synthetic_images=bool((modality == IMAGE).any()),
            image_fraction=image_fraction, synthetic_videos=bool((modality == VIDEO).any()),
            video_fraction=video_fraction, skipped=dict(problems.counts),
            sources={p.name: sha256_file(p) for p in (inter_path, item_path, user_path) if p}, image_size=image_size,
            seed=seed,
            domain=domain or "all", domain_split=split if domain else "",
        )
