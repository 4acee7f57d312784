"""The three migrations keeper runs, each one table of the core (keeper.migrate.sync)
whose actions are calls on narrow interfaces:

  CoMigration   Domain U and its Domain R together, S1..S7 (D-MORE)
  DomrMove      a Domain R alone (its IP, MAC and TCP sessions) — the same MM_R
  SoloMigration the conventional baseline: U alone; its servers end here with it (after
                the final copy: what they read meanwhile is lost), start there

What MM_U needs of a hypervisor is `GuestMigrator` (the simulated VMM implements it
in keeper.migrate.sim; QEMU in keeper.migrate.qemu); what MM_R needs of Domain R is
`DomainRMover` (keeper.migrate.domr). The plans know neither the host agent nor how a
page or a socket moves: they say what to call when, and check the trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from keeper.errors import KeeperError, MigrationError
from keeper.migrate.driver import ActionFn, drive
from keeper.migrate.peer import DeviceLinks, PeerClient
from keeper.migrate.sync import Action, Core, Outcome, Plan, Point, Step
from keeper.migrate.trace import Trace

SYNC_POINTS = tuple(p.value for p in Point)
Progress = Callable[[dict[str, Any]], None]


class GuestMigrator(Protocol):
    """MM_U's hypervisor, seen from the source agent (it reaches the target itself)."""

    kind: str  # "sim" | "qemu"

    async def create_incoming(self) -> None: ...  # target: an empty U waiting
    async def iterate(self) -> bool: ...  # one round; True: ready for the final stage
    async def stop(self) -> None: ...  # U stopped at a clean point (source)
    async def save_links(self) -> DeviceLinks: ...  # S4: U's device links, saved
    async def final_copy(self) -> None: ...  # what is left of U's state, to the target
    async def link(self, links: DeviceLinks | None) -> None: ...  # S6 on the target
    async def resume(self) -> None: ...  # U runs on the target
    async def unpause(self) -> None: ...  # rollback: U runs here again (idempotent)
    async def cancel_target(self) -> None: ...  # rollback: drop the target's U
    async def release(self) -> None: ...  # success: drop the source's U
    def partner_ready(self) -> None: ...  # S1 passed (or no partner): R's twin is ready
    def report(self) -> dict[str, Any]: ...  # rounds, bytes_sent, mem_bytes, downtime…


class DomainRMover(Protocol):
    """MM_R: a Domain R and its twin on the target."""

    async def prepare(self) -> None: ...  # target: the twin, link down, empty
    async def stop(self) -> None: ...  # quiesce, link down, dump (keeps the checkpoint)
    async def save_links(self) -> None: ...  # S4 (a QEMU guest's R is dumped only now)
    async def restore(self) -> None: ...  # target: sessions back, sockets in repair
    async def resume(self) -> None: ...  # target: link up, repair off, announce
    async def restart(self) -> None: ...  # rollback: link up here, serve again
    async def cancel_target(self) -> None: ...  # rollback: drop the twin
    async def commit(self) -> None: ...  # success: drop the source's copy silently
    def report(self) -> dict[str, Any]: ...


class Servers(Protocol):
    """The baseline's servers in Dom0 (SOLO): they do not move, and they serve the
    source guest until it is destroyed."""

    async def stop(self) -> None: ...  # the source domain is destroyed: they end with it
    async def start_on_target(self) -> None: ...


class _Run:
    """One plan's run: the core, its actions, the trace, and how it ended."""

    plan: Plan
    expected: tuple[str, ...]  # marks a good run passes, in order

    def __init__(self, trace: Trace, progress: Progress | None) -> None:
        self.trace = trace
        self.progress = progress or (lambda event: None)
        self.hooks: list[Callable[[Step], None]] = []  # see every Step (drills, tests)

    def actions(self) -> dict[Action, ActionFn]:
        raise NotImplementedError

    def _on_step(self, step: Step) -> None:
        for hook in self.hooks:
            hook(step)
        for mark in step.marks:
            self.progress({"phase": mark, "ms": round(self.trace.elapsed_ms(), 3)})

    async def _run(self, what: str) -> None:
        result = await drive(Core(self.plan), self.actions(), self.trace,
                             on_step=self._on_step)
        self.trace.info["outcome"] = result.outcome.value
        if result.outcome is Outcome.MIGRATED:
            return
        cause = result.errors[0] if result.errors else "unknown"
        if result.outcome is Outcome.ROLLED_BACK:
            more = f" (rollback: {'; '.join(result.errors[1:])})" if result.errors[1:] else ""
            raise MigrationError(f"{what} failed, it stays on {self.trace.source}: "
                                 f"{cause}{more}")
        raise MigrationError(f"{what} failed after the guest resumed on "
                             f"{self.trace.target}: {'; '.join(result.errors)}")

    def trace_ok(self) -> bool:
        names = self.trace.names()
        it = iter(names)
        return all(any(n == want for n in it) for want in self.expected)


async def _both(*calls: ActionFn) -> None:
    """Run every call even if one fails (rollback steps are independent); raise the
    errors together."""
    results = await asyncio.gather(*(c() for c in calls), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise KeeperError("; ".join(str(e) or type(e).__name__ for e in errors))


class CoMigration(_Run):
    plan = Plan.COMIGRATION
    expected = ("start", "S1", "S2", "R stopped", "S3", "U stopped", "S4", "S5", "S6",
                "S7", "U resumed", "R resumed", "source released")

    def __init__(self, name: str, source: str, target: str, peer: PeerClient,
                 guest: GuestMigrator, domr: DomainRMover, *,
                 progress: Progress | None = None) -> None:
        super().__init__(Trace("co-migration", name, source, target), progress)
        self.name, self.peer, self.guest, self.domr = name, peer, guest, domr
        self.links: DeviceLinks | None = None
        self.hooks.append(self._s1)

    def _s1(self, step: Step) -> None:
        if Point.S1.value in step.marks:
            self.guest.partner_ready()

    def actions(self) -> dict[Action, ActionFn]:
        g, r, a = self.guest, self.domr, Action
        return {
            a.CREATE_U: g.create_incoming, a.ITERATE: g.iterate, a.STOP_U: g.stop,
            a.SAVE_LINKS: self._save_links, a.FINAL_COPY: g.final_copy,
            a.LINK_U: lambda: g.link(self.links), a.RESUME_U: g.resume,
            a.PREPARE_R: r.prepare, a.ASSOCIATE: lambda: self.peer.associate(self.name),
            a.STOP_R: r.stop, a.RESTORE_R: r.restore, a.RESUME_R: r.resume,
            a.COMMIT: lambda: _both(r.commit, g.release),
            a.CANCEL_TARGET: lambda: _both(g.cancel_target, r.cancel_target),
            a.UNPAUSE_U: g.unpause, a.RESTART_R: r.restart,
        }

    async def _save_links(self) -> None:
        await self.domr.save_links()
        self.links = await self.guest.save_links()
        self.trace.info["evtchn_pairs"] = self.links.pairs
        if self.links.state:
            self.trace.info["links"] = self.links.state

    async def run(self) -> dict[str, Any]:
        await self._run(f"co-migration of {self.name} to {self.trace.target}")
        return self.summary()

    def summary(self) -> dict[str, Any]:
        t = self.trace
        out = t.as_dict()
        out.update(self.domr.report())
        out.update(self.guest.report())
        out.update(
            guest_kind=self.guest.kind,
            sync_points=[n for n in t.names() if n in SYNC_POINTS],
            trace_ok=self.trace_ok(),
            downtime_ms={"U": round(t.span("U stopped", "U resumed"), 3),
                         "R": round(t.span("R stopped", "R resumed"), 3)},
            total_ms=round(t.span("start", "R resumed"), 3),
        )
        return out


class DomrMove(_Run):
    plan = Plan.DOMR_MOVE
    expected = ("start", "prepared", "quiesced", "dumped", "resumed", "source_released")

    def __init__(self, name: str, source: str, target: str, domr: DomainRMover, *,
                 progress: Progress | None = None) -> None:
        super().__init__(Trace("domr", name, source, target), progress)
        self.name, self.domr = name, domr

    def actions(self) -> dict[Action, ActionFn]:
        r, a = self.domr, Action
        return {a.PREPARE_R: r.prepare, a.STOP_R: r.stop, a.RESTORE_R: r.restore,
                a.RESUME_R: r.resume, a.COMMIT: r.commit, a.CANCEL_TARGET: r.cancel_target,
                a.RESTART_R: r.restart}

    async def run(self) -> Trace:
        await self._run(f"moving Domain R {self.name} to {self.trace.target}")
        self.trace.info.update(self.domr.report())
        self.trace.info["pause_ms"] = round(self.trace.span("quiesced", "resumed"), 3)
        self.trace.info["trace_ok"] = self.trace_ok()
        return self.trace


class SoloMigration(_Run):
    """The conventional baseline the paper compares against: the guest's servers run
    in Dom0 (the host agent's namespace, the host's address) and do not move. Domain
    U migrates alone. As in Xen, the source's servers and backends keep running until
    the source domain is destroyed: through the stop-and-copy they go on reading the
    clients' input and writing it into the stopped guest's devices, and what they
    write after the final copy is lost (the paper's 1.4 keys per run). Fresh servers
    start on the target, which the clients must find and reconnect to once the
    source's close. The same protocol code serves both; only where it runs differs."""

    plan = Plan.SOLO
    expected = ("start", "U created on target", "U stopped", "final copy", "U resumed",
                "servers stopped", "servers started", "source released")

    def __init__(self, name: str, source: str, target: str, guest: GuestMigrator,
                 servers: Servers, *, progress: Progress | None = None) -> None:
        super().__init__(Trace("solo", name, source, target), progress)
        self.name, self.guest, self.servers = name, guest, servers

    def actions(self) -> dict[Action, ActionFn]:
        g, s, a = self.guest, self.servers, Action
        return {
            a.CREATE_U: g.create_incoming, a.ITERATE: g.iterate,
            a.STOP_SERVERS: s.stop, a.STOP_U: g.stop, a.FINAL_COPY: g.final_copy,
            a.LINK_U: lambda: g.link(None), a.RESUME_U: g.resume,
            a.START_SERVERS: s.start_on_target, a.COMMIT: g.release,
            a.CANCEL_TARGET: g.cancel_target, a.UNPAUSE_U: g.unpause,
        }

    async def run(self) -> dict[str, Any]:
        self.guest.partner_ready()  # nothing moves with the guest
        await self._run(f"migration of {self.name} to {self.trace.target}")
        t = self.trace
        out = t.as_dict()
        out.update(self.guest.report())
        out.update(guest_kind=self.guest.kind, sync_points=[], trace_ok=self.trace_ok(),
                   mode="baseline",
                   downtime_ms={"U": round(t.span("U stopped", "U resumed"), 3),
                                # the source's servers fed a stopped guest this long;
                                # what they read after the final copy was lost
                                "servers": round(t.span("U stopped", "servers stopped"), 3),
                                "after_final_copy": round(t.span("final copy",
                                                                 "servers stopped"), 3)},
                   total_ms=round(t.span("start", "servers started"), 3))
        return out
