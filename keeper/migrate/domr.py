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
  resume    target: link up, repair off with a window probe, gratuitous ARP, serve;
            then, whatever that answered, settle: the target confirms its R (it
            serves; B's from now on) or fences it (gone, its epoch refused)
  commit    the source drops its repaired sockets silently and exits

Rollback: `cancel_target` drops the twin (idempotent), `restart` brings the link back
here and takes the sockets out of repair mode (idempotent: it checks what it did).
This module talks to Domain R's control API and to the peer; the host agent gives it
two callables for what only the agent can do (set the link, forget the process).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from keeper.errors import KeeperError, MigrationError
from keeper.http import Http
from keeper.migrate.driver import Undecided
from keeper.migrate.peer import PeerClient, PrepareDomr, refused

SETTLE_TRIES = 5  # asking the target whether its Domain R serves, before giving up
SETTLE_PAUSE = 0.5  # s, times the attempt

SetLink = Callable[[bool], Awaitable[None]]


class DomrLink:
    """Implements plans.DomainRMover over Domain R's control API and a peer."""

    def __init__(self, req: PrepareDomr, control: Http, peer: PeerClient, *,
                 set_link: SetLink, forget: Callable[[], Awaitable[None]],
                 dump_at_s4: bool = False, epoch: int = 0,
                 on_epoch: Callable[[int], None] = lambda epoch: None) -> None:
        self.req, self.control, self.peer = req, control, peer
        self.set_link, self.forget = set_link, forget
        # The checkpoint's epoch: one more than this R's, at every dump (rolled back or
        # not), so that no two checkpoints of one Domain R share one; a target refuses
        # to restore or resume an epoch it fenced (docs/design.md, the window).
        self.epoch, self.on_epoch = epoch, on_epoch
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
        self.epoch += 1
        self.on_epoch(self.epoch)
        self.info.update(
            epoch=self.epoch, checkpoint_bytes=len(blob),
            sessions=int(headers.get("X-Keeper-Sessions", "0")),
            dump_ms=float(headers.get("X-Keeper-Dump-Ms", "0")),
            queued_in=int(headers.get("X-Keeper-Queued-In", "0")),
            queued_out=int(headers.get("X-Keeper-Queued-Out", "0")),
            by_rms=json.loads(headers.get("X-Keeper-By-Rms", "{}")))

    async def restore(self) -> None:
        self.info["restore"] = await self.peer.restore_domr(self.name, self.checkpoint,
                                                            self.epoch)

    async def resume(self) -> None:
        """RESUME_R, the point of no return (keeper.migrate.sync, rule 4). Returns once
        the target has confirmed that its Domain R serves; raises MigrationError once
        it is sure that R never will (fenced, or its agent gone, which took the R with
        it: an unconfirmed R dies with its agent); raises Undecided if the target
        cannot be asked (then the source keeps everything and restarts nothing)."""
        try:
            self.info.setdefault("restore", {}).update(await self.peer.resume_domr(self.name))
        except KeeperError as exc:  # the answer says nothing sure: ask
            self.info["resume_error"] = str(exc)
        verdict = await self._settle()
        self.info["settled"] = verdict["state"]
        if verdict["state"] != "resumed":
            raise MigrationError(f"Domain R {self.name} did not resume on the target "
                                 f"({self.info.get('resume_error', 'unknown')}); "
                                 f"{verdict['why']}")

    async def _settle(self) -> dict[str, Any]:
        last: KeeperError | None = None
        for attempt in range(SETTLE_TRIES):
            try:
                verdict = await self.peer.settle_domr(self.name)
                return {**verdict, "why": f"the target fenced epoch {verdict.get('epoch')}"}
            except KeeperError as exc:
                if refused(exc):
                    return {"state": "gone", "why": "the target agent is gone, and its "
                            "unconfirmed Domain R with it"}
                last = exc
            await asyncio.sleep(SETTLE_PAUSE * (attempt + 1))
        raise Undecided(f"Domain R {self.name}: the target cannot say whether it serves "
                        f"({last}); nothing is restarted here")

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
