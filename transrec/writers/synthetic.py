"""A generated mixture-of-modalities data set with structure a model can learn.

A fixed world of topics (words, poster colors and shapes, and which topic tends to follow which) is shared
by every seed; a seed draws its own items and users from it. Two seeds are thus two domains of one world:
nothing is shared, yet what a model learns on one (topic words, topic looks, topic succession) transfers.

- Items: a topic (balanced over topics), a text of 3-5 of its topic's words plus 0-2 noise words, a poster
  in the topic's colors and shape with per-item placement (image items), or a clip of that poster panned and
  zoomed, its colours drifting between the topic's (video items; clips.py), and a power-law popularity weight.
- Users: 1-3 favourite topics; the next item's topic follows the world's topic succession from the last
  item's topic or falls back to a favourite; within a topic, items are drawn by popularity, never twice.
  Sequences are generated in time order, so no timestamps are stored. Lengths follow a discrete power law
  p(L) ~ L^-length_exponent on min_len..max_len (0 = uniform); `MICROLENS` is MicroLens' shape.

Scale: users are drawn in parts of `users_per_part`, part p from its own seed (seed, p), vectorized over the
part's users, so the data set depends on neither the number of processes nor their order, and memory is
bounded by one part per process. With `workers` > 1, a forked process pool renders the posters and writes
each part as its own MDS shard set (dataset_writer.SequenceWriter), joined by one index per split. Train
samples hold `users_per_sample` sequences each (dataloading/dataset_format.py says why).
"""
from __future__ import annotations

import itertools
import multiprocessing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.batch import IMAGE, VIDEO
from transrec.dataloading.dataset_format import USERS_PER_SAMPLE
from transrec.writers.dataset_writer import (TOKENIZE_CHUNK, DatasetWriter, ItemRecord, SequenceWriter,
                                             choose_modalities)
from transrec.writers.clips import CLIP_FRAMES, render_clip
from transrec.writers.posters import RGB, SHAPES, render_poster, tag_color

TOPIC_WORDS: dict[str, tuple[str, ...]] = {  # real English words, so that the tokenizer sees real tokens
    "sports": tuple("football goal team coach stadium match league player score ball season champion".split()),
    "cooking": tuple("recipe kitchen bread soup oven garlic butter sauce dinner flavor chef salad".split()),
    "music": tuple("guitar song band concert piano melody album drum singer jazz rhythm chorus".split()),
    "space": tuple("planet rocket orbit star galaxy moon astronaut telescope comet launch mars solar".split()),
    "ocean": tuple("sea wave fish beach coral boat sailor island shark tide harbor whale".split()),
    "forest": tuple("tree wood leaf trail bear river mountain camp pine wolf moss valley".split()),
    "cars": tuple("engine wheel driver road race speed truck garage fuel highway motor brake".split()),
    "fashion": tuple("dress style shoes model design jacket silk color runway hat cotton boutique".split()),
    "finance": tuple("money bank market stock price trade profit budget loan credit tax investor".split()),
    "medicine": tuple("doctor hospital patient nurse health drug surgery heart virus clinic blood therapy".split()),
    "history": tuple("king empire war ancient castle battle queen century ruins army treaty dynasty".split()),
    "computers": tuple("software code data network computer program chip server robot internet screen".split()),
    "painting": tuple("paint canvas brush artist portrait gallery sketch museum drawing ink mural frame".split()),
    "pets": tuple("dog cat puppy kitten pet bird rabbit hamster leash collar vet parrot".split()),
    "weather": tuple("rain storm snow wind cloud thunder sun winter summer fog ice forecast".split()),
    "travel": tuple("hotel flight airport passport tour map journey luggage city train visa ticket".split()),
}
NOISE_WORDS = tuple("the new best story great day life world time guide little big first last night home".split())
WORLD_SEED = 20241124  # fixes the topic succession: the same for every data set seed
STAY, FOLLOW = 0.5, 0.35  # topic succession: stay on the topic, move to its successor; the rest spreads out
SUCCESSION_WEIGHT = 0.7  # share of next topics drawn from the succession; the rest from the user's favourites
POPULARITY_EXPONENT = 0.9  # item weight = rank ** -exponent
MAX_ITEM_TRIES = 32  # popularity draws before falling back to a uniform unseen item
USERS_PER_PART = 50_000  # users drawn (and, in parallel, written) together: one seed and one shard set each
# MicroLens (~1B interactions, ~1M items): histories of 5 to a few hundred items, ~29 on average
MICROLENS = {"min_len": 5, "max_len": 500, "length_exponent": 1.8}


@dataclass(frozen=True)
class World:
    topics: tuple[str, ...]
    succession: np.ndarray  # float [K, K], rows sum to 1: p(next topic | last topic)
    vocabulary: tuple[tuple[str, ...], ...]  # per topic, the words its items' texts are drawn from

    def colors(self, topic: int) -> list[RGB]:
        return [tag_color(self.topics[topic]), tag_color(self.topics[topic] + "/accent")]

    def shape(self, topic: int) -> str:
        return SHAPES[topic % len(SHAPES)]


def make_world(num_topics: int, shift: float = 0.0) -> World:
    """The world of `num_topics` topics. `shift` moves it away from the shift-0 world while keeping its topics
    (and their poster looks): a share `shift` of each topic's words is its word partner's (topic k - 1), and its
    succession is that share of the way to its order partner's (topic k + 1). Two different partners: were they
    one, a world at 1 would only rename the topics, and a text model would see the shift-0 world again. At 1 a
    topic's items read like one topic's did and follow another's order: what a model learned at 0 misleads it,
    from titles or from posters."""
    if not 1 <= num_topics <= len(TOPIC_WORDS):
        raise ValueError(f"topics must be in 1..{len(TOPIC_WORDS)}, got {num_topics}")
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"shift must be in [0, 1], got {shift}")
    cycle = np.random.default_rng(WORLD_SEED).permutation(num_topics)
    successor = np.empty(num_topics, np.int64)
    successor[cycle] = np.roll(cycle, -1)  # one cycle through all topics: no topic succeeds itself
    succession = np.full((num_topics, num_topics), (1 - STAY - FOLLOW) / num_topics)
    succession[np.arange(num_topics), np.arange(num_topics)] += STAY
    succession[np.arange(num_topics), successor] += FOLLOW
    succession /= succession.sum(1, keepdims=True)
    topics = tuple(list(TOPIC_WORDS)[:num_topics])
    partner = np.roll(np.arange(num_topics), 1)  # topic k's word partner: k - 1 (itself when there is one topic)
    order_partner = np.roll(np.arange(num_topics), -1)  # k + 1 (the word partner when there are two)
    succession = (1 - shift) * succession + shift * succession[np.ix_(order_partner, order_partner)]
    vocabulary = []
    for k, topic in enumerate(topics):
        own, theirs = TOPIC_WORDS[topic], TOPIC_WORDS[topics[partner[k]]]
        keep = round((1 - shift) * len(own))
        vocabulary.append(own[:keep] + theirs[keep:])
    return World(topics, succession, tuple(vocabulary))


@dataclass
class Catalogue:
    topic: np.ndarray  # int64 [N]
    weight: np.ndarray  # float [N], power-law popularity
    texts: list[str]


def make_catalogue(world: World, num_items: int, rng: np.random.Generator) -> Catalogue:
    if num_items < len(world.topics):
        raise ValueError(f"need at least one item per topic: items={num_items} < topics={len(world.topics)}")
    topic = rng.permutation(np.arange(num_items) % len(world.topics))
    weight = (rng.permutation(num_items) + 1.0) ** -POPULARITY_EXPONENT
    texts = []
    for k in topic:
        words = list(rng.choice(world.vocabulary[k], size=rng.integers(3, 6), replace=False))
        words += list(rng.choice(NOISE_WORDS, size=rng.integers(0, 3), replace=False))
        rng.shuffle(words)
        texts.append(" ".join(words).capitalize())
    return Catalogue(topic, weight, texts)


@dataclass
class UserModel:
    """How users are drawn (picklable: what a worker process needs to draw a part)."""

    world: World
    topic: np.ndarray  # int64 [N]: each item's topic
    weight: np.ndarray  # float [N]: each item's popularity weight
    seed: int
    min_len: int
    max_len: int
    length_exponent: float

    def __post_init__(self):
        if not 3 <= self.min_len <= min(self.max_len, len(self.topic)):
            raise ValueError(f"need 3 <= min_len <= min(max_len, items), got {self.min_len}, {self.max_len}, "
                             f"{len(self.topic)}")
        lengths = np.arange(self.min_len, min(self.max_len, len(self.topic)) + 1)  # no item occurs twice
        weights = lengths ** -float(self.length_exponent)
        self.lengths, self.length_cdf = lengths, np.cumsum(weights) / weights.sum()
        members = [np.flatnonzero(self.topic == k) for k in range(len(self.world.topics))]
        self._members = [(m, np.cumsum(self.weight[m])) for m in members]  # per topic, for inverse-CDF draws

    def mean_length(self) -> float:
        return float(np.diff(self.length_cdf, prepend=0.0) @ self.lengths)

    def users(self, part: int, count: int) -> list[np.ndarray]:
        """The chronological sequences of the `count` users of part `part`."""
        rng = np.random.default_rng([self.seed, part])
        lengths = self.lengths[np.searchsorted(self.length_cdf, rng.random(count), side="right")]
        topics = self._topic_walks(lengths, rng)
        owner = np.repeat(np.arange(count), lengths)
        items = self._dedup(owner, topics, self._draw(topics, rng), rng)
        return np.split(items, np.cumsum(lengths)[:-1])

    def _topic_walks(self, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Every user's topic per step, flat in (user, step) order; all users advance one step at a time."""
        count, num_topics = len(lengths), len(self.world.topics)
        favourites = np.argsort(rng.random((count, num_topics)), axis=1)[:, :3]  # distinct, random order
        num_favourites = np.minimum(rng.integers(1, 4, count), num_topics)
        succession = np.cumsum(self.world.succession, axis=1)
        order = np.argsort(-lengths, kind="stable")  # longest first: the users still walking are a prefix
        ascending = -lengths[order]
        walks = np.zeros((count, lengths.max()), np.int8)

        def favourite(users: np.ndarray) -> np.ndarray:
            return favourites[users, (rng.random(len(users)) * num_favourites[users]).astype(np.int64)]

        topic = favourite(order)
        for step in range(lengths.max()):
            walking = order[:np.searchsorted(ascending, -step, side="left")]  # length > step
            topic = topic[:len(walking)]
            walks[walking, step] = topic
            follows = (rng.random(len(walking))[:, None] > succession[topic]).sum(1).clip(max=num_topics - 1)
            topic = np.where(rng.random(len(walking)) < SUCCESSION_WEIGHT, follows, favourite(walking))
        return walks[np.arange(lengths.max()) < lengths[:, None]]

    def _draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An item of each position's topic, by popularity (inverse CDF)."""
        items = np.empty(len(topics), np.int64)
        for k, (members, cumulative) in enumerate(self._members):
            where = np.flatnonzero(topics == k)
            drawn = np.searchsorted(cumulative, rng.random(len(where)) * cumulative[-1], side="right")
            items[where] = members[drawn]
        return items

    def _dedup(self, owner: np.ndarray, topics: np.ndarray, items: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
        """Redraws every repeat of an item within a user's sequence: MAX_ITEM_TRIES times from the position's
        topic, then uniformly, until no user has an item twice."""
        checked = np.arange(len(items))  # positions of the users that may still hold a repeat
        for attempt in itertools.count():
            repeats = checked[_repeats(owner[checked], items[checked], len(self.topic))]
            if not len(repeats):
                return items
            if attempt < MAX_ITEM_TRIES:
                items[repeats] = self._draw(topics[repeats], rng)
            else:
                items[repeats] = rng.integers(0, len(self.topic), len(repeats))
            checked = checked[np.isin(owner[checked], owner[repeats])]


def _repeats(owner: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """bool: the positions whose (owner, item) pair occurred at an earlier position."""
    key = owner * num_items + items
    order = np.argsort(key, kind="stable")  # equal pairs stay in position order
    repeat = np.zeros(len(items), bool)
    repeat[order[1:][key[order][1:] == key[order][:-1]]] = True
    return repeat


def _item_records(args: tuple) -> list[ItemRecord]:
    """The records of items `first`..: their texts and topics given, posters and clips rendered here (in a worker)."""
    first, texts, topics, modality, num_topics, seed, image_size, frames = args
    world = make_world(num_topics)
    records = []
    for index, (text, topic, kind) in enumerate(zip(texts, topics, modality), start=first):
        look = (text, world.colors(topic), world.shape(topic), seed * 2**32 + index, image_size)
        jpeg = render_poster(*look) if kind == IMAGE else None
        clip = render_clip(*look, frames) if kind == VIDEO else None
        records.append(ItemRecord(f"s{seed}-i{index}", text, int(kind), jpeg, clip, frames if clip else 0))
    return records


_USER_MODEL: UserModel | None = None  # a pool worker's, set once by _init_worker


def _init_worker(model: UserModel) -> None:
    global _USER_MODEL
    _USER_MODEL = model


def _write_part(args: tuple) -> dict:
    """Draws part `part` and writes it as its own shard set under `root`; returns SequenceWriter.close()."""
    root, part, count, num_items, users_per_part, users_per_sample = args
    writer = SequenceWriter(root, num_items, part=f"part{part:05d}", first_user=part * users_per_part,
                            users_per_sample=users_per_sample)
    for sequence in _USER_MODEL.users(part, count):
        writer.add(sequence)
    return writer.close()


def prepare_synthetic(out: str | Path, users: int = 2000, items: int = 1000, seed: int = 0,
                      image_fraction: float = 0.5, min_len: int = 5, max_len: int = 50, topics: int = 16,
                      max_text_len: int = 32, tokenizer: str = "minilm", overwrite: bool = False,
                      image_size: int = 96, length_exponent: float = 0.0, workers: int = 1,
                      users_per_part: int = USERS_PER_PART, users_per_sample: int = USERS_PER_SAMPLE,
                      shift: float = 0.0, video_fraction: float = 0.0, clip_frames: int = CLIP_FRAMES) -> dict:
    """Generates a data set of `users` sequences over `items` items into `out`. Returns the manifest.

    Sequence lengths: p(L) ~ L^-length_exponent on min_len..max_len (0: uniform), capped at `items` (no item
    occurs twice in a sequence). A seeded share `image_fraction` of the items are images (posters), a further
    `video_fraction` videos (clips of `clip_frames` frames), both SYNTHETIC and `image_size` square. `workers`
    processes render posters and clips and write parts; the data set is the same for any number of them.
    `shift` moves the world away from the shared one (make_world): two seeds at shift 0 are two domains of one
    world; a target at shift s is s of the way to another world.
    """
    world = make_world(topics, shift)
    rng = np.random.default_rng(seed)
    catalogue = make_catalogue(world, items, rng)
    model = UserModel(world, catalogue.topic, catalogue.weight, seed, min_len, max_len, length_exponent)
    modality = choose_modalities(items, image_fraction, seed, video_fraction)
    parts = [(part, min(users_per_part, users - start)) for part, start in enumerate(range(0, users, users_per_part))]
    # forked before the tokenizer (and its threads) exist in this process; the workers inherit the model
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (model,)) if workers > 1 else nullcontext()
    with pool, DatasetWriter(out, tokenizer, max_text_len, overwrite, users_per_sample) as writer:
        imap = pool.imap if workers > 1 else map
        chunk = TOKENIZE_CHUNK
        chunks = [(first, catalogue.texts[first:first + chunk], catalogue.topic[first:first + chunk],
                   modality[first:first + chunk], topics, seed, image_size, clip_frames)
                  for first in range(0, items, chunk)]
        writer.write_items(itertools.chain.from_iterable(imap(_item_records, chunks)), items)
        if len(parts) == 1:  # one shard set, written here
            for sequence in model.users(0, users):
                writer.add_sequence(sequence)
        else:
            if workers == 1:
                _init_worker(model)
            for counts in imap(_write_part, [(writer.tmp, p, n, items, users_per_part, users_per_sample)
                                             for p, n in parts]):
                writer.add_part(counts)
        return writer.commit(
            name=f"synthetic-seed{seed}", source="synthetic", synthetic_images=bool((modality == IMAGE).any()),
            image_fraction=image_fraction, synthetic_videos=bool((modality == VIDEO).any()),
            video_fraction=video_fraction, clip_frames=clip_frames, image_size=image_size, seed=seed,
            params={"users": users, "items": items, "topics": topics, "min_len": min_len, "max_len": max_len,
                    "length_exponent": length_exponent, "users_per_part": users_per_part,
                    "shift": shift},
        )
