"""Event rings of Xen's virtual keyboard and framebuffer (io/kbdif.h, io/fbif.h).

Both devices share one page per device with a header of four u32 indices
(in_cons, in_prod, out_cons, out_prod) and two rings of fixed 40-byte events. Unlike
the console, the ring lengths are not powers of two (2048/40 = 51 events), so an
index selects slot `idx % len`, as the Xen macros XENKBD_IN_RING_REF and
XENFB_OUT_RING_REF do. Indices are free-running u32, copied out once and checked
(the other side may change them under us).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from keeper.errors import ProtocolError
from keeper.xen.console import PageIO

EVENT_SIZE = 40
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 0, 4, 8, 12
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Ring:
    """One ring of a device page: where it is, how many 40-byte slots it has."""

    offset: int
    size: int  # bytes
    cons: int  # offset of the consumer index in the page
    prod: int  # offset of the producer index

    @property
    def slots(self) -> int:
        return self.size // EVENT_SIZE


def _u32(page: PageIO, off: int) -> int:
    return int(_U32.unpack(page.read(off, 4))[0])


def _indices(page: PageIO, ring: Ring, who: str) -> tuple[int, int]:
    cons, prod = _u32(page, ring.cons), _u32(page, ring.prod)
    if (prod - cons) & 0xFFFFFFFF > ring.slots:
        raise ProtocolError(f"event ring at {ring.offset}: producer {prod} is more than "
                            f"{ring.slots} ahead of consumer {cons}", fault=who)
    return cons, prod


def put(page: PageIO, ring: Ring, events: list[bytes], *, peer: str,
        all_or_none: bool = False) -> int:
    """Produce as many events as there is room for; return how many went in. With
    `all_or_none`, a batch that does not fit entirely is not started (a key's
    Shift-press, press and Shift-release belong together)."""
    cons, prod = _indices(page, ring, peer)
    room = ring.slots - ((prod - cons) & 0xFFFFFFFF)
    if all_or_none and room < len(events):
        return 0
    n = min(room, len(events))
    for i in range(n):
        ev = events[i]
        if len(ev) > EVENT_SIZE:
            raise ValueError(f"event of {len(ev)} bytes")
        slot = (prod + i) % ring.slots
        page.write(ring.offset + slot * EVENT_SIZE, ev.ljust(EVENT_SIZE, b"\0"))
    if n:  # the events are in place before the producer index says so
        page.write(ring.prod, _U32.pack((prod + n) & 0xFFFFFFFF))
    return n


def take(page: PageIO, ring: Ring, *, peer: str, limit: int | None = None) -> list[bytes]:
    """Consume the pending events (copied out before the consumer index moves)."""
    cons, prod = _indices(page, ring, peer)
    n = (prod - cons) & 0xFFFFFFFF
    if limit is not None:
        n = min(n, limit)
    out = [page.read(ring.offset + ((cons + i) % ring.slots) * EVENT_SIZE, EVENT_SIZE)
           for i in range(n)]
    if n:
        page.write(ring.cons, _U32.pack((cons + n) & 0xFFFFFFFF))
    return out


def init(page: PageIO) -> None:
    page.write(0, bytes(16))


# -- kbdif.h ---------------------------------------------------------------------------
KBD_IN = Ring(offset=1024, size=2048, cons=IN_CONS, prod=IN_PROD)  # backend -> frontend
KBD_OUT = Ring(offset=3072, size=1024, cons=OUT_CONS, prod=OUT_PROD)
XENKBD_TYPE_MOTION, XENKBD_TYPE_KEY, XENKBD_TYPE_POS = 1, 3, 4
_KEY = struct.Struct("<BBxxI")  # type, pressed, pad, keycode (Linux KEY_*)
_POS = struct.Struct("<Bxxxiii")  # type, abs_x, abs_y, rel_z


def key_event(keycode: int, pressed: bool) -> bytes:
    return _KEY.pack(XENKBD_TYPE_KEY, int(pressed), keycode)


def pos_event(x: int, y: int, z: int = 0) -> bytes:
    return _POS.pack(XENKBD_TYPE_POS, x, y, z)


def parse_kbd(ev: bytes) -> tuple[int, int, int]:
    """(type, a, b): KEY -> (keycode, pressed); POS -> (x, y); others -> (0, 0)."""
    kind = ev[0]
    if kind == XENKBD_TYPE_KEY:
        _, pressed, keycode = _KEY.unpack_from(ev)
        return kind, keycode, pressed
    if kind == XENKBD_TYPE_POS:
        _, x, y, _z = _POS.unpack_from(ev)
        return kind, x, y
    return kind, 0, 0


# -- fbif.h ----------------------------------------------------------------------------
FB_IN = Ring(offset=1024, size=1024, cons=IN_CONS, prod=IN_PROD)  # backend -> frontend
FB_OUT = Ring(offset=2048, size=2048, cons=OUT_CONS, prod=OUT_PROD)  # updates
XENFB_TYPE_UPDATE, XENFB_TYPE_RESIZE = 2, 3
FB_WIDTH, FB_HEIGHT, FB_LINE_LENGTH, FB_MEM_LENGTH, FB_DEPTH = 16, 20, 24, 28, 32
FB_PD = 40  # unsigned long pd[256]: page numbers of page-directory pages
_UPDATE = struct.Struct("<Bxxxiiii")  # type, x, y, width, height


def update_event(x: int, y: int, w: int, h: int) -> bytes:
    return _UPDATE.pack(XENFB_TYPE_UPDATE, x, y, w, h)


def parse_update(ev: bytes) -> tuple[int, int, int, int] | None:
    if ev[0] != XENFB_TYPE_UPDATE:
        return None
    _, x, y, w, h = _UPDATE.unpack_from(ev)
    return x, y, w, h


def write_fb_header(page: PageIO, width: int, height: int, depth: int,
                    pd: list[int]) -> None:
    line = width * depth // 8
    page.write(FB_WIDTH, struct.pack("<iiII", width, height, line, line * height))
    page.write(FB_DEPTH, bytes([depth]))
    page.write(FB_PD, struct.pack(f"<{len(pd)}Q", *pd))


def read_fb_header(page: PageIO) -> tuple[int, int, int, int, int]:
    """(width, height, line_length, mem_length, depth), checked for sanity."""
    width, height, line, mem = struct.unpack("<iiII", page.read(FB_WIDTH, 16))
    depth = page.read(FB_DEPTH, 1)[0]
    if not (0 < width <= 4096 and 0 < height <= 4096 and depth == 32
            and line == width * 4 and mem == line * height):
        raise ProtocolError(f"framebuffer header {width}x{height}x{depth} line {line} "
                            f"mem {mem} is not one we serve", fault="peer")
    return width, height, line, mem, depth


def read_pd(page: PageIO, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}Q", page.read(FB_PD, 8 * n)))
