"""What a co-migration cost its clients, seen on the hosts' wire (keeper.net.wiretap).

  source  `watch_source(ip)` before the plan runs, `.close()` after: every client
          segment of the pause comes here (the switch moves only at the target's ARP)
  target  `watch(name, ip)` before its link comes up, `resumed(name)` once Domain R
          serves; the window records WINDOW seconds (a client's RTO, backed off
          once, fits), then `result(name, seeds)` judges what it recorded, seeded
          with what the source saw of each flow, and answers the source (peer route
          wire_domr)
  source  `settle(...)`: both counts together, and the pause clients saw, into the
          metrics (keeper.hostd.metrics.observe_client_side)

Every task here is owned by the `ClientWire` and cancelled by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from keeper.errors import KeeperError
from keeper.hostd import metrics
from keeper.net.wiretap import WireTap

log = logging.getLogger("keeper.hostd")

WINDOW = 1.5  # seconds after the target's resume
RESULT_TIMEOUT = WINDOW + 10.0


def open_tap(ip: str, *, record: bool = False) -> WireTap | None:
    """A started tap, or None (logged) where packet sockets are not allowed: the
    migration does not depend on it."""
    try:
        tap = WireTap(ip, record=record)
    except KeeperError as exc:
        log.warning("no client retransmission count for %s: %s", ip, exc)
        return None
    tap.start()
    return tap


@dataclass(slots=True)
class _Window:
    tap: WireTap | None
    resumed: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ClientWire:
    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- target ---------------------------------------------------------------------

    def watch(self, name: str, ip: str) -> None:
        old = self._windows.pop(name, None)
        if old is not None and old.tap is not None:
            old.tap.close()
        self._windows[name] = _Window(open_tap(ip, record=True))

    def resumed(self, name: str) -> None:
        w = self._windows.get(name)
        if w is None or w.resumed is not None:
            return
        w.resumed = time.monotonic()
        self._spawn(self._close_later(name, w))

    def forget(self, name: str) -> None:
        """The twin was cancelled: no window, nothing counted."""
        w = self._windows.pop(name, None)
        if w is not None and w.tap is not None:
            w.tap.close()

    async def _close_later(self, name: str, w: _Window) -> None:
        try:
            await asyncio.sleep(WINDOW)
        finally:
            if w.tap is not None:
                w.tap.close()
            w.done.set()

    async def result(self, name: str, highs: dict[str, int]) -> dict[str, Any]:
        """Once the window closed: the recorded segments judged, seeded with `highs`
        (what the source saw of each flow). Once per window."""
        w = self._windows.get(name)
        if w is None:
            raise KeeperError(f"no client wire window for {name}")
        try:
            await asyncio.wait_for(w.done.wait(), RESULT_TIMEOUT)
        except TimeoutError:
            raise KeeperError(f"the client wire window of {name} did not close") from None
        if self._windows.get(name) is w:
            del self._windows[name]
        if w.tap is None:
            return {"retransmits": None, "retransmit_wait_ms": None}
        counter = w.tap.replay(highs)
        metrics.CLIENT_RETRANSMITS.inc(counter.retransmits)
        first = counter.first_retransmit()
        return {"retransmits": counter.retransmits, "flows": len(counter.flows),
                "retransmit_wait_ms": None if first is None or w.resumed is None
                else round(max(0.0, first - w.resumed) * 1e3, 3)}

    # -- source ---------------------------------------------------------------------

    def settle(self, name: str, source: WireTap | None, r_downtime_ms: float,
               ask_target: Callable[[dict[str, int]], Awaitable[dict[str, Any]]]
               ) -> int | None:
        """After a co-migration: close the source's tap (its count is returned) and,
        once the target judged its window with what the source saw, observe the
        clients' cost."""
        if source is None:
            return None
        counter = source.close()
        here = counter.retransmits
        metrics.CLIENT_RETRANSMITS.inc(here)
        highs = counter.highs()

        async def finish() -> None:
            try:
                there = await ask_target(highs)
            except (KeeperError, OSError, TimeoutError) as exc:
                log.warning("client retransmissions of %s on the target: %s", name, exc)
                return
            if there.get("retransmits") is None:
                return
            wait = there.get("retransmit_wait_ms") or 0.0
            metrics.observe_client_side(here + int(there["retransmits"]),
                                        (r_downtime_ms + float(wait)) / 1e3)

        self._spawn(finish())
        return here

    async def close(self) -> None:
        """Idempotent: cancel what is pending, close every tap."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for name in list(self._windows):
            self.forget(name)
