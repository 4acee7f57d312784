"""RFB pixel formats and translation from the server's native pixels to the client's.

The framebuffer is always 32 bpp BGRX in memory (byte 0 blue, 1 green, 2 red, 3 unused;
as a little-endian word: red << 16 | green << 8 | blue). A client may ask for any
true-colour format (SetPixelFormat): 8, 16 or 32 bits per pixel, either byte order, any
channel maxima of the form 2**n - 1 and any shifts. Translation goes through three
256-entry lookup tables (one per channel) so a whole rectangle costs a few numpy
gathers, not a Python loop per pixel.

A channel value v (0..255) becomes round(v * max / 255) — the usual rounding RFB servers
use in their translation tables; no ties are possible, so it is unambiguous.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np

_STRUCT = struct.Struct(">BBBBHHHBBB3x")
PIXEL_FORMAT_SIZE = _STRUCT.size  # 16 bytes on the wire


@dataclass(frozen=True, slots=True)
class PixelFormat:
    """RFB PIXEL_FORMAT (rfbproto "ServerInit"). Frozen: it keys the lookup-table cache."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def pack(self) -> bytes:
        return _STRUCT.pack(
            self.bits_per_pixel, self.depth, int(self.big_endian), int(self.true_colour),
            self.red_max, self.green_max, self.blue_max,
            self.red_shift, self.green_shift, self.blue_shift,
        )

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = _STRUCT.unpack(data)
        return cls(bpp, depth, be != 0, tc != 0, rm, gm, bm, rs, gs, bs)

    def problem(self) -> str | None:
        """Why we cannot serve this format, or None if we can.

        Colour maps are refused: they would need SetColourMapEntries and a palette
        policy, and every viewer in use today accepts a true-colour format.
        """
        if self.bits_per_pixel not in (8, 16, 32):
            return f"bits-per-pixel must be 8, 16 or 32, not {self.bits_per_pixel}"
        if not self.true_colour:
            return "colour-map pixel formats are not supported; use a true-colour format"
        for name, mx, shift in (
            ("red", self.red_max, self.red_shift),
            ("green", self.green_max, self.green_shift),
            ("blue", self.blue_max, self.blue_shift),
        ):
            if mx < 1 or mx & (mx + 1):
                return f"{name}-max must be 2**n - 1 with n >= 1, not {mx}"
            if shift + mx.bit_length() > self.bits_per_pixel:
                return (f"{name} channel (max {mx}, shift {shift}) does not fit in "
                        f"{self.bits_per_pixel} bits")
        return None


# The server's natural format (ServerInit): the framebuffer's BGRX words, little-endian.
SERVER_FORMAT = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


@functools.lru_cache(maxsize=32)
def _tables(fmt: PixelFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.arange(256, dtype=np.uint32)

    def table(mx: int, shift: int) -> np.ndarray:
        return ((v * mx + 127) // 255) << np.uint32(shift)

    return (table(fmt.red_max, fmt.red_shift), table(fmt.green_max, fmt.green_shift),
            table(fmt.blue_max, fmt.blue_shift))


def native_to_values(data: bytes, width: int, height: int, fmt: PixelFormat) -> np.ndarray:
    """BGRX bytes of a width x height rectangle → (height, width) uint32 pixel values in `fmt`.

    Values are numbers, not bytes: byte order is applied only when they are written out.
    """
    px = np.frombuffer(data, dtype=np.uint8, count=width * height * 4).reshape(height, width, 4)
    places = _byte_places(fmt)
    if places is not None:  # 8 bits a channel, on byte boundaries: move bytes, no lookups
        out = np.zeros((height, width, 4), dtype=np.uint8)
        for channel, byte in zip((2, 1, 0), places, strict=True):
            out[..., byte] = px[..., channel]
        return out.view("<u4").reshape(height, width).astype(np.uint32, copy=False)
    red, green, blue = _tables(fmt)
    return red[px[..., 2]] | green[px[..., 1]] | blue[px[..., 0]]


@functools.lru_cache(maxsize=32)
def _byte_places(fmt: PixelFormat) -> tuple[int, int, int] | None:
    """Where red, green and blue sit as whole bytes of a (little-endian) pixel value,
    if each is 8 bits wide on a byte boundary of a 32-bit value (most clients'
    formats, ours too): then translating is placing bytes, 10x cheaper than three
    table lookups a pixel."""
    shifts = (fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    if fmt.bits_per_pixel != 32 or not fmt.true_colour or \
            (fmt.red_max, fmt.green_max, fmt.blue_max) != (255, 255, 255) or \
            any(s % 8 or s > 24 for s in shifts) or len(set(shifts)) != 3:
        return None
    return tuple(s // 8 for s in shifts)  # type: ignore[return-value]


def _dtype(fmt: PixelFormat) -> np.dtype:
    order = ">" if fmt.big_endian else "<"
    return np.dtype({8: "u1", 16: order + "u2", 32: order + "u4"}[fmt.bits_per_pixel])


def values_to_bytes(values: np.ndarray, fmt: PixelFormat) -> bytes:
    """Pixel values → PIXELs on the wire (bits-per-pixel wide, the client's byte order)."""
    return np.ascontiguousarray(values, dtype=_dtype(fmt)).tobytes()


def cpixel_layout(fmt: PixelFormat) -> tuple[int, int]:
    """ZRLE's CPIXEL: (bytes per CPIXEL, offset of those bytes inside a PIXEL).

    rfbproto: a CPIXEL is 3 bytes when the format is true-colour, 32 bpp, depth <= 24 and
    all colour bits fit in the least (preferred) or the most significant 3 bytes of the
    pixel value; it is those bytes, in the pixel's byte order. Otherwise it is a PIXEL.
    """
    if fmt.bits_per_pixel != 32 or not fmt.true_colour or fmt.depth > 24:
        return fmt.bytes_per_pixel, 0
    used = ((fmt.red_max << fmt.red_shift) | (fmt.green_max << fmt.green_shift)
            | (fmt.blue_max << fmt.blue_shift))
    if used < 1 << 24:  # least significant 3 bytes: first in LE, last in BE
        return 3, 1 if fmt.big_endian else 0
    if used & 0xFF == 0:  # most significant 3 bytes
        return 3, 0 if fmt.big_endian else 1
    return 4, 0


def values_to_cpixels(values: np.ndarray, fmt: PixelFormat) -> bytes:
    """Pixel values → CPIXELs (see `cpixel_layout`)."""
    size, offset = cpixel_layout(fmt)
    raw = np.ascontiguousarray(values, dtype=_dtype(fmt))
    if size == fmt.bytes_per_pixel:
        return raw.tobytes()
    return raw.reshape(-1).view(np.uint8).reshape(-1, 4)[:, offset:offset + size].tobytes()
