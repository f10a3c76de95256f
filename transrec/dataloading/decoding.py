"""What decoding images and clips share: the error that names an item, a DALI pipeline fed batches of any size,
its resize-and-normalize tail, and blanking the records that a reference decoder cannot read either."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodeError(ValueError):
    """An item's bytes do not decode; the message names the item."""

    def __init__(self, message: str, item_id: int | None = None):
        super().__init__(message)
        self.item_id = item_id


def decode_or_blank(decode: Callable[[list[int]], torch.Tensor], check: Callable[[int], object], count: int,
                    suspects: Sequence[int] = ()) -> tuple[torch.Tensor, list[DecodeError]]:
    """`decode(rows)` of the records 0..count-1, but a record that the reference decoder cannot read either
    (`check(row)` raises a DecodeError: bad data, not a decoder fault) becomes blank (zeros: the normalized
    mean). `suspects` (records that look cut short) are checked first and never reach `decode` when bad: DALI's
    CPU decoders may crash the process on a truncated record instead of raising. Returns the decoded records and
    the errors of the blanked ones. An error of `decode` on records the reference reads is raised: the decoder
    is at fault, not a record."""
    errors = _reference_errors(check, suspects)
    good = [row for row in range(count) if row not in errors]
    try:
        decoded = decode(good)
    except DecodeError:
        found = _reference_errors(check, good)
        if not found:
            raise
        errors.update(found)
        good = [row for row in good if row not in found]
        decoded = decode(good)
    if not errors:
        return decoded, []
    out = decoded.new_zeros((count, *decoded.shape[1:]))
    out[good] = decoded
    return out, [errors[row] for row in sorted(errors)]


def _reference_errors(check: Callable[[int], object], rows: Sequence[int]) -> dict[int, DecodeError]:
    errors = {}
    for row in rows:
        try:
            check(row)
        except DecodeError as err:
            errors[row] = err
    return errors


def resized_and_normalized(frames, size: int, layout: str):
    """A DALI node of decoded RGB images (or sequences of them) -> size x size, normalized with the ImageNet mean
    and std, float, in `layout` (CHW, or FCHW for sequences). The aspect ratio is not kept."""
    from nvidia.dali import fn, types

    frames = fn.resize(frames, resize_x=size, resize_y=size)
    return fn.crop_mirror_normalize(frames, dtype=types.FLOAT, output_layout=layout,
                                    mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])


class DaliRunner:
    """One DALI pipeline of fixed max batch size, run on batches of any size through callable sources: on the GPU
    ("mixed" decoders, output left there) when CUDA is available, else on the CPU.

    `graph(feed, device)` builds the pipeline: `feed(j)` is the source of the j-th input of each call (a list,
    one entry per record), `device` the decoders' ("mixed" or "cpu").
    """

    def __init__(self, graph: Callable, max_batch: int, num_threads: int):
        self.graph, self.max_batch, self.num_threads = graph, max_batch, num_threads
        self.on_gpu = torch.cuda.is_available()
        # taken now, in the caller's thread: the decoding thread would see device 0 (the device is per thread)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self._pending: tuple[list, ...] = ()
        self._pipe = None

    def _build(self):
        from nvidia.dali import pipeline_def

        # Not pipelined, no prefetch: each run() pulls exactly one batch from the sources, the one just set.
        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, exec_pipelined=False,
                      exec_async=False, prefetch_queue_depth=1,
                      device_id=self.device.index)  # None on the CPU: a GPU-less pipeline
        def pipeline():
            return self.graph(lambda j: (lambda: self._pending[j]), "mixed" if self.on_gpu else "cpu")

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run(self, inputs: tuple[list, ...]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        if self._pipe is None:
            self._pipe = self._build()
        self._pending = inputs
        try:
            (output,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # DALI invalidates a pipeline after an error: rebuild on the next call
            raise
        return to_torch_tensor(output.as_tensor(), copy=True)

    def decode(self, inputs: tuple[list, ...], item_ids: Sequence[int], check: Callable[[int], object],
               error: type[DecodeError], what: str) -> torch.Tensor:
        """The output of every record (`inputs[j][i]`: record i's j-th input), in chunks of at most max_batch. When
        DALI fails on a chunk, `check(i)` of each of its records (a reference decoder that raises a DecodeError
        naming the item) finds the culprit; if none, `error` names every item of the chunk and `what` they are."""
        chunks = []
        for start in range(0, len(item_ids), self.max_batch):
            rows = range(start, min(start + self.max_batch, len(item_ids)))
            try:
                chunks.append(self._run(tuple(values[rows.start:rows.stop] for values in inputs)))
            except RuntimeError as err:
                for row in rows:
                    check(row)
                ids = [int(item_ids[row]) for row in rows]
                raise error(f"DALI could not decode the {what} of items {ids}: {err}") from err
        return torch.cat(chunks)
