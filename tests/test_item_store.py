from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import flip_last_byte
from transrec.batch import IMAGE, TEXT
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.dataset_format import DatasetFileError
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.dataset_format import load_tokenizer


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    return shutil.copytree(tiny_dataset, tmp_path / "copy")


def test_tokens_are_the_items_texts_trimmed_to_the_longest(tiny_dataset):
    store = ItemStore(tiny_dataset)
    tokenizer = load_tokenizer(str(tiny_dataset / "tokenizer"))
    texts = [json.loads(line)["text"] for line in (tiny_dataset / "items" / "items.jsonl").read_text().splitlines()]
    ids = np.array([5, 0, 77, 5])
    token_ids, mask = store.tokens(ids)
    expected = [tokenizer(texts[i])["input_ids"] for i in ids]
    assert token_ids.dtype == mask.dtype == np.int64
    assert token_ids.shape == mask.shape == (4, max(map(len, expected)))
    for row, want in enumerate(expected):
        assert list(token_ids[row, :len(want)]) == want and mask[row].sum() == len(want)
        assert (token_ids[row, len(want):] == tokenizer.pad_token_id).all()


def test_jpeg_is_the_items_slice_of_images_bin(tiny_dataset):
    store = ItemStore(tiny_dataset)
    offsets = np.load(tiny_dataset / "items" / "image_offsets.npy")
    images = (tiny_dataset / "items" / "images.bin").read_bytes()
    image_item, text_item = np.flatnonzero(store.modality == IMAGE)[3], np.flatnonzero(store.modality == TEXT)[0]
    jpeg = store.jpeg(image_item)
    assert jpeg.dtype == np.uint8 and jpeg.tobytes() == images[offsets[image_item]:offsets[image_item + 1]]
    assert jpeg.tobytes()[:2] == b"\xff\xd8" and len(store.jpeg(text_item)) == 0
    np.testing.assert_array_equal(store.popularity, np.load(tiny_dataset / "items" / "popularity.npy"))
    assert store.num_items == 80


def test_reopens_after_pickling(tiny_dataset):
    store = ItemStore(tiny_dataset)
    store.tokens(np.arange(3))  # opens the memory maps
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 10_000  # the maps are not pickled
    np.testing.assert_array_equal(copy.tokens(np.arange(3))[0], store.tokens(np.arange(3))[0])


def test_item_batch_splits_by_modality_and_decodes(tiny_dataset):
    store = ItemStore(tiny_dataset)
    ids = np.arange(0, 80, 3)
    batch = store.item_batch(ids, decoder=ImageDecoder(24, backend="pil"))
    rows = torch.cat([batch.text_rows, batch.image_rows]).sort().values
    assert torch.equal(rows, torch.arange(len(ids)))
    assert (store.modality[batch.ids[batch.text_rows].numpy()] == TEXT).all()
    assert (store.modality[batch.ids[batch.image_rows].numpy()] == IMAGE).all()
    np.testing.assert_array_equal(batch.input_ids.numpy(), store.tokens(ids[batch.text_rows.numpy()])[0])
    assert batch.images.shape == (len(batch.image_rows), 3, 24, 24)
    assert store.item_batch(ids).images is None and len(store.item_batch(ids).jpegs) == len(batch.image_rows)
    # the ids index this data set's catalogue, which the batch names (a tower's cache is per catalogue)
    assert batch.catalogue == batch.select(torch.tensor([1, 0])).catalogue == str(Path(tiny_dataset).resolve())


def test_modes_route_every_row_to_one_encoder(tiny_dataset):
    store = ItemStore(tiny_dataset)
    ids = np.arange(0, 80, 3)
    as_text = store.item_batch(ids, mode="text")
    assert as_text.text_rows.tolist() == list(range(len(ids))) and len(as_text.image_rows) == 0
    np.testing.assert_array_equal(as_text.input_ids.numpy(), store.tokens(ids)[0])
    as_ids = store.item_batch(ids, mode="id")
    assert len(as_ids.text_rows) == len(as_ids.image_rows) == 0 and as_ids.ids.tolist() == ids.tolist()
    images_only = np.flatnonzero(store.modality == IMAGE)[:5]
    assert store.item_batch(images_only, mode="image").image_rows.tolist() == list(range(5))
    with pytest.raises(ValueError, match=r"item 0 has no image"):
        store.item_batch(ids, mode="image")
    with pytest.raises(ValueError, match="item mode must be one of"):
        store.item_batch(ids, mode="audio")


def test_corrupted_file_is_named(dataset_copy):
    flip_last_byte(dataset_copy / "items" / "tokens.npy")
    with pytest.raises(DatasetFileError, match=r"tokens\.npy: sha256 differs"):
        ItemStore(dataset_copy)
    ItemStore(dataset_copy, verify="size")  # same size: only the full check sees it


def test_every_file_of_the_directory_is_checked(dataset_copy):
    shard = dataset_copy / "train" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(DatasetFileError, match=r"train/shard\.00000\.mds: \d+ bytes"):
        ItemStore(dataset_copy, verify="size")
    ItemStore(dataset_copy, unverified=("train/",))  # a remote dataset's train shards stream: not checked


def test_truncated_or_missing_file_is_named(dataset_copy):
    images = dataset_copy / "items" / "images.bin"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DatasetFileError, match=r"images\.bin: \d+ bytes, the manifest says \d+"):
        ItemStore(dataset_copy, verify="size")
    images.unlink()
    with pytest.raises(DatasetFileError, match=r"images\.bin: missing"):
        ItemStore(dataset_copy)
    (dataset_copy / "manifest.json").unlink()
    with pytest.raises(DatasetFileError, match=r"manifest\.json: missing"):
        ItemStore(dataset_copy)


def test_a_data_set_of_another_format_is_named(dataset_copy):
    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    (dataset_copy / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(DatasetFileError, match=r"manifest\.json: format 1, this transrec reads format 2: prepare"):
        ItemStore(dataset_copy)
