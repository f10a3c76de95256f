from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from transrec.dataloading.images import IMAGENET_MEAN, ImageDecodeError, ImageDecoder
from transrec.dataloading.item_store import ItemStore
from transrec.batch import IMAGE


def encode(pixels: np.ndarray) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return np.frombuffer(out.getvalue(), np.uint8)


def noise_jpegs(count: int, width: int = 40, height: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def posters(tiny_dataset) -> list[np.ndarray]:
    store = ItemStore(tiny_dataset)
    return [store.jpeg(i) for i in np.flatnonzero(store.modality == IMAGE)[:6]]


def test_dali_and_pil_agree(posters):
    native = ImageDecoder(32, backend="dali").decode(posters)  # the posters are 32 x 32: decode only
    assert native.dtype == torch.float32 and native.shape == (6, 3, 32, 32)
    torch.testing.assert_close(native, ImageDecoder(32, backend="pil").decode(posters), atol=1e-4, rtol=0)
    resized = [ImageDecoder(20, backend=b).decode(posters) for b in ("dali", "pil")]
    assert (resized[0] - resized[1]).abs().mean() < 0.02  # the two resamplers differ slightly


def test_normalized_with_imagenet_statistics():
    gray = np.broadcast_to(np.array([round(255 * m) for m in IMAGENET_MEAN], np.uint8), (16, 16, 3)).copy()
    for backend in ("dali", "pil"):
        assert ImageDecoder(8, backend=backend).decode([encode(gray)]).abs().max() < 0.05


def test_any_number_of_images_per_call():
    decoder = ImageDecoder(12, backend="dali", max_batch=4)
    jpegs = noise_jpegs(9)
    whole = decoder.decode(jpegs)
    assert whole.shape == (9, 3, 12, 12)
    for count in (1, 4, 3):  # below, at and across the pipeline's batch size, in any order
        torch.testing.assert_close(decoder.decode(jpegs[:count]), whole[:count])
    assert decoder.decode([]).shape == (0, 3, 12, 12)


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_corrupt_jpeg_names_the_item(backend):
    decoder = ImageDecoder(12, backend=backend)
    good = noise_jpegs(2)
    with pytest.raises(ImageDecodeError, match=r"^item 42: cannot decode its image"):
        decoder.decode([good[0], good[1][:60]], item_ids=[7, 42])
    with pytest.raises(ImageDecodeError, match=r"^item 9: "):
        decoder.decode([np.zeros(0, np.uint8)], item_ids=[9])
    assert decoder.decode(good).shape == (2, 3, 12, 12)  # usable after an error
