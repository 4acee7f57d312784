"""What the RFB core reads pixels from: anything with a size and a `read`.

Pixels are the server's native format, 32 bpp BGRX (byte 0 blue, 1 green, 2 red, 3
unused), row-major, no padding between rows. The core never keeps a framebuffer in its
state: pixels live with the guest's display, and a checkpoint must not copy them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Framebuffer(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        """w x h x 4 bytes of BGRX, rows top to bottom; the area lies inside the framebuffer."""
        ...


class MemoryFramebuffer:
    """A framebuffer in a numpy array (h, w, 4) of BGRX bytes: for tests and the demo."""

    def __init__(self, width: int, height: int, pixels: np.ndarray | None = None) -> None:
        if pixels is None:
            pixels = np.zeros((height, width, 4), dtype=np.uint8)
        if pixels.shape != (height, width, 4) or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be uint8 ({height}, {width}, 4), not "
                             f"{pixels.dtype} {pixels.shape}")
        self.pixels = pixels

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"area {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
        return self.pixels[y:y + h, x:x + w].tobytes()

    def fill(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        r, g, b = rgb
        self.pixels[y:y + h, x:x + w] = (b, g, r, 0)

    def copy(self, src_x: int, src_y: int, x: int, y: int, w: int, h: int) -> None:
        """Move an area, as a window move or a scroll does (then CopyRect can describe it)."""
        self.pixels[y:y + h, x:x + w] = self.pixels[src_y:src_y + h, src_x:src_x + w].copy()

    def resize(self, width: int, height: int) -> None:
        """New size; the overlapping top-left part is kept, the rest is black."""
        new = np.zeros((height, width, 4), dtype=np.uint8)
        h, w = min(height, self.height), min(width, self.width)
        new[:h, :w] = self.pixels[:h, :w]
        self.pixels = new
