"""The console ring page, `struct xencons_interface` of Xen's `io/console.h`.

    offset    0  char in[1024]     backend (Domain R) -> frontend (guest)
    offset 1024  char out[2048]    frontend (guest)   -> backend (Domain R)
    offset 3072  u32 in_cons       written by the frontend
    offset 3076  u32 in_prod       written by the backend
    offset 3080  u32 out_cons      written by the backend
    offset 3084  u32 out_prod      written by the frontend

Indices are free-running u32 counters, masked on use (`MASK_XENCONS_IDX`), so
`prod - cons` (mod 2**32) is the fill level even after the counters wrap. Each side
copies the indices out of shared memory once per call and validates them before use:
the other side can change them at any moment, and a fill level above the ring size
means the peer is broken or hostile (ProtocolError, fault="peer").

Write order is the ring protocol: a producer stores the data before it advances
`prod`; a consumer copies the data out before it advances `cons`. The same code runs
on a raw mmap slice (Domain R, `RawPage`) and on the guest's dirty-marking memory
(`keeper.domu.memory.GuestMemory.page`), through the two-method `PageIO` protocol.
"""

from __future__ import annotations

import struct
from typing import Protocol

from keeper.errors import ProtocolError

RING_PAGE_SIZE = 4096
IN_OFF = 0
IN_SIZE = 1024
OUT_OFF = 1024
OUT_SIZE = 2048
IN_CONS = 3072
IN_PROD = 3076
OUT_CONS = 3080
OUT_PROD = 3084

_U32 = struct.Struct("<I")
_MOD = 1 << 32


class PageIO(Protocol):
    """Byte access to one shared page; offsets are relative to the page."""

    def read(self, off: int, n: int) -> bytes: ...

    def write(self, off: int, data: bytes) -> None: ...


class RawPage:
    """A `PageIO` over any writable buffer (mmap, bytearray, memoryview) at `base`.

    This is how Domain R sees a page it mapped: its writes do not touch the guest's
    dirty log (which is why D-MORE needs the may-write bitmap). Call `release()`
    before closing an mmap it wraps: a live memoryview keeps the mmap exported.
    """

    def __init__(self, buf: object, base: int = 0) -> None:
        view = memoryview(buf).cast("B")  # type: ignore[arg-type]
        if view.readonly:
            raise ValueError("RawPage needs a writable buffer")
        if base < 0 or base + RING_PAGE_SIZE > len(view):
            raise ValueError(f"page at {base} does not fit in a buffer of {len(view)} bytes")
        self._view = view[base : base + RING_PAGE_SIZE]
        self._whole = view

    def read(self, off: int, n: int) -> bytes:
        _check(off, n)
        return bytes(self._view[off : off + n])

    def write(self, off: int, data: bytes) -> None:
        _check(off, len(data))
        self._view[off : off + len(data)] = data

    def release(self) -> None:
        """Drop the memoryviews so the underlying mmap can be closed."""
        self._view.release()
        self._whole.release()


def _check(off: int, n: int) -> None:
    if off < 0 or n < 0 or off + n > RING_PAGE_SIZE:
        raise ValueError(f"access [{off}, {off + n}) outside the ring page")


def _get(page: PageIO, off: int) -> int:
    return _U32.unpack(page.read(off, 4))[0]


def _set(page: PageIO, off: int, value: int) -> None:
    page.write(off, _U32.pack(value % _MOD))


def _fill(cons: int, prod: int, size: int, ring: str, blame: str) -> int:
    """Fill level of a ring from a copied-out index pair, or ProtocolError."""
    used = (prod - cons) % _MOD
    if used > size:
        raise ProtocolError(
            f"console ring {ring!r}: prod {prod} - cons {cons} = {used} exceeds its size "
            f"{size} ({blame} broke the ring)",
            fault="peer",
        )
    return used


def _ring_read(page: PageIO, base: int, size: int, cons: int, n: int) -> bytes:
    """Copy n bytes starting at free-running index `cons`, across the buffer's end."""
    start = cons & (size - 1)
    first = min(n, size - start)
    data = page.read(base + start, first)
    if n > first:
        data += page.read(base, n - first)
    return data


def _ring_write(page: PageIO, base: int, size: int, prod: int, data: bytes) -> None:
    start = prod & (size - 1)
    first = min(len(data), size - start)
    page.write(base + start, data[:first])
    if len(data) > first:
        page.write(base, data[first:])


def init_ring(page: PageIO) -> None:
    """Zero the four indices: the frontend does this once, at first boot only."""
    page.write(IN_CONS, bytes(16))


# -- backend (Domain R): produces `in`, consumes `out` ------------------------------


def backend_put_input(page: PageIO, data: bytes) -> int:
    """Write as much of `data` as fits into `in`; return how many bytes were taken."""
    cons, prod = _get(page, IN_CONS), _get(page, IN_PROD)
    space = IN_SIZE - _fill(cons, prod, IN_SIZE, "in", "the frontend")
    n = min(space, len(data))
    if n:
        _ring_write(page, IN_OFF, IN_SIZE, prod, bytes(data[:n]))
        _set(page, IN_PROD, prod + n)  # only after the data is in place
    return n


def backend_take_output(page: PageIO, limit: int | None = None) -> bytes:
    """Take everything the frontend produced into `out` (at most `limit` bytes)."""
    cons, prod = _get(page, OUT_CONS), _get(page, OUT_PROD)
    n = _fill(cons, prod, OUT_SIZE, "out", "the frontend")
    if limit is not None:
        n = min(n, max(limit, 0))
    if not n:
        return b""
    data = _ring_read(page, OUT_OFF, OUT_SIZE, cons, n)
    _set(page, OUT_CONS, cons + n)  # only after the data is copied out
    return data


def input_space(page: PageIO) -> int:
    """Free bytes in `in` (how much `backend_put_input` would take now)."""
    return IN_SIZE - input_pending(page)


def output_pending(page: PageIO) -> int:
    """Bytes in `out` that the backend has not taken yet."""
    return _fill(_get(page, OUT_CONS), _get(page, OUT_PROD), OUT_SIZE, "out", "a peer")


# -- frontend (guest): consumes `in`, produces `out` --------------------------------


def frontend_peek_input(page: PageIO, limit: int | None = None) -> bytes:
    """The bytes `frontend_take_input` would return, without consuming them."""
    cons, prod = _get(page, IN_CONS), _get(page, IN_PROD)
    n = _fill(cons, prod, IN_SIZE, "in", "the backend")
    if limit is not None:
        n = min(n, max(limit, 0))
    return _ring_read(page, IN_OFF, IN_SIZE, cons, n) if n else b""


def frontend_take_input(page: PageIO, limit: int | None = None) -> bytes:
    """Take up to `limit` bytes (all if None) of what the backend put into `in`."""
    cons, prod = _get(page, IN_CONS), _get(page, IN_PROD)
    n = _fill(cons, prod, IN_SIZE, "in", "the backend")
    if limit is not None:
        n = min(n, max(limit, 0))
    if not n:
        return b""
    data = _ring_read(page, IN_OFF, IN_SIZE, cons, n)
    _set(page, IN_CONS, cons + n)
    return data


def frontend_put_output(page: PageIO, data: bytes) -> int:
    """Write as much of `data` as fits into `out`; return how many bytes were taken."""
    cons, prod = _get(page, OUT_CONS), _get(page, OUT_PROD)
    space = OUT_SIZE - _fill(cons, prod, OUT_SIZE, "out", "the backend")
    n = min(space, len(data))
    if n:
        _ring_write(page, OUT_OFF, OUT_SIZE, prod, bytes(data[:n]))
        _set(page, OUT_PROD, prod + n)
    return n


def input_pending(page: PageIO) -> int:
    """Bytes in `in` that the frontend has not taken yet."""
    return _fill(_get(page, IN_CONS), _get(page, IN_PROD), IN_SIZE, "in", "a peer")


def output_space(page: PageIO) -> int:
    """Free bytes in `out` (how much `frontend_put_output` would take now)."""
    return OUT_SIZE - output_pending(page)
