"""Each bad record gives its message (file, record) and either a counted skip or a stop before training."""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter

from conftest import flip_last_byte
from test_prepare import ITEMS, write_source
from transrec.config import ConfigError, DataConfig, load_config
from transrec.batch import IMAGE, TEXT
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.dataset_format import USERS_PER_SAMPLE, DataError, DatasetFileError
from transrec.dataloading.item_store import CONTENT, ItemStore
from transrec.dataloading.loader import EvalLoader, TrainLoader, _ShardedSequences
from transrec.dataloading.dataset_format import EVAL_COLUMNS, TRAIN_COLUMNS, pack_sequences
from transrec.writers.movielens import prepare_movielens
from transrec.writers.synthetic import prepare_synthetic
from transrec.fileio import describe_files
from transrec.trainer.audit import read_audit
from transrec.trainer.torchrun_entry import launch

BATCH = 16


@pytest.fixture(autouse=True)
def released_streaming_datasets():
    yield
    gc.collect()  # one live StreamingDataset per directory per process


@pytest.fixture
def data(tiny_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def make_loader(dataset: Path, policy: str, decoder=None, workers: int = 0, verify: str = "full",
                video_decoder=None) -> TrainLoader:
    return TrainLoader(DataConfig(loader_workers=workers, on_bad_record=policy), dataset, batch_size=BATCH,
                       max_seq_len=6, num_negatives=2, seed=3, rank=0, world_size=1, decoder=decoder, verify=verify,
                       video_decoder=video_decoder)


def epoch(loader: TrainLoader) -> list:
    batches = list(loader)
    loader.close()
    return batches


def train_sequences(dataset: Path) -> list[np.ndarray]:
    return [sample["items"] for sample in _ShardedSequences(dataset / "train")]


def sign(dataset: Path) -> None:
    """Records the files as they are now in the manifest: data that was bad when it was written."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in describe_files(dataset).items() if k != "manifest.json"}
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def set_content(dataset: Path, item: int, payload: bytes, modality: int = IMAGE) -> None:
    """Replaces the JPEG (or clip) of an item, as if written so."""
    offsets_name, file = CONTENT[modality]
    items = dataset / "items"
    offsets = np.load(items / f"{offsets_name}.npy")
    content = (items / file).read_bytes()
    (items / file).write_bytes(content[:offsets[item]] + payload + content[offsets[item + 1]:])
    offsets[item + 1:] += len(payload) - (offsets[item + 1] - offsets[item])
    np.save(items / f"{offsets_name}.npy", offsets)
    sign(dataset)


def rewrite_train(dataset: Path, edits: dict[int, list[int]], size_limit: int = 1 << 26, split: str = "train") -> None:
    """Rewrites the train (or eval) shards with some sequences replaced (user -> items), as prepare blocks them."""
    sequences = list(_ShardedSequences(dataset / split))
    per_sample = USERS_PER_SAMPLE if split == "train" else 1
    shutil.rmtree(dataset / split)
    columns = TRAIN_COLUMNS if split == "train" else EVAL_COLUMNS
    with MDSWriter(out=str(dataset / split), columns=columns, size_limit=size_limit) as writer:
        for first in range(0, len(sequences), per_sample):
            block = sequences[first:first + per_sample]
            users = [s["user"] for s in block]
            items = [np.array(edits.get(s["user"], s["items"]), np.int64) for s in block]
            writer.write(pack_sequences(users, items) if split == "train" else {"user": users[0], "items": items[0]})
    sign(dataset)


def users(batches) -> list[int]:
    return [i for batch in batches for i in batch.users.tolist()]


def holding(dataset: Path, item: int) -> set[int]:
    return {i for i, items in enumerate(train_sequences(dataset)) if item in items}


def assert_skipped_exactly(dataset: Path, batches, skipped: set[int], loader: TrainLoader, kind: str,
                           records: int | None = None) -> None:
    """The users of `skipped` and no other were left out, in `records` bad records (default: one per user)."""
    assert sorted(users(batches)) == sorted(set(range(120)) - skipped)
    records = len(skipped) if records is None else records
    assert loader.skipped[kind] == records and loader.state_dict()["samples_in_epoch"] == 120 // USERS_PER_SAMPLE
    assert sum(loader.skipped.values()) == records


def busy_item(dataset: Path, modality: int) -> int:
    """The item of `modality` that the most train sequences hold."""
    store_modality = np.load(dataset / "items" / "modality.npy")
    counts = np.bincount(np.concatenate(train_sequences(dataset)), minlength=len(store_modality))
    return int(np.argmax(np.where(store_modality == modality, counts, -1)))


@pytest.mark.parametrize("jpeg, kind, problem", [
    (b"", "missing_image", "an image item with no image"),
    (b"GIF89a not a jpeg at all", "not_a_jpeg", r"its image bytes do not start like a JPEG \(FF D8\)"),
])
def test_missing_or_corrupt_image(data, jpeg, kind, problem):
    item = busy_item(data, IMAGE)
    set_content(data, item, jpeg)
    with pytest.raises(DataError, match=rf"images?[._].*: item {item}: {problem}(.|\n)*on_bad_record=skip"):
        make_loader(data, "stop")
    loader = make_loader(data, "skip")
    assert loader.found == {kind: 1}
    batches = epoch(loader)
    assert_skipped_exactly(data, batches, holding(data, item), loader, kind)
    for batch in batches:  # nor is it ever drawn as a negative
        assert item not in batch.items.ids.tolist()


def assert_shown_blank(loader: TrainLoader, item: int, modality: str, message: str) -> None:
    """An epoch of `loader` trains every user; each batch that holds `item` shows its image or clip as zeros (the
    normalized mean) and one skipped record, of its kind, starting with `message`; the loader counts them."""
    rows, content, kind = {"image": ("image_rows", "images", "blank_image"),
                           "video": ("video_rows", "clips", "blank_clip")}[modality]
    batches = epoch(loader)
    assert sorted(users(batches)) == list(range(120))
    blanked = 0
    for batch in batches:
        ids = batch.items.ids[getattr(batch.items, rows)].tolist()
        if item in ids:
            assert not getattr(batch.items, content)[ids.index(item)].any()
            assert [r.kind for r in batch.skipped] == [kind] and str(batch.skipped[0]).startswith(message)
            blanked += 1
    assert blanked > 0 and loader.skipped[kind] == blanked


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_image_that_does_not_decode_is_blanked_and_counted(data, policy):
    """A JPEG whose start is fine but whose body is cut: only decoding finds it, mid-epoch; no crash."""
    item = busy_item(data, IMAGE)
    offsets = np.load(data / "items" / "image_offsets.npy")
    set_content(data, item, (data / "items" / "images.bin").read_bytes()[offsets[item]:offsets[item] + 60])
    loader = make_loader(data, policy, decoder=ImageDecoder(16, backend="dali"), workers=1)
    assert loader.found == {}
    assert_shown_blank(loader, item, "image",
                       f"{data / 'items' / 'images.bin'}: item {item}: cannot decode its image (60 bytes): ")


def test_evaluation_shows_a_bad_image_blank(data):
    item = busy_item(data, IMAGE)
    set_content(data, item, b"")
    store = ItemStore(data)
    ids = np.flatnonzero(store.modality == IMAGE)[:6]
    images = store.item_batch(np.union1d(ids, [item]), decoder=ImageDecoder(16, backend="dali")).images
    assert images.shape[0] == len(np.union1d(ids, [item]))
    assert [bool(image.any()) for image in images] == [i != item for i in np.union1d(ids, [item])]


def test_empty_title(data):
    item = busy_item(data, TEXT)
    tokens, lengths = np.load(data / "items" / "tokens.npy"), np.load(data / "items" / "token_lengths.npy")
    tokens[item] = tokens[item, -1]  # padding
    tokens[item, :2], lengths[item] = (101, 102), 2  # what the tokenizer makes of "": [CLS] [SEP]
    np.save(data / "items" / "tokens.npy", tokens)
    np.save(data / "items" / "token_lengths.npy", lengths)
    sign(data)
    with pytest.raises(DataError, match=rf"tokens\.npy: item {item}: empty title"):
        make_loader(data, "stop")
    loader = make_loader(data, "skip")
    assert_skipped_exactly(data, epoch(loader), holding(data, item), loader, "empty_title")


@pytest.mark.parametrize("items, kind, problem", [
    ([3, 999, 4], "unknown_item", r"item 999 is not in the catalogue \(0\.\.79\)"),
    ([-1, 5], "unknown_item", r"item -1 is not in the catalogue"),
    ([7], "too_short", r"1 train item\(s\), a sample needs 2"),
])
def test_unknown_item_or_too_short_user(data, items, kind, problem):
    rewrite_train(data, {5: items})
    with pytest.raises(DataError, match=rf"shard\.00000\.mds: sample 0 \(user 5\): {problem}"):
        make_loader(data, "stop")
    loader = make_loader(data, "skip", workers=1)
    assert loader.found == {}  # found while training, not before
    assert_skipped_exactly(data, epoch(loader), {5}, loader, kind)


@pytest.mark.parametrize("items, problem", [
    ([7, 8], r"has 2 items; evaluation needs 3"),
    ([3, 999, 4, 5], r"has item 999, outside the catalogue's 80 items"),
])
def test_evaluation_stops_at_a_user_it_cannot_score(data, items, problem):
    rewrite_train(data, {5: items}, split="eval")
    loader = EvalLoader(data, "test", batch_size=16, max_seq_len=6, rank=0, world_size=1)
    with pytest.raises(DataError, match=rf"eval: sample 5 \(user 5\) {problem}"):
        list(loader)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_shard_with_another_checksum(data, damage):
    rewrite_train(data, {}, size_limit=1 << 10)  # several shards
    index = json.loads((data / "train" / "index.json").read_text())["shards"]
    assert len(index) >= 3
    shard = data / "train" / index[1]["raw_data"]["basename"]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    else:
        flip_last_byte(shard)
    with pytest.raises(DatasetFileError, match=rf"{shard.name}: (sha256 differs|\d+ bytes)"):
        make_loader(data, "stop")
    loader = make_loader(data, "skip")
    assert loader.found == {"bad_shard": 1}
    first, count = index[0]["samples"] * USERS_PER_SAMPLE, index[1]["samples"]  # full samples: USERS_PER_SAMPLE users
    assert_skipped_exactly(data, epoch(loader), set(range(first, first + count * USERS_PER_SAMPLE)), loader,
                           "bad_shard", records=count)


def test_what_cannot_be_skipped_stops_with_either_policy(data):
    flip_last_byte(data / "items" / "tokens.npy")
    with pytest.raises(DatasetFileError, match=r"tokens\.npy: sha256 differs"):
        make_loader(data, "skip")
    with pytest.raises(ConfigError, match=r"data.on_bad_record must be one of 'skip', 'stop', got 'ignore'"):
        load_config(None, ["data.on_bad_record=ignore"])


def test_unreadable_sample_is_skipped(data):
    """Bytes the checksum would catch, unchecked (verify=size): the sample does not decode."""
    shard = data / "train" / "shard.00000.mds"
    payload = bytearray(shard.read_bytes())
    begin = int(np.frombuffer(payload, np.uint32, 1, offset=4 * (1 + 9))[0])  # sample 9
    payload[begin + 12] = 0xFF  # after its 3 columns' sizes, the items' header: 63 dimensions
    shard.write_bytes(bytes(payload))
    loader = make_loader(data, "skip", verify="size")
    batches = epoch(loader)
    block = set(range(9 * USERS_PER_SAMPLE, 10 * USERS_PER_SAMPLE))
    assert_skipped_exactly(data, batches, block, loader, "unreadable", records=1)


def test_a_batch_of_only_bad_samples_is_handed_out_empty_and_counted(data):
    item = busy_item(data, IMAGE)
    rewrite_train(data, {i: [item] for i in range(120)})  # every sample too short
    loader = make_loader(data, "skip")
    batches = epoch(loader)
    assert len(batches) == 8 and all(batch.users.numel() == 0 and batch.items.ids.numel() == 0 for batch in batches)
    assert loader.skipped["too_short"] == 120 and loader.skipped["empty_batch"] == 8


@pytest.mark.parametrize("line, problem", [
    (b"5\tEpsilon \xff\xfe\t1994\tDrama", r"line 6: not UTF-8"),
    (b"5\t  \t1994\tDrama", r"line 6: item_id '5' has an empty title"),
])
def test_prepare_names_a_title_that_is_empty_or_not_utf8(tmp_path, line, problem):
    src = write_source(tmp_path / "src", ["7\t1\t5\t1", "7\t2\t5\t2", "7\t5\t5\t3", "7\t3\t5\t4"])
    item_file = src / "toy.item"
    item_file.write_bytes(item_file.read_bytes() + line + b"\n")
    with pytest.raises(DataError, match=rf"toy\.item: {problem}"):
        prepare_movielens(src, tmp_path / "out")
    manifest = prepare_movielens(src, tmp_path / "out", skip_bad_rows=True)
    assert manifest["skipped"]["malformed_item_rows"] == 1 and manifest["num_items"] == len(ITEMS)
    assert manifest["skipped"]["unknown_item_interactions"] == 1  # item 5's interaction


def test_a_rank_whose_batch_is_all_bad_steps_with_the_others_and_nothing_repeats(tmp_path):
    """2 ranks x 1 block of 8 users per batch, 6 blocks: 3 global batches. Every block but the first is bad, so
    one global batch holds one good block and one empty one, the two others are empty on both ranks. ZeRO-3:
    the empty rank runs every module with the others. One optimizer step, on the good users once; no repeat."""
    prepare_synthetic(tmp_path / "data", users=48, items=40)
    rewrite_train(tmp_path / "data", {user: [3] for user in range(USERS_PER_SAMPLE, 48)})  # too short
    sets = [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path}", "name=holes", "train.zero_stage=3",
            "train.log_every=1", "train.log_sample_ids=true", "eval.every_epochs=0"]
    result = launch(2, "tiny", sets)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "holes" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]
    audits = [[r for r in read_audit(tmp_path / "holes" / "samples" / f"rank{rank}.jsonl") if "ids" in r]
              for rank in (0, 1)]
    assert [[r["step"] for r in audit] for audit in audits] == [[1], [1]]  # both ranks took that step
    assert sorted(audits[0][0]["ids"] + audits[1][0]["ids"]) == list(range(USERS_PER_SAMPLE))
    (data_record,) = [r for r in records if r["kind"] == "data"]  # rank 0's 3 batches: 2 or 3 of them empty
    assert data_record["skipped/empty_batch"] == 3 - bool(audits[0][0]["ids"])
    assert data_record["target_positions"] > 0
