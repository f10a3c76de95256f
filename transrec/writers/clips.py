"""SYNTHETIC clips for video items: an item's poster (posters.py) seen through a window that pans across it and
zooms in, tinted by a colour that drifts through the item's colours, encoded as VP9 in WebM by PyAV.

VP9 because DALI decodes it on the CPU as well as on the GPU (dataloading/videos.py); H.264 would be GPU-only.
The bytes depend on the arguments alone: libvpx runs on one thread and the muxer is bit-exact (no random
segment UID), so a seed gives the same data set on any machine and in any number of processes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from transrec.writers.posters import NEUTRAL, RGB, poster_image

CLIP_FRAMES = 16  # 2 s at CLIP_FPS
CLIP_FPS = 8
ZOOM = 1.5  # the poster is drawn this much larger than a frame; the window shrinks from all of it to a frame's size
TINT = 0.35  # how far each frame is blended toward the drifting colour
# constant quality (crf, no bitrate target), libvpx's fastest settings, no look-ahead: one packet per frame
VP9_OPTIONS = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}


def clip_frames(title: str, colors: Sequence[RGB], shape: str, seed: int, size: int, frames: int = CLIP_FRAMES
                ) -> list[np.ndarray]:
    """uint8 [size, size, 3] per frame: the poster of (`title`, `colors`, `shape`, `seed`), the window's path
    drawn from `seed`, the tint moving from the first colour to the last."""
    big = round(size * ZOOM)
    poster = poster_image(title, colors, shape, seed, big)
    start, end = np.random.default_rng(seed).random((2, 2))  # the window's corner, as shares of the room left
    palette = np.array(list(colors) or [NEUTRAL], np.float32)
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        side = big - (big - size) * t
        left, top = ((1 - t) * start + t * end) * (big - side)
        window = np.asarray(poster.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)),
                            np.float32)
        tint = [np.interp(t * (len(palette) - 1), np.arange(len(palette)), palette[:, c]) for c in range(3)]
        out.append(((1 - TINT) * window + TINT * np.float32(tint)).round().astype(np.uint8))
    return out


def encode_webm(frames: list[np.ndarray], fps: int = CLIP_FPS) -> bytes:
    """VP9-in-WebM bytes of RGB frames [H, W, 3] (H and W even: VP9 keeps colour at half resolution)."""
    import av

    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"clip frames must have an even width and height, got {width} x {height}")
    out = io.BytesIO()
    with av.open(out, "w", format="webm", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps, options=VP9_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # flush
    return out.getvalue()


def render_clip(title: str, colors: Sequence[RGB], shape: str, seed: int, size: int, frames: int = CLIP_FRAMES
                ) -> bytes:
    """The WebM bytes of the SYNTHETIC clip `clip_frames` draws."""
    return encode_webm(clip_frames(title, colors, shape, seed, size, frames))
