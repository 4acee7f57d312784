"""Fault drills: each builds its own lab, injects one fault, and reports one row.

`bench/faults.py` runs every drill of the modules below and prints a row per drill
(with `--json`, one JSON line last). A module exposes `CASES`, a list of `Drill`s; a
drill's `run()` sets up what it needs, removes all of it whatever happens, and returns
a `Row`:

  wire      loss on the wire (nftables in the switch namespace) during co-migrations
  window    the window after Domain U resumed on the target (kill or fail each process)
  hostile   malformed and hostile input at every entry point
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    case: str  # e.g. "wire/ssh/loss-10pct"
    sessions: int  # client sessions that ran through the drill
    lost: int  # keys or bytes lost (sent but never received), summed over sessions
    reconnects: int  # client connections that had to be opened again
    recovered: bool  # afterwards: one Domain R serves the guest, every session goes on
    extra: dict[str, Any] = field(default_factory=dict)  # pause, retransmits, error, ...

    def doc(self) -> dict[str, Any]:
        return {"case": self.case, "sessions": self.sessions, "lost": self.lost,
                "reconnects": self.reconnects, "recovered": self.recovered, **self.extra}


@dataclass(frozen=True)
class Drill:
    name: str
    run: Callable[[], Awaitable[Row]]


async def in_lab(prefix: str, case: str, body: Callable[[Any], Awaitable[Row]]) -> Row:
    """`body(spec)` in a fresh lab named after the drill, removed afterwards (and any
    namespace of it left behind) whatever happens."""
    from keeper.lab import ops, topology
    from keeper.net import netns

    name = f"{prefix}{zlib.crc32(case.encode()) % 10**6:06d}"
    try:
        return await body(await ops.up(name))
    finally:
        with contextlib.suppress(Exception):
            topology.down(name)
        for ns in [ns for ns in netns.netns.listnetns() if ns.startswith(f"{name}-")]:
            netns.remove(ns)
