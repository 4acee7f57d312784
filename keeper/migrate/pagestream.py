"""The page stream MM_U sends each pre-copy round: runs of pages, zero runs elided.

Record: pfn (u64), count (u32), kind (u8) — kind 0: `count` pages of data follow;
kind 1: `count` zero pages (nothing follows; the receiver writes zeros, since the
page may have held data in an earlier round); kind 2: end of round.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from keeper.errors import ProtocolError

PAGE = 4096
HEAD = struct.Struct("<QIB")
DATA, ZERO, END = 0, 1, 2
CHUNK = 256  # pages per record at most (1 MiB)


def runs(pfns: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first pfn, count) for each run of consecutive pfns, at most CHUNK long."""
    if len(pfns) == 0:
        return
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    for run in np.split(pfns, breaks):
        start, n = int(run[0]), len(run)
        for off in range(0, n, CHUNK):
            yield start + off, min(CHUNK, n - off)


def encode(mem: memoryview, pfns: np.ndarray) -> Iterator[bytes]:
    """Records for pages `pfns` of `mem`, then the end record. Pages are read as late
    as possible (the caller cleared their dirty bytes before)."""
    for start, n in runs(pfns):
        data = mem[start * PAGE:(start + n) * PAGE]
        nonzero = np.frombuffer(data, dtype=np.uint64).reshape(n, PAGE // 8).any(axis=1)
        if not nonzero.any():
            yield HEAD.pack(start, n, ZERO)
            continue
        # split the run where it switches between zero and data pages
        edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), n]
        for a, b in itertools.pairwise(bounds):
            if nonzero[a]:
                yield HEAD.pack(start + a, b - a, DATA)
                yield bytes(data[a * PAGE:b * PAGE])
            else:
                yield HEAD.pack(start + a, b - a, ZERO)
    yield HEAD.pack(0, 0, END)


async def apply(read: Callable[[int], Awaitable[bytes]], mem: memoryview,
                pages: int) -> tuple[int, int]:
    """Read records with `read(n)` (exactly n bytes) into `mem` until the end record.
    Returns (pages written, bytes read). A record outside memory is a protocol error."""
    written = nbytes = 0
    zero = bytes(PAGE * CHUNK)
    while True:
        pfn, count, kind = HEAD.unpack(await read(HEAD.size))
        nbytes += HEAD.size
        if kind == END:
            return written, nbytes
        if kind not in (DATA, ZERO) or count > CHUNK or pfn + count > pages:
            raise ProtocolError(f"page stream: bad record pfn={pfn} count={count} kind={kind}",
                                fault="peer")
        lo, hi = pfn * PAGE, (pfn + count) * PAGE
        if kind == DATA:
            mem[lo:hi] = await read(count * PAGE)
            nbytes += count * PAGE
        else:
            mem[lo:hi] = zero[: hi - lo]
        written += count
