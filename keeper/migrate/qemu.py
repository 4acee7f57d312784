"""MM_U for QEMU: the VM moves by QEMU's own live migration, driven over QMP, at the
seven points (DESIGN.md §8). The stream goes from QEMU to QEMU over the management
network between the hosts, never through Domain R.

  create_incoming  target: QEMU started `-incoming defer -S`, capabilities
                   pause-before-switchover + return-path, `migrate-incoming` on a
                   port of the target's management address
  iterate          once Domain R's twin is ready (S1): Domain R holds the guest's
                   input and QEMU has read all of it (the VM is running), then
                   `migrate`; each round then polls QEMU's progress: ready when the
                   first pass is done
  stop             wait for `pre-switchover`: the VM is stopped (finish-migrate)
  save_links       (S4) the journal so far: the source VM can write no more
  final_copy       (S5) `migrate-continue`, wait for `completed`
  link             (S6) target: the journal history; the device sockets are up
                   from QEMU's start, so Domain R's links can be made before `cont`
  resume           target: `cont`
  unpause          rollback: `migrate_cancel`, `cont` here, input flows again

Why input is held from the first round, not from S2: QEMU 7.2 stops the VM on its
own as soon as what is left fits its downtime limit — measured here, even a limit
of 0 completes once the first pass is done (QEMU re-syncs the dirty log only below
the limit) — and QEMU drops keys that reach it while the VM is stopped. So nothing
may be in flight to QEMU from the moment it may stop the VM; keys typed meanwhile
wait in Domain R (its sessions' state) and reach the VM when it runs on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from keeper.errors import MigrationError
from keeper.migrate.peer import DeviceLinks, IncomingGuest, PeerClient
from keeper.qemu.machine import QemuMachine

POLL = 0.01  # between looks at QEMU's progress
PARTNER_WAIT = 0.5  # one round's wait for Domain R's twin
STOP_TIMEOUT = 60.0
Hold = Callable[[bool], Awaitable[None]]
Progress = Callable[[dict[str, Any]], None]


class QemuGuest:
    """Implements plans.GuestMigrator for a QEMU guest."""

    kind = "qemu"

    def __init__(self, machine: QemuMachine, req: IncomingGuest, peer: PeerClient, *,
                 history: Callable[[], bytes], release: Callable[[], Awaitable[None]],
                 hold: Hold | None, kernel: str | None,
                 progress: Progress | None = None) -> None:
        self.m, self.req, self.peer = machine, req, peer
        self.history, self._release, self.hold = history, release, hold
        self.kernel = kernel
        self.progress = progress or (lambda event: None)
        self.uri = ""
        self.polls = 0
        self.info: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._partner = asyncio.Event()
        # what we changed here, set before each call that may be cancelled midway
        self._held = self._migrating = self._stopped = False
        self._t_migrate = 0.0

    async def create_incoming(self) -> None:
        req = replace(self.req, options={**self.req.options, "accel": self.m.accel})
        self.uri = str((await self.peer.incoming(req))["uri"])

    def partner_ready(self) -> None:
        self._partner.set()

    async def iterate(self) -> bool:
        if not self._partner.is_set():
            # QEMU's pre-copy starts once Domain R's twin is ready (S1): input is held
            # from then on, so the hold lasts QEMU's pre-copy, not the twin's start
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._partner.wait(), PARTNER_WAIT)
            return False
        if not self._migrating:
            if self.hold is not None:
                self._held = True
                await self.hold(True)  # returns once QEMU has read all input
            await self.m.set_capabilities()
            self._migrating = True
            self._t_migrate = time.monotonic()
            await self.m.migrate(self.uri)
        else:
            await asyncio.sleep(POLL)
        q = await self.m.query_migrate()
        self.polls += 1
        status = q.get("status", "none")
        if status in ("failed", "cancelled"):
            raise MigrationError(f"QEMU migration {status}: {q.get('error-desc', '')}")
        ram = q.get("ram", {})
        self.progress({"phase": "pre-copy", "status": status,
                       "transferred": ram.get("transferred"), "remaining": ram.get("remaining")})
        # ready once the first pass is through: QEMU stops the VM when it sees fit
        return status in ("pre-switchover", "device", "completed") or (
            status == "active" and int(ram.get("dirty-sync-count", 0)) >= 2)

    async def stop(self) -> None:
        self._stopped = True
        q = await self.m.wait_migration("pre-switchover", timeout=STOP_TIMEOUT)
        self.info["qemu_precopy_ms"] = round((time.monotonic() - self._t_migrate) * 1e3, 3)
        self.info["qemu_transferred_bytes"] = q.get("ram", {}).get("transferred")

    async def save_links(self) -> DeviceLinks:
        return DeviceLinks(state={"journal": self._journal()})

    async def final_copy(self) -> None:
        await self.m.migrate_continue("pre-switchover")
        q = await self.m.wait_migration("completed", timeout=STOP_TIMEOUT)
        self.info["qemu_downtime_ms"] = q.get("downtime")
        self.info["qemu_total_ms"] = q.get("total-time")
        self.info["bytes_sent"] = q.get("ram", {}).get("transferred", 0)

    async def link(self, links: DeviceLinks | None) -> None:
        if links is None:  # the baseline: only the journal travels
            links = DeviceLinks(state={"journal": self._journal()})
        await self.peer.links(self.req.name, links)

    async def resume(self) -> None:
        await self.peer.resume_guest(self.req.name)

    async def unpause(self) -> None:
        await self._restore_source()

    async def cancel_target(self) -> None:
        """Drop the target's QEMU; here the VM runs and input flows again."""
        try:
            await self.peer.cancel_guest(self.req.name)
        finally:
            await self._restore_source()

    async def _restore_source(self) -> None:
        """Idempotent: the migration cancelled, the VM running, input let go — in that
        order (a stopped VM drops keys)."""
        async with self._lock:
            if self._migrating:
                status = (await self.m.query_migrate()).get("status")
                if status not in ("cancelled", "failed", "none", None):
                    await self.m.migrate_cancel()
                    for _ in range(200):
                        if (await self.m.query_migrate()).get("status") != "cancelling":
                            break
                        await asyncio.sleep(0.01)
                self._migrating = False
            if await self.m.status() != "running":
                await self.m.cont()
            if self._held and self.hold is not None:
                await self.hold(False)
                self._held = False

    async def release(self) -> None:
        await self._release()

    def report(self) -> dict[str, Any]:
        return {"rounds": [], "bytes_sent": self.info.get("bytes_sent", 0),
                "mem_bytes": self.req.mem_bytes, "qemu_polls": self.polls,
                "guest": {"kind": self.kind, "accel": self.m.accel, "kernel": self.kernel},
                **{k: v for k, v in self.info.items() if k != "bytes_sent"}}

    def _journal(self) -> str:
        return self.history().decode("ascii", errors="replace")
