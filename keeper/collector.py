"""Python's cyclic garbage collector, kept out of a move's pause.

A dump or a restore of a thousand sessions makes some 10^5 containers (dicts, lists,
dataclasses) in a few milliseconds: enough to trigger several collections, and a
full one walks every container the process holds, the ~70,000 that importing
asyncssh, aiohttp, numpy and scapy made included. Measured on a 1,000-session
checkpoint in a warm spare Domain R: msgpack's unpack took 74 ms with the collector
on, 10 ms with it off; the whole decode 107 ms against 26.

So: `freeze` once a Domain R or a host agent has imported everything (those objects
live as long as the process; the collector then never walks them again), and
`collector_paused` around each of Domain R's steps in the pause (dump, restore,
resume). Reference counting frees everything as usual in between; only cycles wait,
for the collection that follows.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze() -> None:
    """Everything alive now is permanent: no collection walks it again. The full
    collection first (so no garbage is frozen) costs ~50 ms after the imports; it is
    paid once (a spare Domain R pays it while it waits)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
    gc.freeze()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside the block (nesting is fine); the collector is back
    as it was after it, even when the block raises."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
