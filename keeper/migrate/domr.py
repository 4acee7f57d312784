"""MM_R: one Domain R and its twin on the target, as the migration plans drive it.

The order, and why (DESIGN.md §5's traps):

  prepare   the target makes the twin namespace (same IP/MAC, link DOWN) and starts
            an empty Domain R there, ready before anything stops
  stop      quiesce (no accepting, reading or writing; what was read stays in the
            session state) → link down (no segment reaches the old sockets, none can
            draw a RST when they are released) → dump (repair mode) → checkpoint;
            for a QEMU guest only input stops here, the rest at S4 (`dump_at_s4`)
  restore   the checkpoint goes to the target agent over the management network;
            there the sockets are restored in repair mode, link still down
  resume    target: link up, repair off with a window probe, gratuitous ARP, serve
  commit    the source drops its repaired sockets silently and exits

Rollback: `cancel_target` drops the twin (idempotent), `restart` brings the link back
here and takes the sockets out of repair mode (idempotent: it checks what it did).
This module talks to Domain R's control API and to the peer; the host agent gives it
two callables for what only the agent can do (set the link, forget the process).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from keeper.errors import KeeperError
from keeper.http import Http
from keeper.migrate.peer import PeerClient, PrepareDomr

SetLink = Callable[[bool], Awaitable[None]]


class DomrLink:
    """Implements plans.DomainRMover over Domain R's control API and a peer."""

    def __init__(self, req: PrepareDomr, control: Http, peer: PeerClient, *,
                 set_link: SetLink, forget: Callable[[], Awaitable[None]],
                 dump_at_s4: bool = False) -> None:
        self.req, self.control, self.peer = req, control, peer
        self.set_link, self.forget = set_link, forget
        # A QEMU guest's R: at S3 it only stops passing input to the VM (held, and
        # QEMU has read all of it); it goes on serving the guest's output until the
        # VM has stopped, and is dumped then (S4): output written after R stopped
        # would otherwise die with the source QEMU (it is not in the VM's state).
        self.dump_at_s4 = dump_at_s4
        self.checkpoint = b""
        self.info: dict[str, Any] = {}
        # what we changed here, set *before* each call that may be cancelled midway
        self._quiesced = self._link_down = self._held = False

    @property
    def name(self) -> str:
        return self.req.name

    async def prepare(self) -> None:
        await self.peer.prepare_domr(self.req)

    async def stop(self) -> None:
        if self.dump_at_s4:
            self._held = True
            await self.control.call("POST", "/hold", json={"on": True}, timeout=15)
            return
        await self._stop()

    async def save_links(self) -> None:
        """S4, U stopped: a QEMU guest's R stops now (see `dump_at_s4`)."""
        if self.dump_at_s4:
            await self._stop()

    async def _stop(self) -> None:
        self._quiesced = True
        await self.control.call("POST", "/quiesce")
        self._link_down = True
        t0 = time.monotonic()
        await self.set_link(False)
        self.info["link_down_ms"] = round((time.monotonic() - t0) * 1e3, 3)
        blob, headers = await self.control.request("POST", "/checkpoint")
        self.checkpoint = blob
        self.info.update(
            checkpoint_bytes=len(blob),
            sessions=int(headers.get("X-Keeper-Sessions", "0")),
            dump_ms=float(headers.get("X-Keeper-Dump-Ms", "0")),
            queued_in=int(headers.get("X-Keeper-Queued-In", "0")),
            queued_out=int(headers.get("X-Keeper-Queued-Out", "0")))

    async def restore(self) -> None:
        self.info["restore"] = await self.peer.restore_domr(self.name, self.checkpoint)

    async def resume(self) -> None:
        self.info.setdefault("restore", {}).update(await self.peer.resume_domr(self.name))

    async def restart(self) -> None:
        if self._link_down:
            await self.set_link(True)
            self._link_down = False
        if self._quiesced:
            await self.control.call("POST", "/abort", timeout=10)
            self._quiesced = False
        if self._held:
            await self.control.call("POST", "/hold", json={"on": False}, timeout=10)
            self._held = False

    async def cancel_target(self) -> None:
        await self.peer.cancel_domr(self.name)

    async def commit(self) -> None:
        try:
            await self.control.call("POST", "/commit")
        except KeeperError as exc:  # it is killed below anyway: the target serves now
            self.info["commit_error"] = str(exc)
        await self.forget()

    def report(self) -> dict[str, Any]:
        return dict(self.info)
