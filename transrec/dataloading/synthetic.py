"""A generated mixture-of-modalities data set with structure a model can learn.

A fixed world of topics (words, poster colors and shapes, and which topic tends to follow which) is shared
by every seed; a seed draws its own items and users from it. Two seeds are thus two domains of one world:
nothing is shared, yet what a model learns on one (topic words, topic looks, topic succession) transfers.

- Items: a topic (balanced over topics), a text of 3-5 of its topic's words plus 0-2 noise words, a poster
  in the topic's colors and shape with per-item placement, and a power-law popularity weight.
- Users: 1-3 favourite topics; the next item's topic follows the world's topic succession from the last
  item's topic or falls back to a favourite; within a topic, items are drawn by popularity, never twice.
  Sequences are generated in time order, so no timestamps are stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from transrec.dataloading.batch import IMAGE
from transrec.dataloading.posters import RGB, SHAPES, render_poster, tag_color
from transrec.dataloading.prepare import DatasetWriter, ItemRecord, choose_modalities

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


@dataclass(frozen=True)
class World:
    topics: tuple[str, ...]
    succession: np.ndarray  # float [K, K], rows sum to 1: p(next topic | last topic)

    def colors(self, topic: int) -> list[RGB]:
        return [tag_color(self.topics[topic]), tag_color(self.topics[topic] + "/accent")]

    def shape(self, topic: int) -> str:
        return SHAPES[topic % len(SHAPES)]


def make_world(num_topics: int) -> World:
    if not 1 <= num_topics <= len(TOPIC_WORDS):
        raise ValueError(f"topics must be in 1..{len(TOPIC_WORDS)}, got {num_topics}")
    cycle = np.random.default_rng(WORLD_SEED).permutation(num_topics)
    successor = np.empty(num_topics, np.int64)
    successor[cycle] = np.roll(cycle, -1)  # one cycle through all topics: no topic succeeds itself
    succession = np.full((num_topics, num_topics), (1 - STAY - FOLLOW) / num_topics)
    succession[np.arange(num_topics), np.arange(num_topics)] += STAY
    succession[np.arange(num_topics), successor] += FOLLOW
    return World(tuple(list(TOPIC_WORDS)[:num_topics]), succession / succession.sum(1, keepdims=True))


@dataclass
class Catalogue:
    topic: np.ndarray  # int64 [N]
    weight: np.ndarray  # float [N], power-law popularity
    texts: list[str]

    def members(self, topic: int) -> tuple[np.ndarray, np.ndarray]:
        """Items of `topic` and their cumulative popularity (for inverse-CDF draws)."""
        members = np.flatnonzero(self.topic == topic)
        return members, np.cumsum(self.weight[members])


def make_catalogue(world: World, num_items: int, rng: np.random.Generator) -> Catalogue:
    if num_items < len(world.topics):
        raise ValueError(f"need at least one item per topic: items={num_items} < topics={len(world.topics)}")
    topic = rng.permutation(np.arange(num_items) % len(world.topics))
    weight = (rng.permutation(num_items) + 1.0) ** -POPULARITY_EXPONENT
    texts = []
    for k in topic:
        words = list(rng.choice(TOPIC_WORDS[world.topics[k]], size=rng.integers(3, 6), replace=False))
        words += list(rng.choice(NOISE_WORDS, size=rng.integers(0, 3), replace=False))
        rng.shuffle(words)
        texts.append(" ".join(words).capitalize())
    return Catalogue(topic, weight, texts)


def _draw_item(members: np.ndarray, cumulative: np.ndarray, seen: set[int], num_items: int,
               rng: np.random.Generator) -> int:
    for _ in range(MAX_ITEM_TRIES):
        item = int(members[np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")])
        if item not in seen:
            return item
    unseen = np.setdiff1d(np.arange(num_items), np.fromiter(seen, np.int64))
    return int(rng.choice(unseen))


def user_sequence(world: World, catalogue: Catalogue, members: list[tuple[np.ndarray, np.ndarray]], length: int,
                  rng: np.random.Generator) -> np.ndarray:
    num_topics, num_items = len(world.topics), len(catalogue.topic)
    favourites = rng.choice(num_topics, size=min(num_topics, int(rng.integers(1, 4))), replace=False)
    topic = int(rng.choice(favourites))
    sequence: list[int] = []
    seen: set[int] = set()
    for _ in range(length):
        item = _draw_item(*members[topic], seen, num_items, rng)
        sequence.append(item)
        seen.add(item)
        last = int(catalogue.topic[item])
        if rng.random() < SUCCESSION_WEIGHT:
            topic = int(rng.choice(num_topics, p=world.succession[last]))
        else:
            topic = int(rng.choice(favourites))
    return np.array(sequence, np.int64)


def _item_records(world: World, catalogue: Catalogue, modality: np.ndarray, seed: int, image_size: int
                  ) -> Iterator[ItemRecord]:
    for index, (topic, text) in enumerate(zip(catalogue.topic, catalogue.texts)):
        jpeg = None
        if modality[index] == IMAGE:
            jpeg = render_poster(text, world.colors(topic), world.shape(topic), seed=seed * 2**32 + index,
                                 size=image_size)
        yield ItemRecord(f"s{seed}-i{index}", text, int(modality[index]), jpeg)


def prepare_synthetic(out: str | Path, users: int = 2000, items: int = 1000, seed: int = 0,
                      image_fraction: float = 0.5, min_len: int = 5, max_len: int = 50, topics: int = 16,
                      max_text_len: int = 32, tokenizer: str = "minilm", overwrite: bool = False,
                      image_size: int = 96) -> dict:
    """Generates a data set of `users` sequences over `items` items into `out`. Returns the manifest.

    Sequence lengths are uniform in min_len..max_len, capped at `items` (no item occurs twice in a sequence).
    """
    if not 3 <= min_len <= min(max_len, items):
        raise ValueError(f"need 3 <= min_len <= min(max_len, items), got {min_len}, {max_len}, {items}")
    longest = min(max_len, items)
    world = make_world(topics)
    rng = np.random.default_rng(seed)
    catalogue = make_catalogue(world, items, rng)
    modality = choose_modalities(items, image_fraction, seed)
    members = [catalogue.members(k) for k in range(topics)]
    with DatasetWriter(out, tokenizer, max_text_len, overwrite) as writer:
        writer.write_items(_item_records(world, catalogue, modality, seed, image_size), items)
        for _ in range(users):
            writer.add_sequence(user_sequence(world, catalogue, members, int(rng.integers(min_len, longest + 1)), rng))
        return writer.commit(
            name=f"synthetic-seed{seed}", source="synthetic", synthetic_images=True, image_fraction=image_fraction,
            image_size=image_size, seed=seed,
            params={"users": users, "items": items, "topics": topics, "min_len": min_len, "max_len": max_len},
        )
