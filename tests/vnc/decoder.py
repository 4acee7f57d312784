"""An RFB client-side decoder written from rfbproto for the tests, sharing no code with
keeper.vnc: pure Python, pixel by pixel, strict. It rejects what the spec forbids
(a Hextile tile leaning on a background or foreground that may not be carried over,
subrectangles outside their tile, ZRLE runs past the end of a tile, palette sizes 17-127
or 129, trailing bytes) so an encoder that is merely "accepted by a lenient viewer" fails.

Pixels are kept as client pixel *values* (ints), so comparisons are exact in any format.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field


class DecodeError(Exception):
    pass


class Incomplete(DecodeError):
    """The data ended in the middle of a message."""


@dataclass(frozen=True)
class Format:
    """A client PIXEL_FORMAT (true colour only)."""

    bpp: int
    depth: int
    big_endian: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    def wire(self) -> bytes:
        """The 16-byte PIXEL_FORMAT, as in SetPixelFormat."""
        return struct.pack(
            ">BBBBHHHBBBxxx", self.bpp, self.depth, 1 if self.big_endian else 0, 1,
            self.red_max, self.green_max, self.blue_max,
            self.red_shift, self.green_shift, self.blue_shift,
        )

    @property
    def nbytes(self) -> int:
        return self.bpp // 8

    def value_of(self, red: int, green: int, blue: int) -> int:
        """The pixel value for 8-bit channel intensities: each scaled to its max, rounded
        to nearest (v * max / 255 never ends in exactly .5)."""

        def scale(v: int, mx: int) -> int:
            return (2 * v * mx + 255) // 510

        return ((scale(red, self.red_max) << self.red_shift)
                | (scale(green, self.green_max) << self.green_shift)
                | (scale(blue, self.blue_max) << self.blue_shift))

    def cpixel_shape(self) -> tuple[int, int]:
        """ZRLE CPIXEL: (length, how far left the value sits). rfbproto: 3 bytes when
        true colour, 32 bpp, depth <= 24 and the colour bits fit in the 3 least (preferred)
        or the 3 most significant bytes."""
        if self.bpp == 32 and self.depth <= 24:
            bits = ((self.red_max << self.red_shift) | (self.green_max << self.green_shift)
                    | (self.blue_max << self.blue_shift))
            if bits <= 0xFFFFFF:
                return 3, 0
            if bits % 256 == 0:
                return 3, 8
        return self.nbytes, 0


SERVER_NATIVE = Format(32, 24, False, 255, 255, 255, 16, 8, 0)


def expected_values(bgrx: bytes, fmt: Format) -> list[int]:
    """What the client should see for native BGRX pixels, in its format."""
    return [fmt.value_of(bgrx[i + 2], bgrx[i + 1], bgrx[i]) for i in range(0, len(bgrx), 4)]


class Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Incomplete(f"need {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def s32(self) -> int:
        return int.from_bytes(self.take(4), "big", signed=True)

    def done(self) -> bool:
        return self.pos == len(self.data)


@dataclass
class Rectangle:
    x: int
    y: int
    w: int
    h: int
    encoding: int


@dataclass
class ClientScreen:
    """The client's copy of the framebuffer, as pixel values; None = never drawn."""

    width: int
    height: int
    fmt: Format
    rows: list[list[int | None]] = field(default_factory=list)
    inflater: zlib._Decompress = field(default_factory=zlib.decompressobj)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = [[None] * self.width for _ in range(self.height)]

    # -- drawing

    def put(self, x: int, y: int, w: int, h: int, values: list[int]) -> None:
        if x + w > self.width or y + h > self.height:
            raise DecodeError(f"rect {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
        if len(values) != w * h:
            raise DecodeError(f"{len(values)} pixels for a {w}x{h} rect")
        for row in range(h):
            self.rows[y + row][x:x + w] = values[row * w:(row + 1) * w]

    def fill(self, x: int, y: int, w: int, h: int, value: int) -> None:
        self.put(x, y, w, h, [value] * (w * h))

    def area(self, x: int, y: int, w: int, h: int) -> list[int | None]:
        return [v for row in self.rows[y:y + h] for v in row[x:x + w]]

    # -- pixels

    def pixel(self, r: Reader) -> int:
        return int.from_bytes(r.take(self.fmt.nbytes), "big" if self.fmt.big_endian else "little")

    def cpixel(self, r: Reader) -> int:
        size, shift = self.fmt.cpixel_shape()
        order = "big" if self.fmt.big_endian else "little"
        return int.from_bytes(r.take(size), order) << shift

    # -- messages

    def read_message(self, r: Reader) -> list[Rectangle]:
        """One server message; returns the rectangles of a FramebufferUpdate."""
        kind = r.u8()
        if kind != 0:
            raise DecodeError(f"unexpected server message type {kind}")
        r.take(1)
        count = r.u16()
        rects = []
        for _ in range(count):
            rect = Rectangle(r.u16(), r.u16(), r.u16(), r.u16(), r.s32())
            if rect.encoding == -224:  # LastRect
                break
            rects.append(rect)
            self.read_rect(r, rect)
        return rects

    def read_all(self, data: bytes) -> list[list[Rectangle]]:
        """Every message in `data`, which must end on a message boundary."""
        r = Reader(data)
        out = []
        while not r.done():
            out.append(self.read_message(r))
        return out

    def read_rect(self, r: Reader, rect: Rectangle) -> None:
        x, y, w, h, e = rect.x, rect.y, rect.w, rect.h, rect.encoding
        if e == 0:
            self.put(x, y, w, h, [self.pixel(r) for _ in range(w * h)])
        elif e == 1:
            sx, sy = r.u16(), r.u16()
            if sx + w > self.width or sy + h > self.height:
                raise DecodeError("CopyRect source outside the framebuffer")
            self.put(x, y, w, h, self.area(sx, sy, w, h))  # type: ignore[arg-type]
        elif e == 5:
            self.hextile(r, x, y, w, h)
        elif e == 16:
            length = r.u32()
            raw = self.inflater.decompress(r.take(length))
            inner = Reader(raw)
            self.zrle(inner, x, y, w, h)
            if not inner.done():
                raise DecodeError(f"{len(raw) - inner.pos} bytes left after ZRLE rect")
        elif e == -223:  # DesktopSize: new size, contents undefined
            self.width, self.height = w, h
            self.rows = [[None] * w for _ in range(h)]
        else:
            raise DecodeError(f"unexpected encoding {e}")

    # -- Hextile, rfbproto "Hextile Encoding"

    def hextile(self, r: Reader, x: int, y: int, w: int, h: int) -> None:
        bg: int | None = None
        fg: int | None = None
        for ty in range(y, y + h, 16):
            for tx in range(x, x + w, 16):
                tw, th = min(16, x + w - tx), min(16, y + h - ty)
                mask = r.u8()
                if mask & 1:  # Raw: the other bits are irrelevant
                    self.put(tx, ty, tw, th, [self.pixel(r) for _ in range(tw * th)])
                    bg = fg = None
                    continue
                if mask & 2:
                    bg = self.pixel(r)
                if bg is None:
                    raise DecodeError("Hextile tile without a valid background")
                if mask & 4:
                    if mask & 16:
                        raise DecodeError("ForegroundSpecified together with SubrectsColoured")
                    fg = self.pixel(r)
                tile = [bg] * (tw * th)
                if mask & 8:
                    for _ in range(r.u8()):
                        if mask & 16:
                            colour = self.pixel(r)
                        elif fg is None:
                            raise DecodeError("Hextile subrect without a valid foreground")
                        else:
                            colour = fg
                        xy, wh = r.u8(), r.u8()
                        sx, sy, sw, sh = xy >> 4, xy & 15, (wh >> 4) + 1, (wh & 15) + 1
                        if sx + sw > tw or sy + sh > th:
                            raise DecodeError("Hextile subrect outside its tile")
                        for row in range(sy, sy + sh):
                            tile[row * tw + sx:row * tw + sx + sw] = [colour] * sw
                    if mask & 16:
                        fg = None  # may not be carried over from a coloured tile
                self.put(tx, ty, tw, th, tile)

    # -- ZRLE, rfbproto "ZRLE Encoding"

    @staticmethod
    def run_length(r: Reader) -> int:
        total = 1
        while True:
            b = r.u8()
            total += b
            if b != 255:
                return total

    def zrle(self, r: Reader, x: int, y: int, w: int, h: int) -> None:
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                tw, th = min(64, x + w - tx), min(64, y + h - ty)
                n = tw * th
                sub = r.u8()
                size = sub & 127
                if sub == 0:
                    tile = [self.cpixel(r) for _ in range(n)]
                elif sub == 1:
                    tile = [self.cpixel(r)] * n
                elif 2 <= sub <= 16:
                    palette = [self.cpixel(r) for _ in range(size)]
                    bits = 1 if size == 2 else 2 if size <= 4 else 4
                    tile = []
                    for _row in range(th):
                        row_bytes = r.take((tw * bits + 7) // 8)
                        acc = int.from_bytes(row_bytes, "big")
                        total = len(row_bytes) * 8
                        for col in range(tw):
                            idx = (acc >> (total - (col + 1) * bits)) & ((1 << bits) - 1)
                            if idx >= size:
                                raise DecodeError("packed palette index out of range")
                            tile.append(palette[idx])
                elif sub == 128:
                    tile = []
                    while len(tile) < n:
                        colour = self.cpixel(r)
                        tile += [colour] * self.run_length(r)
                elif sub >= 130:
                    palette = [self.cpixel(r) for _ in range(size)]
                    tile = []
                    while len(tile) < n:
                        idx = r.u8()
                        run = 1
                        if idx & 128:
                            idx &= 127
                            run = self.run_length(r)
                        if idx >= size:
                            raise DecodeError("palette RLE index out of range")
                        tile += [palette[idx]] * run
                else:
                    raise DecodeError(f"ZRLE subencoding {sub} is unused")
                if len(tile) != n:
                    raise DecodeError(f"ZRLE tile has {len(tile)} pixels, not {n}")
                self.put(tx, ty, tw, th, tile)


def server_init(data: bytes) -> tuple[int, int, Format, str, int]:
    """Parse ServerInit: (width, height, pixel format, name, bytes used)."""
    r = Reader(data)
    width, height = r.u16(), r.u16()
    bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = struct.unpack(">BBBBHHHBBB3x", r.take(16))
    if not tc:
        raise DecodeError("server format is not true colour")
    name = r.take(r.u32()).decode("utf-8")
    return width, height, Format(bpp, depth, bool(be), rm, gm, bm, rs, gs, bs), name, r.pos
