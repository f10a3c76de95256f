"""Clips (WebM bytes) -> float tensors [n, K, 3, size, size]: K frames sampled per clip, decoded, resized to
size x size and normalized as images are (images.py).

Backends: "dali" (DALI's video decoder: NVDEC, "mixed", when CUDA is available, the frames staying on the GPU;
else its CPU decoder), "pyav" (CPU, the reference); "auto" = "dali". DALI 2.4 decodes VP8, VP9 and MJPEG on
both backends but H.264, HEVC, AV1 and MPEG-4 on the GPU only: the data sets' clips are VP9 (writers/clips.py).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

from transrec.dataloading.decoding import DaliRunner, DecodeError, resized_and_normalized
from transrec.dataloading.decoding import decode_or_blank as _decode_or_blank
from transrec.dataloading.images import ImageDecoder, normalized_pixels

BACKENDS = ("auto", "dali", "pyav")


class VideoDecodeError(DecodeError):
    """A video item's clip does not decode, or has fewer frames than asked for; the message names the item."""


def sample_frames(frame_counts: np.ndarray, frames: int, item_ids: np.ndarray | None = None,
                  seed: Sequence[int] | None = None) -> np.ndarray:
    """int64 [n, frames]: the frames to show of clips of `frame_counts` frames, sorted. Each clip is cut into
    `frames` equal segments: at evaluation (`seed` None) the middle frame of each, in training one frame drawn
    uniformly in each, from a generator seeded by (*seed, item) for each of `item_ids`, so that an item's frames
    depend on nothing else (a resumed run and every rank draw the same). A clip of fewer frames shows each, then
    its last again."""
    counts = np.asarray(frame_counts, np.int64)[:, None]
    slots = np.arange(frames)
    if seed is None:
        picked = (2 * slots + 1) * counts // (2 * frames)
    else:
        draws = np.array([np.random.default_rng([*seed, int(item)]).random(frames) for item in item_ids])
        starts, ends = slots * counts // frames, (slots + 1) * counts // frames
        picked = starts + (draws.reshape(-1, frames) * (ends - starts)).astype(np.int64)
    return np.where(counts < frames, np.minimum(slots, np.maximum(counts - 1, 0)), picked)


def _frames(clip: np.ndarray, indices: np.ndarray, item_id: int) -> list:
    """The frames at `indices` of a clip, as PIL images (PyAV: the reference decoder)."""
    import av

    wanted, kept, count = set(indices.tolist()), {}, 0
    try:
        with av.open(io.BytesIO(clip.tobytes())) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in wanted:
                    kept[count - 1] = frame.to_image()
                if len(kept) == len(wanted):
                    break
    except av.FFmpegError as err:
        raise VideoDecodeError(f"item {item_id}: cannot decode its clip ({len(clip)} bytes): {err}", item_id) from err
    if len(kept) < len(wanted):
        raise VideoDecodeError(f"item {item_id}: cannot decode its clip ({len(clip)} bytes): frame {max(wanted)} is "
                               f"asked for, it ends after {count} (truncated?)", item_id)
    return [kept[i] for i in indices.tolist()]


def _dali_graph(size: int):
    def graph(feed, device: str):
        from nvidia.dali import fn, types

        clips = fn.external_source(source=feed(0), dtype=types.UINT8, batch=True)
        indices = fn.external_source(source=feed(1), dtype=types.INT32, batch=True)
        # pad_mode none: a frame past the end of a (truncated) clip is an error, not a blank frame
        video = fn.decoders.video(clips, device=device, frames=indices, pad_mode="none")
        return resized_and_normalized(video, size, "FCHW")

    return graph


class VideoDecoder:
    """Samples `frames` frames per clip and decodes them, for lists of clips of any length (DALI: in chunks of
    at most `max_batch` clips)."""

    def __init__(self, size: int, frames: int, backend: str = "auto", max_batch: int = 64, num_threads: int = 2):
        if backend not in BACKENDS:
            raise ValueError(f"video decoder backend must be one of {BACKENDS}, got {backend!r}")
        self.size, self.frames = size, frames
        self.backend = "dali" if backend == "auto" else backend
        self._dali = DaliRunner(_dali_graph(size), max_batch, num_threads) if self.backend == "dali" else None

    @property
    def device(self) -> torch.device:
        """Where decoded clips are: the GPU for DALI when CUDA is available, else the CPU."""
        return self._dali.device if self._dali is not None else torch.device("cpu")

    def frame_indices(self, frame_counts: np.ndarray, item_ids: np.ndarray, seed: Sequence[int] | None = None
                      ) -> np.ndarray:
        """int64 [n, frames]: which frames of each clip to decode (`sample_frames`: evenly without a seed)."""
        return sample_frames(frame_counts, self.frames, item_ids, seed)

    def decode(self, clips: list[np.ndarray], frame_indices: np.ndarray, item_ids: Sequence[int]) -> torch.Tensor:
        """float32 [n, K, 3, size, size]: the frames `frame_indices` [n, K] of each clip; `item_ids` name the
        culprit of a decode error."""
        ids = [int(i) for i in item_ids]
        frame_indices = np.asarray(frame_indices, np.int64)
        if len(ids) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(ids)} item ids")
        if not clips:
            return torch.empty(0, frame_indices.shape[1], 3, self.size, self.size, device=self.device)
        if self._dali is None:
            return torch.from_numpy(np.stack([
                np.stack([normalized_pixels(frame, self.size) for frame in _frames(clip, indices, item)])
                for clip, indices, item in zip(clips, frame_indices, ids)]))
        return self._dali.decode((clips, list(frame_indices.astype(np.int32))), ids,
                                 lambda row: _frames(clips[row], frame_indices[row], ids[row]), VideoDecodeError,
                                 "clips")


def decode_or_blank(decoder: VideoDecoder, clips: list[np.ndarray], frame_indices: np.ndarray,
                    item_ids: Sequence[int]) -> tuple[torch.Tensor, list[VideoDecodeError]]:
    """`decoder.decode`, but a clip that PyAV cannot decode either becomes a blank one (decoding.decode_or_blank)."""
    ids = [int(i) for i in item_ids]
    return _decode_or_blank(lambda rows: decoder.decode([clips[r] for r in rows], frame_indices[rows],
                                                        [ids[r] for r in rows]),
                            lambda row: _frames(clips[row], frame_indices[row], ids[row]), len(clips))


def item_decoders(model_cfg, data_cfg) -> tuple[ImageDecoder, VideoDecoder]:
    """The decoders of a model's image and video items, at its image size and frame count, with the backends
    that `data_cfg` (config.DataConfig) names."""
    size = model_cfg.image.image_size
    return (ImageDecoder(size, data_cfg.image_decoder),
            VideoDecoder(size, model_cfg.video.frames, data_cfg.video_decoder))
