"""JPEG bytes -> float image tensors [n, 3, size, size], normalized with the ImageNet mean and std.

Backends: "dali" (nvJPEG on the GPU when CUDA is available, output stays there; else DALI's CPU
decoder), "pil" (CPU, for reference and fallback); "auto" = "dali". Images are resized to size x size
without keeping the aspect ratio, the same in both backends.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from transrec.dataloading.decoding import (IMAGENET_MEAN, IMAGENET_STD, DaliRunner, DecodeError,
                                           resized_and_normalized)
from transrec.dataloading.decoding import decode_or_blank as _decode_or_blank

BACKENDS = ("auto", "dali", "pil")


class ImageDecodeError(DecodeError):
    """An image item's bytes are not a decodable JPEG; the message names the item."""


def _check_decodable(jpeg: np.ndarray, item_id: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(jpeg.tobytes()))
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ImageDecodeError(f"item {item_id}: cannot decode its image ({len(jpeg)} bytes): {err}",
                               item_id) from err
    return image


def _looks_cut_short(jpeg: np.ndarray) -> bool:
    """No end-of-image marker (FF D9) in the last bytes (some writers pad after it)."""
    return b"\xff\xd9" not in jpeg[-64:].tobytes()


def decode_or_blank(decoder, jpegs: list[np.ndarray], item_ids: Sequence[int]
                    ) -> tuple[torch.Tensor, list[ImageDecodeError]]:
    """`decoder.decode`, but an image that PIL cannot decode either becomes a blank image (decoding.decode_or_blank).
    A JPEG that looks cut short goes to PIL first: DALI's CPU decoder has crashed on one (a segfault, seen once in
    a test run)."""
    item_ids = [int(i) for i in item_ids]
    return _decode_or_blank(lambda rows: decoder.decode([jpegs[r] for r in rows], [item_ids[r] for r in rows]),
                            lambda row: _check_decodable(jpegs[row], item_ids[row]), len(jpegs),
                            suspects=[row for row, jpeg in enumerate(jpegs) if _looks_cut_short(jpeg)])


def _dali_graph(size: int):
    def graph(feed, device: str):
        from nvidia.dali import fn, types

        encoded = fn.external_source(source=feed(0), dtype=types.UINT8, batch=True)
        return resized_and_normalized(fn.decoders.image(encoded, device=device, output_type=types.RGB), size, "CHW")

    return graph


def normalized_pixels(image: Image.Image, size: int) -> np.ndarray:
    """float32 [3, size, size]: an image resized as DALI resizes it (bilinear, aspect ratio not kept), normalized."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return ((pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)


class ImageDecoder:
    """Decodes lists of JPEGs of any length (DALI: in chunks of at most `max_batch`)."""

    def __init__(self, size: int, backend: str = "auto", max_batch: int = 256, num_threads: int = 2):
        if backend not in BACKENDS:
            raise ValueError(f"image decoder backend must be one of {BACKENDS}, got {backend!r}")
        self.size = size
        self.backend = "dali" if backend == "auto" else backend
        self._dali = DaliRunner(_dali_graph(size), max_batch, num_threads) if self.backend == "dali" else None

    @property
    def device(self) -> torch.device:
        """Where decoded images are: the GPU for DALI when CUDA is available, else the CPU."""
        return self._dali.device if self._dali is not None else torch.device("cpu")

    def decode(self, jpegs: list[np.ndarray], item_ids: Sequence[int] | None = None) -> torch.Tensor:
        """float32 [n, 3, size, size]; `item_ids` (default 0..n-1) name the culprit of a decode error."""
        ids = [int(i) for i in item_ids] if item_ids is not None else list(range(len(jpegs)))
        if len(ids) != len(jpegs):
            raise ValueError(f"{len(jpegs)} images but {len(ids)} item ids")
        if not jpegs:
            return torch.empty(0, 3, self.size, self.size, device=self.device)
        if self._dali is None:
            return torch.from_numpy(np.stack([normalized_pixels(_check_decodable(j, i), self.size)
                                              for j, i in zip(jpegs, ids)]))
        return self._dali.decode((jpegs,), ids, lambda row: _check_decodable(jpegs[row], ids[row]), ImageDecodeError,
                                 "images")
