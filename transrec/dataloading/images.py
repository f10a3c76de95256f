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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "pil")


class ImageDecodeError(ValueError):
    """An image item's bytes are not a decodable JPEG; the message names the item."""

    def __init__(self, message: str, item_id: int | None = None):
        super().__init__(message)
        self.item_id = item_id


def _check_decodable(jpeg: np.ndarray, item_id: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(jpeg.tobytes()))
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ImageDecodeError(f"item {item_id}: cannot decode its image ({len(jpeg)} bytes): {err}",
                               item_id) from err
    return image


def _decode_error(jpeg: np.ndarray, item_id: int) -> ImageDecodeError | None:
    try:
        _check_decodable(jpeg, item_id)
    except ImageDecodeError as err:
        return err
    return None


def decode_or_blank(decoder, jpegs: list[np.ndarray], item_ids: Sequence[int]
                    ) -> tuple[torch.Tensor, list[ImageDecodeError]]:
    """`decoder.decode`, but an image that PIL cannot decode either (bad data, not a decoder fault) becomes a
    blank image (zeros: the normalized mean). Returns the images and the errors of the blanked ones. An error
    of the decoder on images PIL decodes is raised: the decoder is at fault, not a record."""
    item_ids = [int(i) for i in item_ids]
    try:
        return decoder.decode(jpegs, item_ids=item_ids), []
    except ImageDecodeError:
        errors = {row: err for row, (jpeg, item) in enumerate(zip(jpegs, item_ids))
                  if (err := _decode_error(jpeg, item))}
        if not errors:
            raise
    good = [row for row in range(len(jpegs)) if row not in errors]
    decoded = decoder.decode([jpegs[r] for r in good], item_ids=[item_ids[r] for r in good])
    images = decoded.new_zeros((len(jpegs), *decoded.shape[1:]))
    images[good] = decoded
    return images, list(errors.values())


class _DaliDecoder:
    """One DALI pipeline of fixed max batch size, fed variable-sized batches through a callable source."""

    def __init__(self, size: int, max_batch: int, num_threads: int):
        self.size, self.max_batch, self.num_threads = size, max_batch, num_threads
        self.on_gpu = torch.cuda.is_available()
        # taken now, in the caller's thread: the decoding thread would see device 0 (the device is per thread)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self._pending: list[np.ndarray] = []
        self._pipe = None

    def _next_input(self) -> list[np.ndarray]:
        return self._pending

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        # Not pipelined, no prefetch: each run() pulls exactly one batch from the source, the one just set.
        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, exec_pipelined=False,
                      exec_async=False, prefetch_queue_depth=1,
                      device_id=self.device.index)  # None on the CPU: a GPU-less pipeline
        def pipeline():
            encoded = fn.external_source(source=self._next_input, dtype=types.UINT8, batch=True)
            images = fn.decoders.image(encoded, device="mixed" if self.on_gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=self.size, resize_y=self.size)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, jpegs: list[np.ndarray]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        if self._pipe is None:
            self._pipe = self._build()
        self._pending = jpegs
        try:
            (output,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # DALI invalidates a pipeline after an error: rebuild on the next call
            raise
        return to_torch_tensor(output.as_tensor(), copy=True)


def _pil_decode(jpeg: np.ndarray, item_id: int, size: int) -> np.ndarray:
    image = _check_decodable(jpeg, item_id).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)


class ImageDecoder:
    """Decodes lists of JPEGs of any length (DALI: in chunks of at most `max_batch`)."""

    def __init__(self, size: int, backend: str = "auto", max_batch: int = 256, num_threads: int = 2):
        if backend not in BACKENDS:
            raise ValueError(f"image decoder backend must be one of {BACKENDS}, got {backend!r}")
        self.size = size
        self.backend = "dali" if backend == "auto" else backend
        self.max_batch = max_batch
        self._dali = _DaliDecoder(size, max_batch, num_threads) if self.backend == "dali" else None

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
            return torch.from_numpy(np.stack([_pil_decode(j, i, self.size) for j, i in zip(jpegs, ids)]))
        chunks = range(0, len(jpegs), self.max_batch)
        return torch.cat([self._dali_chunk(jpegs[s:s + self.max_batch], ids[s:s + self.max_batch]) for s in chunks])

    def _dali_chunk(self, jpegs: list[np.ndarray], ids: list[int]) -> torch.Tensor:
        try:
            return self._dali(jpegs)
        except RuntimeError as err:
            for jpeg, item_id in zip(jpegs, ids):  # find the culprit, so that the error names it
                _check_decodable(jpeg, item_id)
            raise ImageDecodeError(f"DALI could not decode the images of items {ids}: {err}") from err
