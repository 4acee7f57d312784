"""RFB rectangle encodings: Raw, CopyRect, Hextile, ZRLE and the DesktopSize / LastRect
pseudo-encodings.

Encoders take pixel *values* already translated to the client's format (a (h, w) uint32
array from `keeper.vnc.pixels.native_to_values`) and return the bytes that follow a
rectangle header. They are pure functions except ZRLE, which writes into the one zlib
stream a connection has (rfbproto: "A single zlib stream object is used for a given RFB
protocol connection").

The zlib stream and checkpoints
-------------------------------
A `zlib.compressobj` cannot be pickled or copied into a checkpoint. But the client's
inflater needs nothing from our compressor except well-formed deflate blocks that only
refer back into its own 32 KiB window of output. So every ZRLE rectangle ends with a
Z_SYNC_FLUSH (byte-aligned, nothing held back), and `ZlibState` keeps the last 32 KiB
of *uncompressed* bytes fed to the stream — exactly the client's inflate window. After a
restore, a raw-deflate compressor primed with that window as its dictionary continues
the same stream: no new zlib header, no end-of-stream, and back-references that land
where the client expects them. Only the very first compressor of a connection writes
the zlib header. The stream never ends, so no Adler-32 trailer is ever due.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from keeper.vnc.pixels import PixelFormat, cpixel_layout, values_to_bytes, values_to_cpixels

RAW = 0
COPY_RECT = 1
HEXTILE = 5
ZRLE = 16
DESKTOP_SIZE = -223  # pseudo-encoding: the framebuffer changed size
LAST_RECT = -224  # pseudo-encoding: no more rectangles in this update

ZLIB_WINDOW = 32 * 1024  # deflate's window: all a continuing compressor needs to know
# ZlibStream.compress: when deflate is not worth its time
STORE_PROBE = 64 * 1024  # bytes: smaller rectangles are always compressed
STORE_GAIN = 0.2  # shrinking by less than this...
STORE_RUN = 8  # ...sends this many rectangles stored before trying again

_HEADER = struct.Struct(">HHHHi")


def rect_header(x: int, y: int, width: int, height: int, encoding: int) -> bytes:
    return _HEADER.pack(x, y, width, height, encoding)


def desktop_size(width: int, height: int) -> bytes:
    """The DesktopSize pseudo-rectangle: header only, x and y ignored by clients."""
    return rect_header(0, 0, width, height, DESKTOP_SIZE)


def last_rect() -> bytes:
    """The LastRect pseudo-rectangle: ends an update announced with 65535 rectangles."""
    return rect_header(0, 0, 0, 0, LAST_RECT)


def encode_raw(values: np.ndarray, fmt: PixelFormat) -> bytes:
    return values_to_bytes(values, fmt)


def encode_copyrect(src_x: int, src_y: int) -> bytes:
    return struct.pack(">HH", src_x, src_y)


# --- Hextile -----------------------------------------------------------------------

_HT_RAW = 1
_HT_BACKGROUND = 2
_HT_FOREGROUND = 4
_HT_ANY_SUBRECTS = 8
_HT_COLOURED = 16


@dataclass(slots=True)
class _Runs:
    """Run analysis of a whole rectangle, split at 16-pixel tile borders.

    Subrectangles are horizontal runs of one colour, each merged downwards while the row
    below has a run of the same span and colour: cheap, and good for text and UI edges —
    what a management console shows. Array operations over the whole rectangle, so a
    tile knows its subrectangle count (and so raw-or-not) before any Python loop.
    """

    start: np.ndarray  # a run of one colour starts here
    run_end: np.ndarray  # last column of the run through this pixel
    continues: np.ndarray  # this run repeats the run above, same span and colour

    @classmethod
    def of(cls, values: np.ndarray) -> _Runs:
        height, width = values.shape
        col = np.arange(width)
        start = np.ones((height, width), dtype=bool)
        start[:, 1:] = values[:, 1:] != values[:, :-1]
        start[:, col % 16 == 0] = True
        end = np.ones((height, width), dtype=bool)
        end[:, :-1] = values[:, :-1] != values[:, 1:]
        end[:, col % 16 == 15] = True
        last = np.where(end, col, width)
        run_end = np.minimum.accumulate(last[:, ::-1], axis=1)[:, ::-1]
        continues = np.zeros((height, width), dtype=bool)
        continues[1:] = (start[1:] & start[:-1] & (values[1:] == values[:-1])
                         & (run_end[1:] == run_end[:-1]))
        continues[::16] = False
        return cls(start, run_end, continues)


def _hextile_tile(
    values: np.ndarray, runs: _Runs, tx: int, ty: int, fmt: PixelFormat,
    bg: int | None, fg: int | None, known: tuple[int, int] | None = None,
) -> tuple[bytes, int | None, int | None] | None:
    """The tile at (tx, ty), not raw, given the carried bg/fg: (bytes, new bg, new fg);
    None if raw is no bigger or it needs more than 255 subrectangles. `known` is the
    tile's (number of colours, commonest colour) if `_TileStats` has them already."""
    tile = values[ty:ty + 16, tx:tx + 16]
    th, tw = tile.shape
    bpp = fmt.bytes_per_pixel
    first = int(tile[0, 0])
    if known is None and tile.min() == tile.max():  # solid: the common case
        known = (1, first)
    if known is not None and known[0] == 1:
        if first == bg:
            return b"\x00", bg, fg
        return bytes((_HT_BACKGROUND,)) + values_to_bytes(np.array([first]), fmt), first, fg
    if known is None:
        colours, counts = np.unique(tile, return_counts=True)
        known = (colours.size, int(colours[int(np.argmax(counts))]))
    ncolours, tile_bg = known
    mask = 0
    body = bytearray()
    if tile_bg != bg:
        mask |= _HT_BACKGROUND
        body += values_to_bytes(np.array([tile_bg]), fmt)
    continues = runs.continues[ty:ty + th, tx:tx + tw]
    ys, xs = np.nonzero(runs.start[ty:ty + th, tx:tx + tw] & (tile != tile_bg) & ~continues)
    mono = ncolours == 2
    colour = int(tile[tile != tile_bg][0]) if mono else None
    size = len(body) + 1 + len(ys) * (2 if mono else 2 + bpp)
    if mono and colour != fg:
        size += bpp
    if len(ys) > 255 or size >= tile.size * bpp:
        return None
    mask |= _HT_ANY_SUBRECTS
    if mono:
        if colour != fg:
            mask |= _HT_FOREGROUND
            body += values_to_bytes(np.array([colour]), fmt)
        fg = colour
    else:
        mask |= _HT_COLOURED
        fg = None  # the spec forbids carrying a foreground out of a coloured tile
        pix = values_to_bytes(tile[ys, xs], fmt)
    body.append(len(ys))
    run_end = runs.run_end[ty:ty + th, tx:tx + tw]
    for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True)):
        h = 1
        while y + h < th and continues[y + h, x]:
            h += 1
        w = int(run_end[y, x]) - tx - x + 1
        if not mono:
            body += pix[i * bpp:(i + 1) * bpp]
        body += bytes(((x << 4) | y, ((w - 1) << 4) | (h - 1)))
    return bytes((mask,)) + body, tile_bg, fg


def _tiles(a: np.ndarray, size: int) -> np.ndarray:
    """The whole `size`x`size` tiles of `a` (h, w), one row each, tile order (left to
    right, top down): shape (tiles, size * size). Partial tiles at the right and
    bottom edges are not included."""
    ny, nx = a.shape[0] // size, a.shape[1] // size
    return (a[:ny * size, :nx * size].reshape(ny, size, nx, size).swapaxes(1, 2)
            .reshape(ny * nx, size * size))


@dataclass(slots=True)
class _TileStats:
    """Per whole tile, for every tile at once: its number of colours, its most
    frequent colour (the smallest of the most frequent, as np.unique's argmax would
    pick), and its smallest and largest colour (a two-colour tile's pair)."""

    colours: np.ndarray  # (tiles,)
    commonest: np.ndarray  # (tiles,)
    lo: np.ndarray  # (tiles,)
    hi: np.ndarray  # (tiles,)

    @classmethod
    def of(cls, tiles: np.ndarray) -> _TileStats:
        """Tiles of at most two colours (text, UI: most of a console) are counted
        without the sort, which the rest then costs alone."""
        lo, hi = tiles.min(axis=1), tiles.max(axis=1)
        n_lo = np.count_nonzero(tiles == lo[:, None], axis=1)
        n_hi = np.count_nonzero(tiles == hi[:, None], axis=1)
        solid = lo == hi
        few = solid | (n_lo + n_hi == tiles.shape[1])
        colours = np.where(solid, 1, 2)
        commonest = np.where(n_hi > n_lo, hi, lo)  # a tie: the smaller, as np.unique's
        if not few.all():
            rest = cls._sorted(tiles[~few])
            colours[~few], commonest[~few] = rest.colours, rest.commonest
        return cls(colours, commonest, lo, hi)

    @classmethod
    def _sorted(cls, tiles: np.ndarray) -> _TileStats:
        n, px = tiles.shape
        ordered = np.sort(tiles, axis=1)
        new = np.ones((n, px), dtype=bool)
        new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        run = np.cumsum(new, axis=1) - 1  # which colour (ascending) each position holds
        counts = np.bincount((np.arange(n)[:, None] * px + run).ravel(),
                             minlength=n * px).reshape(n, px)
        first = np.argmax(run == np.argmax(counts, axis=1)[:, None], axis=1)
        return cls(new.sum(axis=1), ordered[np.arange(n), first], ordered[:, 0],
                   ordered[:, -1])


def _colour_counts(tiles: np.ndarray) -> np.ndarray:
    """Per tile (a row of `tiles`), its number of colours: `_TileStats.colours` alone."""
    ordered = np.sort(tiles, axis=1)
    return 1 + np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1)


_TILE_SOLID, _TILE_RAW = 1, 2


def _hextile_kinds(values: np.ndarray, runs: _Runs,
                   bpp: int) -> tuple[np.ndarray, _TileStats | None, _MonoTiles | None]:
    """Per tile (rows, cols of tiles): solid, raw whatever is carried over, or 0 (the
    tile's own encoder decides, given the whole tiles' stats, also returned). Array
    operations over every whole tile at once: a screen of photos or gradients is raw
    everywhere, and is found so without a Python loop per tile; what `_hextile_tile`
    decides is never changed, only known early."""
    height, width = values.shape
    kinds = np.zeros((-(-height // 16), -(-width // 16)), dtype=np.int8)
    ny, nx = height // 16, width // 16
    if not ny or not nx:
        return kinds, None, None
    tiles = _tiles(values, 16)
    stats = _TileStats.of(tiles)
    fresh = _tiles(runs.start & ~runs.continues, 16)  # subrectangles' top-left corners
    subrects = (fresh & (tiles != stats.commonest[:, None])).sum(axis=1)
    # the least the tile could cost: background and foreground both carried over
    least = 1 + subrects * np.where(stats.colours == 2, 2, 2 + bpp)
    raw = (stats.colours > 1) & ((subrects > 255) | (least >= 256 * bpp))
    kinds[:ny, :nx] = np.where(stats.colours == 1, _TILE_SOLID,
                               np.where(raw, _TILE_RAW, 0)).reshape(ny, nx)
    mono = None
    if np.any((stats.colours == 2) & ~raw):
        mono = _MonoTiles.of(values, runs, stats, ny, nx)
    return kinds, stats, mono


@dataclass(slots=True)
class _MonoTiles:
    """Every whole two-colour tile's subrectangles, found at once: what `_hextile_tile`
    would write for them, as one byte string in tile order (per tile `count` pairs
    from `offset`), and each tile's colour that is not its background. Text is such
    tiles nearly everywhere (a VGA text console: all of them), and a Python loop per
    subrectangle cost 80 ms a 720x400 screen."""

    count: np.ndarray  # (tiles,) subrectangles
    offset: np.ndarray  # (tiles + 1,) into `pairs`, in bytes
    pairs: bytes  # (x << 4 | y, (w - 1) << 4 | h - 1) per subrectangle
    other: np.ndarray  # (tiles,) the foreground colour

    @classmethod
    def of(cls, values: np.ndarray, runs: _Runs, stats: _TileStats, ny: int,
           nx: int) -> _MonoTiles:
        height, width = ny * 16, nx * 16

        def per_pixel(a: np.ndarray) -> np.ndarray:
            return np.repeat(np.repeat(a.reshape(ny, nx), 16, 0), 16, 1)

        cont = runs.continues[:height, :width]
        starts = (runs.start[:height, :width] & ~cont
                  & (values[:height, :width] != per_pixel(stats.commonest))
                  & per_pixel(stats.colours == 2))
        # a subrectangle's height: 1 + the `continues` below it, within its tile
        # (`continues` is False on every tile's top row)
        below = np.zeros((ny, 16, width), dtype=np.int16)
        c3 = cont.reshape(ny, 16, width)
        for r in range(14, -1, -1):
            below[:, r] = np.where(c3[:, r + 1], below[:, r + 1] + 1, 0)
        ys, xs = np.nonzero(starts)  # row-major: within a tile too, once grouped
        tile = (ys >> 4) * nx + (xs >> 4)
        order = np.argsort(tile, kind="stable")
        ys, xs, tile = ys[order], xs[order], tile[order]
        w = runs.run_end[ys, xs] - xs + 1  # runs stop at tile borders
        h = below.reshape(height, width)[ys, xs] + 1
        pairs = np.empty((ys.size, 2), dtype=np.uint8)
        pairs[:, 0] = ((xs & 15) << 4) | (ys & 15)
        pairs[:, 1] = ((w - 1) << 4) | (h - 1)
        count = np.bincount(tile, minlength=ny * nx)
        offset = np.zeros(ny * nx + 1, dtype=np.int64)
        np.cumsum(count * 2, out=offset[1:])
        other = np.where(stats.hi == stats.commonest, stats.lo, stats.hi)
        return cls(count, offset, pairs.tobytes(), other)


def encode_hextile(values: np.ndarray, fmt: PixelFormat) -> bytes:
    """Hextile (rfbproto "Hextile Encoding"): 16x16 tiles, each raw or background plus
    subrectangles. Background/foreground are carried over only where the spec allows
    (never after a raw tile; foreground never after a SubrectsColoured tile)."""
    height, width = values.shape
    bpp = fmt.bytes_per_pixel
    runs = _Runs.of(values)
    kinds, stats, mono = _hextile_kinds(values, runs, bpp)
    whole_x = width // 16  # tiles a row of whole tiles has
    wire = np.frombuffer(values_to_bytes(values, fmt), dtype=np.uint8).reshape(
        height, width * bpp)
    pixel: dict[int, bytes] = {}  # a colour's bytes on the wire

    def colour_bytes(value: int) -> bytes:
        if value not in pixel:
            pixel[value] = values_to_bytes(np.array([value], dtype=values.dtype), fmt)
        return pixel[value]

    # Python lists: the loop below indexes them once a tile, numpy scalars cost more
    colours = stats.colours.tolist() if stats is not None else []
    commonest = stats.commonest.tolist() if stats is not None else []
    if mono is not None:
        other, count, offset = mono.other.tolist(), mono.count.tolist(), mono.offset.tolist()
    pairs = mono.pairs if mono is not None else b""
    out = bytearray()
    bg: int | None = None  # carried background, if valid
    fg: int | None = None  # carried foreground, if valid
    for ty in range(0, height, 16):
        row = kinds[ty // 16].tolist()
        whole_row = ty + 16 <= height
        for tx in range(0, width, 16):
            kind = row[tx // 16]
            if kind == _TILE_SOLID:
                first = int(values[ty, tx])
                if first == bg:
                    out.append(0)
                else:
                    out.append(_HT_BACKGROUND)
                    out += wire[ty, tx * bpp:(tx + 1) * bpp].tobytes()
                    bg = first
                continue
            known = None
            if colours and whole_row and tx + 16 <= width:
                i = ty // 16 * whole_x + tx // 16
                known = (colours[i], commonest[i])
                if mono is not None and kind == 0 and known[0] == 2:
                    # what _hextile_tile writes for a two-colour tile, found beforehand
                    tile_bg, colour, n = known[1], other[i], count[i]
                    mask = _HT_ANY_SUBRECTS
                    size = 1 + 2 * n
                    if tile_bg != bg:
                        mask |= _HT_BACKGROUND
                        size += bpp
                    if colour != fg:
                        mask |= _HT_FOREGROUND
                        size += bpp
                    if n <= 255 and size < 256 * bpp:
                        out.append(mask)
                        if mask & _HT_BACKGROUND:
                            out += colour_bytes(tile_bg)
                        if mask & _HT_FOREGROUND:
                            out += colour_bytes(colour)
                        out.append(n)
                        out += pairs[offset[i]:offset[i + 1]]
                        bg, fg = tile_bg, colour
                        continue
            coded = None if kind == _TILE_RAW else _hextile_tile(values, runs, tx, ty, fmt,
                                                                 bg, fg, known)
            if coded is None:
                out.append(_HT_RAW)
                out += wire[ty:ty + 16, tx * bpp:(tx + 16) * bpp].tobytes()
                bg = fg = None
            else:
                data, bg, fg = coded
                out += data
    return bytes(out)


# --- ZRLE --------------------------------------------------------------------------


@dataclass(slots=True)
class ZlibState:
    """What survives a checkpoint of a connection's zlib stream (see the module doc)."""

    level: int = 6
    started: bool = False  # the zlib header has gone out
    window: bytes = b""  # last ZLIB_WINDOW uncompressed bytes fed to the stream
    stored: int = 0  # rectangles still to send stored (level 0): the last did not shrink


class ZlibStream:
    """One connection's deflate stream; every `compress` call ends with Z_SYNC_FLUSH.

    The live compressor is a cache beside `state`; dropping it (as a checkpoint does)
    loses nothing, the next call rebuilds it from `state.window`.
    """

    def __init__(self, state: ZlibState) -> None:
        self.state = state
        self._compressor: zlib._Compress | None = None

    def _make(self) -> zlib._Compress:
        st = self.state
        level = 0 if st.stored else st.level
        if not st.started:
            return zlib.compressobj(level)
        if st.window:
            return zlib.compressobj(level, zlib.DEFLATED, -15, zdict=st.window)
        return zlib.compressobj(level, zlib.DEFLATED, -15)

    def compress(self, data: bytes) -> bytes:
        """Measured here on an 800x600 screen whose every pixel changes each frame
        (photos, video, the bench's screensaver): deflate shrinks its 1.4 MB of ZRLE
        data by 9 % at any level and costs as much as encoding it, so a rectangle
        over STORE_PROBE bytes that shrinks by less than STORE_GAIN makes the next
        STORE_RUN go out stored (level 0: copied, still one stream); then the level
        is tried again. Text and UI screens shrink 5x or more and never switch."""
        st = self.state
        if self._compressor is None:
            self._compressor = self._make()
        c = self._compressor
        out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        st.started = True
        if len(data) >= ZLIB_WINDOW:
            st.window = bytes(data[-ZLIB_WINDOW:])
        else:
            st.window = (st.window + data)[-ZLIB_WINDOW:]
        if st.stored:
            st.stored -= 1
            if not st.stored:
                self._compressor = None  # back to st.level, primed with the window
        elif len(data) > STORE_PROBE and len(out) > len(data) * (1 - STORE_GAIN):
            st.stored = STORE_RUN
            self._compressor = None
        return out


def _run_length_bytes(lengths: np.ndarray) -> np.ndarray:
    """How many bytes each run length takes: floor((L - 1) / 255) bytes of 255, then one."""
    return (lengths - 1) // 255 + 1


def _two_colours(flat: np.ndarray) -> bool:
    lo, hi = flat.min(), flat.max()
    return bool(lo != hi and np.all((flat == lo) | (flat == hi)))


def _zrle_tile(tile: np.ndarray, fmt: PixelFormat, cp: int, colours: int = 0) -> bytes:
    """One ZRLE tile: the cheapest of solid, packed palette, raw, plain RLE, palette RLE.
    `colours`, if known (`_TileStats`), spares the palette's sort where no palette
    encoding can apply (more than 127 colours)."""
    th, tw = tile.shape
    flat = tile.reshape(-1)
    n = flat.size
    if colours == 1:
        return b"\x01" + values_to_cpixels(flat[:1], fmt)
    if colours > 127:
        palette = inverse = flat[:0]
        k = colours
    elif colours in (0, 2) and _two_colours(flat):
        # text: np.unique's sort per tile was most of a text screen's encoding time;
        # the same palette (ascending) and indexes, without it
        lo, hi = flat.min(), flat.max()
        palette, inverse = np.array([lo, hi], dtype=flat.dtype), (flat == hi).astype(np.intp)
        k = 2
    else:
        palette, inverse = np.unique(flat, return_inverse=True)
        k = palette.size
    if k == 1:
        return b"\x01" + values_to_cpixels(palette, fmt)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, n))
    len_bytes = _run_length_bytes(lengths)
    costs = {"raw": n * cp, "rle": len(starts) * cp + int(len_bytes.sum())}
    if k <= 16:
        bits = 1 if k == 2 else 2 if k <= 4 else 4
        costs["packed"] = k * cp + ((tw * bits + 7) // 8) * th
    if k <= 127:
        costs["prle"] = k * cp + int(np.where(lengths == 1, 1, 1 + len_bytes).sum())
    best = min(costs, key=lambda name: costs[name])
    if best == "raw":
        return b"\x00" + values_to_cpixels(flat, fmt)
    if best == "packed":
        idx = inverse.reshape(th, tw).astype(np.uint8)
        if bits == 1:
            packed = np.packbits(idx, axis=1)
        else:
            per_byte = 8 // bits
            pad = (-tw) % per_byte
            idx = np.pad(idx, ((0, 0), (0, pad))).reshape(th, -1, per_byte)
            shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
            packed = np.bitwise_or.reduce(idx << shifts, axis=2).astype(np.uint8)
        return bytes((k,)) + values_to_cpixels(palette, fmt) + packed.tobytes()
    if best == "prle":
        counts = np.where(lengths == 1, 1, 1 + len_bytes)
        out = np.full(int(counts.sum()), 255, dtype=np.uint8)
        offs = np.cumsum(counts) - counts
        long = lengths > 1
        out[offs] = inverse.reshape(-1)[starts].astype(np.uint8) | np.where(long, 128, 0)
        out[(offs + counts - 1)[long]] = ((lengths[long] - 1) % 255).astype(np.uint8)
        return bytes((128 + k,)) + values_to_cpixels(palette, fmt) + out.tobytes()
    # plain RLE: CPIXEL then the run length, per run
    counts = cp + len_bytes
    out = np.full(int(counts.sum()), 255, dtype=np.uint8)
    offs = np.cumsum(counts) - counts
    pix = np.frombuffer(values_to_cpixels(flat[starts], fmt), dtype=np.uint8).reshape(-1, cp)
    out[offs[:, None] + np.arange(cp)] = pix
    out[offs + counts - 1] = ((lengths - 1) % 255).astype(np.uint8)
    return b"\x80" + out.tobytes()


def zrle_data(values: np.ndarray, fmt: PixelFormat) -> bytes:
    """The uncompressed ZRLE payload of a rectangle: 64x64 tiles, left to right, top down."""
    height, width = values.shape
    cp, _ = cpixel_layout(fmt)
    colours = np.zeros((-(-height // 64), -(-width // 64)), dtype=np.int64)
    ny, nx = height // 64, width // 64
    if ny and nx:  # the whole tiles' colour counts, in one sort
        colours[:ny, :nx] = _colour_counts(_tiles(values, 64)).reshape(ny, nx)
    return b"".join(
        _zrle_tile(values[ty:ty + 64, tx:tx + 64], fmt, cp, int(colours[ty // 64, tx // 64]))
        for ty in range(0, height, 64)
        for tx in range(0, width, 64)
    )


def encode_zrle(values: np.ndarray, fmt: PixelFormat, stream: ZlibStream) -> bytes:
    """ZRLE (rfbproto "ZRLE Encoding"): u32 length, then that much of the zlib stream."""
    data = stream.compress(zrle_data(values, fmt))
    return struct.pack(">I", len(data)) + data
