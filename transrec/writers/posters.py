"""Poster-like JPEGs rendered from item metadata.

No real item images can be had on these machines, so image items get a synthetic poster: a gradient in
the item's colors (genres or topic), a pattern of shapes placed by a per-item seed, and the title. Two
items never share all three, so every poster is visibly its own.
"""
from __future__ import annotations

import hashlib
import io
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
SHAPES = ("circles", "stripes", "squares", "triangles")
NEUTRAL: RGB = (128, 128, 128)


def tag_color(tag: str) -> RGB:
    """A stable color for a tag (a genre): sha1, not hash(), which is salted per process."""
    digest = hashlib.sha1(tag.encode()).digest()
    return digest[0], digest[1], digest[2]


def _gradient(size: int, top: RGB, bottom: RGB) -> np.ndarray:
    weight = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = (1 - weight) * np.array(top, np.float32) + weight * np.array(bottom, np.float32)
    return np.broadcast_to(rows, (size, size, 3)).astype(np.uint8)


def _draw_pattern(draw: ImageDraw.ImageDraw, shape: str, colors: Sequence[RGB], rng: np.random.Generator, size: int):
    for k in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in np.clip(np.array(colors[k % len(colors)]) + rng.integers(-60, 61, 3), 0, 255))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 12, size // 4))
        if shape == "circles":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif shape == "stripes":
            draw.line((x - size, y - r, x + size, y + r), fill=color, width=max(2, r // 2))
        elif shape == "squares":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
        elif shape == "triangles":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        else:
            raise ValueError(f"unknown poster shape {shape!r}; known: {', '.join(SHAPES)}")


def _draw_title(draw: ImageDraw.ImageDraw, title: str, size: int):
    font_size = max(8, size // 9)
    font = ImageFont.load_default(size=font_size)
    lines = textwrap.wrap(title, width=max(4, int(size / (font_size * 0.55))))[:2]
    top = size - (len(lines) * (font_size + 2) + 4)
    draw.rectangle((0, top, size, size), fill=(0, 0, 0))
    for n, line in enumerate(lines):
        draw.text((3, top + 2 + n * (font_size + 2)), line, fill=(255, 255, 255), font=font)


def poster_image(title: str, colors: Sequence[RGB], shape: str, seed: int, size: int) -> Image.Image:
    """A `size` x `size` RGB poster: gradient of `colors`, `shape` pattern placed by `seed`, `title`."""
    colors = list(colors) or [NEUTRAL]
    image = Image.fromarray(_gradient(size, colors[0], colors[-1]))
    draw = ImageDraw.Draw(image)
    _draw_pattern(draw, shape, colors, np.random.default_rng(seed), size)
    _draw_title(draw, title, size)
    return image


def render_poster(title: str, colors: Sequence[RGB], shape: str, seed: int, size: int, quality: int = 90) -> bytes:
    """JPEG bytes of the poster `poster_image` draws."""
    image = poster_image(title, colors, shape, seed, size)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
