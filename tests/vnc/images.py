"""Framebuffer contents that drive every encoder branch: noise, flat areas, few-colour
tiles, long runs, palettes just under and over each limit."""

from __future__ import annotations

import numpy as np

from keeper.vnc.framebuffer import MemoryFramebuffer

KINDS = ("noise", "blocks", "palette2", "palette4", "palette16", "palette17", "palette127",
         "palette200", "stripes", "text")


def image(kind: str, width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    px = np.zeros((height, width, 4), dtype=np.uint8)
    if kind == "noise":
        px[..., :3] = rng.integers(0, 256, (height, width, 3))
    elif kind == "blocks":  # flat rectangles of random colours, some overlapping
        px[..., :3] = rng.integers(0, 256, 3)
        for _ in range(12):
            x, y = rng.integers(0, width), rng.integers(0, height)
            w, h = rng.integers(1, 40), rng.integers(1, 40)
            px[y:y + h, x:x + w, :3] = rng.integers(0, 256, 3)
    elif kind.startswith("palette"):
        k = int(kind.removeprefix("palette"))
        colours = rng.integers(0, 256, (k, 3))
        px[..., :3] = colours[rng.integers(0, k, (height, width))]
    elif kind == "stripes":  # runs longer than 255 pixels across rows
        colours = rng.integers(0, 256, (4, 3))
        flat = np.repeat(rng.integers(0, 4, width * height // 300 + 1), 300)[:width * height]
        px[..., :3] = colours[flat].reshape(height, width, 3)
    elif kind == "text":  # dark glyph-like strokes on a light background
        px[..., :3] = 230
        for _ in range(width * height // 40):
            x, y = rng.integers(0, width), rng.integers(0, height)
            px[y:y + rng.integers(1, 6), x:x + rng.integers(1, 3), :3] = (20, 20, 20)
        px[rng.integers(0, height, 5), :, :3] = (0, 0, 200)
    else:
        raise ValueError(kind)
    px[..., 3] = rng.integers(0, 256, (height, width))  # X byte: must be ignored
    return px


def framebuffer(kind: str, width: int, height: int, seed: int = 0) -> MemoryFramebuffer:
    return MemoryFramebuffer(width, height, image(kind, width, height, seed))
