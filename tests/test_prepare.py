from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ML100K, TINY, flip_last_byte
from transrec.writers import movielens as movielens_module
from transrec.batch import IMAGE, TEXT
from transrec.dataloading.loader import _ShardedSequences
from transrec.dataloading.dataset_format import (
    SPLIT_RULE, USERS_PER_SAMPLE, DataError, DatasetFileError, load_tokenizer, pack_sequences, unpack_sequences,
)
from transrec.dataloading.item_store import ItemStore
from transrec.fileio import sha256_file
from transrec.writers.movielens import prepare_movielens
from transrec.writers.synthetic import TOPIC_WORDS, make_world, prepare_synthetic

ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
ITEMS = ["1\tAlpha\t1990\tDrama", "2\tBeta\t1991\tComedy", "3\tGamma\t\tAction Drama", "4\tDelta\t1993\tHorror"]


def write_source(root: Path, interactions: list[str], items: list[str] = ITEMS, users: list[str] | None = None
                 ) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy.item").write_text(ITEM_HEADER + "\n".join(items) + "\n")
    (root / "toy.inter").write_text(INTER_HEADER + "\n".join(interactions) + "\n")
    if users is not None:
        (root / "toy.user").write_text(USER_HEADER + "\n".join(users) + "\n")
    return root


def sequences(dataset: Path, split: str) -> list[np.ndarray]:
    rows = list(_ShardedSequences(dataset / split))
    assert [int(r["user"]) for r in rows] == list(range(len(rows)))
    return [r["items"] for r in rows]


def read_items(dataset: Path) -> list[dict]:
    return [json.loads(line) for line in (dataset / "items" / "items.jsonl").read_text().splitlines()]


def test_movielens_counts_split_and_order(ml100k_dataset):
    manifest = json.loads((ml100k_dataset / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (943, 1682, 100000)
    assert manifest["split"] == SPLIT_RULE and manifest["source"] == "movielens"
    assert manifest["skipped"]["short_users"] == 0
    full, train = sequences(ml100k_dataset, "eval"), sequences(ml100k_dataset, "train")
    assert len(full) == len(train) == 943 and sum(map(len, full)) == 100000
    for whole, part in zip(full, train):
        np.testing.assert_array_equal(part, whole[:-2])
    popularity = np.load(ml100k_dataset / "items" / "popularity.npy")
    np.testing.assert_array_equal(popularity, np.bincount(np.concatenate(train), minlength=1682))

    # independent reference: stable sort by timestamp, users by first appearance, items by item-file order
    source_ids = [item["source_id"] for item in read_items(ml100k_dataset)]
    by_user: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for line in (ML100K / "ml-100k.inter").read_text().splitlines()[1:]:
        user, item, _, when = line.split("\t")
        by_user[user].append((float(when), item))
    expected = [[item for _, item in sorted(rows, key=lambda r: r[0])] for rows in by_user.values()]
    assert [[source_ids[i] for i in seq] for seq in full] == expected


def test_movielens_items_tokens_and_manifest_checksums(ml100k_dataset):
    manifest = json.loads((ml100k_dataset / "manifest.json").read_text())
    items = read_items(ml100k_dataset)
    assert items[0] == {"index": 0, "source_id": "1", "text": "Toy Story (1995) Animation Children's Comedy",
                        "modality": int(np.load(ml100k_dataset / "items" / "modality.npy")[0])}
    tokenizer = load_tokenizer(str(ml100k_dataset / "tokenizer"))
    tokens = np.load(ml100k_dataset / "items" / "tokens.npy")
    lengths = np.load(ml100k_dataset / "items" / "token_lengths.npy")
    assert tokens.dtype == np.int32 and tokens.shape == (1682, manifest["max_text_len"])
    assert list(tokens[0, :lengths[0]]) == tokenizer(items[0]["text"])["input_ids"]
    assert tokenizer.decode(tokens[0, :lengths[0]], skip_special_tokens=True).startswith("toy story ( 1995 ) animation")
    assert (tokens[0, lengths[0]:] == tokenizer.pad_token_id).all()
    on_disk = {p.relative_to(ml100k_dataset).as_posix() for p in ml100k_dataset.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    for relpath, entry in manifest["files"].items():
        path = ml100k_dataset / relpath
        assert (path.stat().st_size, sha256_file(path)) == (entry["bytes"], entry["sha256"])
    assert manifest["sources"]["ml-100k.inter"] == sha256_file(ML100K / "ml-100k.inter")


def test_image_fraction_is_honoured_with_posters(ml100k_dataset):
    modality = np.load(ml100k_dataset / "items" / "modality.npy")
    offsets = np.load(ml100k_dataset / "items" / "image_offsets.npy")
    images = (ml100k_dataset / "items" / "images.bin").read_bytes()
    assert (modality == IMAGE).sum() == round(0.25 * 1682)
    sizes = np.diff(offsets)
    assert (sizes[modality == TEXT] == 0).all() and (sizes[modality == IMAGE] > 0).all()
    first, second = np.flatnonzero(modality == IMAGE)[:2]
    posters = [np.asarray(Image.open(io.BytesIO(images[offsets[i]:offsets[i + 1]])).convert("RGB"))
               for i in (first, second)]
    assert posters[0].shape == (32, 32, 3) and not np.array_equal(posters[0], posters[1])


def test_ties_keep_file_order(tmp_path, ml100k_dataset):
    src = write_source(tmp_path / "src", ["7\t3\t5\t100", "7\t1\t5\t100", "7\t2\t5\t100", "7\t4\t5\t50", "8\t1\t5\t9",
                                          "8\t2\t5\t9", "8\t3\t5\t9", ""])  # and a blank last line
    manifest = prepare_movielens(src, tmp_path / "out", tokenizer=str(ml100k_dataset / "tokenizer"))
    assert manifest["num_users"] == 2
    # items 1..4 are indices 0..3; user 7's item 4 comes first (earlier), then the tie in file order 3, 1, 2
    assert [list(s) for s in sequences(tmp_path / "out", "eval")] == [[3, 2, 0, 1], [0, 1, 2]]


def test_domains_a_and_b_share_no_user_and_no_item(tmp_path):
    items = [f"{i}\tMovie{i}\t199{i}\tDrama" for i in range(1, 9)]
    # user u watches all 8 items in its own order, so a domain's sequence tells which user it is
    orders = {u: np.random.default_rng(u).permutation(np.arange(1, 9)) for u in range(1, 7)}
    rows = [f"{u}\t{item}\t4\t{t}" for u, order in orders.items() for t, item in enumerate(order)]
    src = write_source(tmp_path / "src", rows, items, users=[f"{u}\t30\tF\tjob{u}\t0" for u in orders])
    seen: dict[str, tuple[set, set]] = {}
    for domain in ("a", "b"):
        manifest = prepare_movielens(src, tmp_path / domain, domain=domain)
        assert manifest["domain"] == domain and manifest["num_items"] == 4 and manifest["num_users"] == 3
        ids = [item["source_id"] for item in read_items(tmp_path / domain)]
        occupation = ItemStore(tmp_path / domain).user_attribute("occupation")
        users = set()
        for user, seq in enumerate(sequences(tmp_path / domain, "eval")):
            watched = [ids[i] for i in seq]
            owner = [u for u, order in orders.items() if [str(i) for i in order if str(i) in ids] == watched]
            assert len(owner) == 1  # the user's own items of this domain, in the user's own order
            assert occupation.classes[occupation.codes[user]] == f"job{owner[0]}"  # and its own attributes
            users.add(owner[0])
        seen[domain] = users, set(ids)
    assert not seen["a"][0] & seen["b"][0] and not seen["a"][1] & seen["b"][1]


def test_the_genre_split_puts_every_item_on_one_side_and_shares_no_user(tmp_path):
    genres = ["Drama", "Comedy", "Action Comedy", "Drama Romance", "Action", "Horror", "Sci-Fi War", "Western"] * 2
    items = [f"{i}\tMovie{i}\t1990\t{g}" for i, g in enumerate(genres, start=1)]
    # user u watches all 16 items in its own order: a domain's sequence tells which user it is
    orders = {u: np.random.default_rng(u).permutation(np.arange(1, 17)) for u in range(1, 9)}
    rows = [f"{u}\t{item}\t4\t{t}" for u, order in orders.items() for t, item in enumerate(order)]
    src = write_source(tmp_path / "src", rows, items)
    sides = {}
    for domain in ("a", "b"):
        manifest = prepare_movielens(src, tmp_path / domain, domain=domain, split="genre")
        assert manifest["domain_split"] == "genre"
        ids = [item["source_id"] for item in read_items(tmp_path / domain)]
        owners = {next(u for u, order in orders.items() if [str(i) for i in order if str(i) in ids] == [ids[i] for i in seq])
                  for seq in sequences(tmp_path / domain, "eval")}
        sides[domain] = set(ids), owners
    assert sides["a"][0] == {"1", "2", "3", "4", "9", "10", "11", "12"}  # dramas and comedies
    assert sides["b"][0] == {"5", "6", "7", "8", "13", "14", "15", "16"}
    assert len(sides["a"][1]) == len(sides["b"][1]) == 4 and not sides["a"][1] & sides["b"][1]
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_movielens(src, tmp_path / "x", domain="a", split="year")


def test_unknown_tokenizer_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not 'minilm' and not a directory"):
        prepare_movielens(write_source(tmp_path / "src", ["7\t1\t5\t1"]), tmp_path / "out", tokenizer="bert-nope")


@pytest.mark.parametrize("bad_row, line, problem", [
    ("7\t2\t5", 4, "expected 4 tab-separated columns, got 3"),
    ("7\t2\t5\tyesterday", 4, "timestamp 'yesterday' is not a number"),
    ("7\t99\t5\t10", 4, "item_id '99' is not in the item file"),
])
def test_bad_rows_raise_naming_file_and_line(tmp_path, bad_row, line, problem):
    src = write_source(tmp_path / "src", ["7\t1\t5\t1", "7\t3\t5\t2", bad_row, "7\t4\t5\t3"])
    with pytest.raises(DataError) as caught:
        prepare_movielens(src, tmp_path / "out")
    assert str(caught.value) == f"{src / 'toy.inter'}: line {line}: {problem}"
    assert not (tmp_path / "out").exists()


def test_a_file_cut_inside_its_last_row_is_an_error_or_a_skipped_row(tmp_path):
    src = write_source(tmp_path / "src", ["7\t1\t5\t1", "7\t3\t5\t2", "7\t4\t5\t3", "7\t2\t5\t4"])
    inter = src / "toy.inter"
    inter.write_bytes(inter.read_bytes()[:-3])  # "7\t2\t5\t" then nothing: it would parse as timestamp 0
    inter.write_bytes(inter.read_bytes() + b"0")
    with pytest.raises(DataError, match=r"toy\.inter: line 5: the file ends inside this row \(truncated\?\)"):
        prepare_movielens(src, tmp_path / "out")
    manifest = prepare_movielens(src, tmp_path / "out", skip_bad_rows=True)
    assert manifest["skipped"]["malformed_interaction_rows"] == 1 and manifest["num_interactions"] == 3


def test_bad_item_row_raises(tmp_path):
    src = write_source(tmp_path / "src", ["7\t1\t5\t1"], items=ITEMS + ["5\tOnly two"])
    with pytest.raises(DataError, match=r"toy\.item: line 6: expected 4"):
        prepare_movielens(src, tmp_path / "out")


def test_skip_bad_rows_counts_them(tmp_path):
    src = write_source(tmp_path / "src", [
        "7\t1\t5\t1", "7\t2\t5\t2", "7\t3\t5\tsoon", "7\t9\t5\t4", "7\t4\t5\t5", "7\t3", "8\t1\t5\t1", "8\t2\t5\t2",
    ], items=ITEMS + ["1\tDuplicate\t1999\tDrama"], users=["7\t24\tF\twriter\t1", "8\tadult\tM\tartist\t2"])
    manifest = prepare_movielens(src, tmp_path / "out", skip_bad_rows=True)
    assert manifest["skipped"] == {"malformed_item_rows": 0, "duplicate_item_rows": 1, "malformed_interaction_rows": 2,
                                   "unknown_item_interactions": 1, "malformed_user_rows": 1, "short_users": 1}
    assert (manifest["num_users"], manifest["num_interactions"], manifest["num_items"]) == (1, 3, 4)
    assert [list(s) for s in sequences(tmp_path / "out", "eval")] == [[0, 1, 3]]


def test_user_attributes_are_kept_per_written_user_and_checked_by_the_manifest(tmp_path):
    # users by first appearance: 8 (45, M, doctor), 6 (too short: not written), 7 (24, F, writer), 9 (no row in
    # the user file: unknown); 10 has a row and no interaction
    interactions = [f"{u}\t{i}\t5\t{i}" for i in (1, 2, 3) for u in (8, 6, 7, 9) if (u, i) != (6, 3)]
    src = write_source(tmp_path / "src", interactions,
                       users=["7\t24\tF\twriter\t1", "6\t30\tM\tartist\t2", "8\t45\tM\tdoctor\t3",
                              "10\t35\tF\tartist\t4"])
    manifest = prepare_movielens(src, tmp_path / "out")
    assert manifest["num_users"] == 3 and "toy.user" in manifest["sources"]
    store = ItemStore(tmp_path / "out")
    expected = {"gender": (["F", "M"], [1, 0, -1]), "age": (["<25", "25-34", "35-44", "45+"], [3, 0, -1]),
                "occupation": (["doctor", "writer"], [0, 1, -1])}
    for name, (classes, codes) in expected.items():
        attribute = store.user_attribute(name)
        assert (attribute.classes, attribute.codes.tolist()) == (classes, codes)
    flip_last_byte(tmp_path / "out" / "users" / "attributes.json")
    with pytest.raises(DatasetFileError, match="users/attributes.json: sha256 differs from the manifest"):
        ItemStore(tmp_path / "out")


def test_failure_leaves_nothing_and_existing_dir_is_kept(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src", ["7\t1\t5\t1", "7\t2\t5\t2", "7\t3\t5\t3"])
    out = tmp_path / "data" / "out"

    def broken_poster(*args, **kwargs):
        raise RuntimeError("poster renderer broke")

    monkeypatch.setattr(movielens_module, "render_poster", broken_poster)
    with pytest.raises(RuntimeError, match="poster renderer broke"):
        prepare_movielens(src, out, image_fraction=1.0)
    assert list((tmp_path / "data").iterdir()) == []  # neither `out` nor a temp dir

    first = prepare_movielens(src, out)
    with pytest.raises(FileExistsError):
        prepare_movielens(src, out)
    with pytest.raises(RuntimeError):
        prepare_movielens(src, out, image_fraction=1.0, overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == first
    monkeypatch.undo()
    second = prepare_movielens(src, out, image_fraction=1.0, overwrite=True)
    assert second["modality_counts"] == {"text": 0, "image": 4, "video": 0}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["out"]


def test_train_samples_are_blocks_of_users(tiny_dataset, ml100k_dataset):
    """Synthetic data: USERS_PER_SAMPLE train sequences per sample, in user order; MovieLens: one."""
    train = _ShardedSequences(tiny_dataset / "train")
    assert len(train) == 120 // USERS_PER_SAMPLE
    sequences = list(train)
    assert [s["user"] for s in sequences] == list(range(120))
    assert [s["sample_id"] for s in sequences] == [user // USERS_PER_SAMPLE for user in range(120)]
    for sequence, whole in zip(sequences, _ShardedSequences(tiny_dataset / "eval")):
        np.testing.assert_array_equal(sequence["items"], whole["items"][:-2])
    assert json.loads((tiny_dataset / "manifest.json").read_text())["users_per_sample"] == USERS_PER_SAMPLE
    assert len(_ShardedSequences(ml100k_dataset / "train")) == 943


def test_a_block_that_does_not_add_up_is_an_error():
    block = pack_sequences([4, 5], [np.array([1, 2]), np.array([3])])
    assert [(s["user"], s["items"].tolist()) for s in unpack_sequences(block)] == [(4, [1, 2]), (5, [3])]
    with pytest.raises(ValueError, match="2 users, 2 lengths summing to 3, 2 items"):
        unpack_sequences({**block, "items": block["items"][:2]})


def test_synthetic_is_deterministic_and_seeds_are_domains(tiny_dataset, tmp_path):
    again = prepare_synthetic(tmp_path / "again", **TINY)
    other = prepare_synthetic(tmp_path / "other", **{**TINY, "seed": 1})
    first = json.loads((tiny_dataset / "manifest.json").read_text())
    assert again["files"] == first["files"]
    assert other["files"]["items/items.jsonl"] != first["files"]["items/items.jsonl"]
    assert other["files"]["train/shard.00000.mds"] != first["files"]["train/shard.00000.mds"]
    assert first["num_users"] == TINY["users"] and first["modality_counts"] == {"text": 40, "image": 40, "video": 0}
    assert first["synthetic_images"] and not first["synthetic_videos"]  # labelled by what the data set holds
    lengths = [len(s) for s in sequences(tiny_dataset, "eval")]
    assert min(lengths) >= TINY["min_len"] and max(lengths) <= TINY["max_len"]
    assert all(len(set(s)) == len(s) for s in sequences(tiny_dataset, "eval"))


def test_synthetic_sequences_follow_the_topic_succession(tmp_path):
    manifest = prepare_synthetic(tmp_path / "syn", users=300, items=160, topics=8, image_fraction=0.0, seed=3)
    world = make_world(8)
    topic_of_word = {word: k for k, topic in enumerate(world.topics) for word in TOPIC_WORDS[topic]}
    topics = [np.bincount([topic_of_word[w] for w in item["text"].lower().split() if w in topic_of_word],
                          minlength=8).argmax() for item in read_items(tmp_path / "syn")]
    likely = world.succession > 2 / 8  # stay, or move to the topic's successor
    pairs = [(topics[a], topics[b]) for seq in sequences(tmp_path / "syn", "eval") for a, b in zip(seq, seq[1:])]
    share = np.mean([likely[a, b] for a, b in pairs])
    assert manifest["num_items"] == 160 and share > 0.5  # chance level is 2/8
    assert not manifest["synthetic_images"] and not manifest["synthetic_videos"]  # no image, no clip: none to label
