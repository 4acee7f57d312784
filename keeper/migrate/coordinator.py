"""Co-migration of a guest pair (Domain U + its Domain R) from this host to another.

Two migration managers run side by side and meet at the paper's seven
synchronisation points (§4.5, DESIGN.md §4). Each point is a named barrier with a
timeout and leaves a timestamped mark in the trace:

  MM_U (Domain U's memory)                    MM_R (Domain R)
  create the empty U on the target            prepare the empty R on the target
                                          S1  wait for U on the target; register U
                                              as R's managed domain there
  pre-copy rounds (log-dirty [+ may-write])
  S2  both ready: enter the final stage       S2
                                              stop R: quiesce, link down, dump
  S3  wait until R has stopped; pause U
                                          S4  wait until U has stopped; save the
                                              event-channel port pairs
  S5  wait until they are saved; final copy
      (dirty + may-write pages, vCPU state)
      on the target: re-establish the event
  S6  channels with the same ports (U may
      not resume before)
                                          S7  wait until all of U's memory is on
                                              the target; re-map there exactly the
                                              pages R had mapped, restore R's sockets
  resume U on the target                      resume R (link up, ARP, serve)

Until U resumes on the target, any failure rolls everything back: the target's
half-made pair is removed, R's link comes back up here, R leaves repair mode and U
is unpaused. Nothing typed is lost: what R had read stays in its session state, and
what it wrote into the ring is still in U's memory here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from keeper.errors import KeeperError, MigrationError
from keeper.migrate import pagestream
from keeper.migrate.trace import Trace

if TYPE_CHECKING:
    from keeper.hostd.agent import HostAgent

log = logging.getLogger("keeper.coordinator")

SYNC_POINTS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7")
BARRIER_TIMEOUT = 60.0
ROUND_PAUSE = 0.02  # between converged rounds while the other manager is not ready yet


@dataclass
class Policy:
    """When pre-copy stops: few dirty pages left, or too many rounds, or too much sent."""

    max_rounds: int = 30
    min_dirty_pages: int = 64
    max_sent_factor: float = 3.0


@dataclass
class Barriers:
    """Named one-shot events with timeouts; every pass is marked in the trace."""

    trace: Trace
    timeout: float = BARRIER_TIMEOUT
    events: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def set(self, name: str) -> None:
        self.event(name).set()

    async def wait(self, name: str, what: str) -> None:
        try:
            await asyncio.wait_for(self.event(name).wait(), self.timeout)
        except TimeoutError:
            raise MigrationError(
                f"timed out after {self.timeout:.0f} s waiting for {what}") from None

    def mark(self, point: str) -> None:
        self.trace.mark(point)


Progress = Callable[[dict[str, Any]], None]


class CoMigration:
    def __init__(self, agent: HostAgent, name: str, target: str, *,
                 policy: Policy | None = None, progress: Progress | None = None) -> None:
        self.agent, self.name, self.target = agent, name, target
        self.peer = agent.peer(target)
        self.guest = agent.guests.get(name)
        self.domr = agent.domr(name)
        self.policy = policy or Policy()
        self.trace = Trace("co-migration", name, agent.host.name, target)
        self.sync = Barriers(self.trace)
        self.progress = progress or (lambda event: None)
        self.rounds: list[dict[str, Any]] = []
        self.u_paused = self.r_quiesced = self.r_dumped = False
        self.checkpoint = b""
        self.evtchn_pairs: list[tuple[int, int]] = []
        self.bytes_sent = 0

    def _say(self, phase: str, **info: Any) -> None:
        self.progress({"phase": phase, "ms": round((time.monotonic() - self.trace._t0) * 1e3, 3),
                       **info})

    # -- the whole thing ---------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.guest.state = self.domr.state = "moving"
        self.trace.mark("start")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.mm_u(), name="MM_U")
                tg.create_task(self.mm_r(), name="MM_R")
        except BaseException as group:
            exc = _first(group)
            self._say("rolling back", error=str(exc))
            await self.roll_back()
            self.trace.mark("rolled_back")
            if not isinstance(group, Exception):
                raise
            raise MigrationError(f"co-migration of {self.name} to {self.target} failed, it "
                                 f"stays on {self.agent.host.name}: {exc}") from exc
        await self.commit()
        return self.summary()

    # -- MM_U ----------------------------------------------------------------------------

    async def mm_u(self) -> None:
        g, hv, s = self.guest, self.agent.hv, self.sync
        await self.peer.call("POST", f"/peer/guest/{self.name}/incoming", json=g.spec())
        self.trace.mark("U created on target")
        s.set("U created")
        # pre-copy: round 1 sends every page, later rounds what was dirtied meanwhile
        await self._precopy(other="R ready for final")
        s.set("U ready for final")
        await s.wait("R ready for final", "MM_R to be ready for the final stage (S2)")
        s.mark("S2")
        self._say("final stage")
        await s.wait("R stopped", "Domain R to stop (S3)")
        s.mark("S3")
        await self.agent.guests.pause(g)
        self.u_paused = True
        self.trace.mark("U stopped")
        s.set("U stopped")
        await s.wait("evtchns saved", "the event channels to be saved (S5)")
        s.mark("S5")
        pfns = hv.collect_dirty(g.u.domid)  # ORed with may-write when the extension is on
        await self._send_pages(pfns, len(self.rounds) + 1, final=True)
        await self.peer.call("POST", f"/peer/guest/{self.name}/evtchns",
                             json={"pairs": self.evtchn_pairs})
        s.mark("S6")  # the target re-established them; it will not resume U before
        s.set("U memory restored")
        await s.wait("R restored", "Domain R to be restored on the target")
        await self.peer.call("POST", f"/peer/guest/{self.name}/resume")
        self.trace.mark("U resumed")
        s.set("U resumed")

    async def _precopy(self, other: str | None) -> None:
        """Pre-copy rounds: every page first, then what the guest dirtied meanwhile,
        until few dirty pages remain (or too many rounds, or too much sent). With
        `other` (S2), converged rounds go on until that barrier is set as well."""
        g, hv, s = self.guest, self.agent.hv, self.sync
        hv.mark_all_dirty(g.u.domid)
        sent_pages, rnd = 0, 0
        while True:
            rnd += 1
            pfns = hv.collect_dirty(g.u.domid)
            await self._send_pages(pfns, rnd)
            sent_pages += len(pfns)
            pending = int(np.count_nonzero(g.u.dirty_view()))
            self._say("pre-copy", round=rnd, pages=len(pfns), dirty_now=pending)
            converged = pending <= self.policy.min_dirty_pages
            if not converged and (rnd >= self.policy.max_rounds or sent_pages >= (
                    self.policy.max_sent_factor * g.u.pages)):
                return  # not converging: stop here
            if converged:
                if other is None:
                    return
                s.set("U ready for final")
                if s.event(other).is_set():
                    return
                # S2: keep iterating until both are ready, so the final copy stays small
                await asyncio.sleep(ROUND_PAUSE)

    async def _send_pages(self, pfns: np.ndarray, rnd: int, *, final: bool = False) -> None:
        mem = memoryview(self.guest.u.mem)  # type: ignore[arg-type]
        counted = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal counted
            for chunk in pagestream.encode(mem, pfns):
                counted += len(chunk)
                yield chunk
                await asyncio.sleep(0)  # keep the agent responsive during big rounds

        t0 = time.monotonic()
        await self.peer.call("POST", f"/peer/guest/{self.name}/pages", data=body(),
                             timeout=600)
        self.bytes_sent += counted
        self.rounds.append({"round": rnd, "pages": len(pfns), "bytes": counted,
                            "ms": round((time.monotonic() - t0) * 1e3, 3), "final": final})

    # -- MM_R ----------------------------------------------------------------------------

    async def mm_r(self) -> None:
        r, s, agent = self.domr, self.sync, self.agent
        await self.peer.call("POST", "/peer/domr/prepare", json={
            "name": self.name, "ip": r.ip, "mac": r.mac, "announce": r.announce,
            "announce_schedule": r.announce_schedule, "guest": True})
        self.trace.mark("R created on target")
        await s.wait("U created", "Domain U to exist on the target (S1)")
        await self.peer.call("POST", f"/peer/guest/{self.name}/associate")
        s.mark("S1")
        s.set("R ready for final")
        await s.wait("U ready for final", "MM_U to be ready for the final stage (S2)")
        await r.control.call("POST", "/quiesce")
        self.r_quiesced = True
        self.trace.mark("R stopped")
        await agent.set_link(self.name, up=False)
        blob, headers = await r.control.request("POST", "/checkpoint")
        self.r_dumped = True
        self.checkpoint = blob
        self.trace.info.update(sessions=int(headers.get("X-Keeper-Sessions", "0")),
                               checkpoint_bytes=len(blob),
                               queued_in=int(headers.get("X-Keeper-Queued-In", "0")),
                               queued_out=int(headers.get("X-Keeper-Queued-Out", "0")))
        s.set("R stopped")
        await s.wait("U stopped", "Domain U to stop (S4)")
        s.mark("S4")
        assert r.r_domid is not None
        self.evtchn_pairs = agent.hv.save_evtchns(r.r_domid, self.guest.u.domid)
        self.trace.info["evtchn_pairs"] = self.evtchn_pairs
        s.set("evtchns saved")
        await s.wait("U memory restored", "Domain U's memory on the target (S7)")
        s.mark("S7")
        restored = await self.peer.call("POST", f"/peer/domr/{self.name}/restore", data=blob,
                                        timeout=60)
        self.trace.info["restore"] = restored
        s.set("R restored")
        await s.wait("U resumed", "Domain U to resume on the target")
        await self.peer.call("POST", f"/peer/domr/{self.name}/resume")
        self.trace.mark("R resumed")

    # -- endings -------------------------------------------------------------------------

    async def roll_back(self) -> None:
        """Before U resumed on the target: undo there, carry on here."""
        for path in (f"/peer/guest/{self.name}/cancel", f"/peer/domr/{self.name}/cancel"):
            try:
                await self.peer.call("POST", path, timeout=10)
            except KeeperError as exc:
                log.warning("rollback: %s: %s", path, exc)
        r = self.domr
        if self.r_quiesced:
            await self.agent.set_link(self.name, up=True)
            await r.control.call("POST", "/abort")
        if self.u_paused:
            await self.agent.guests.unpause(self.guest)
        self.guest.state = r.state = "running"

    async def commit(self) -> None:
        """U and R run on the target: drop our copies (R silently, in repair mode)."""
        try:
            await self.domr.control.call("POST", "/commit")
        except KeeperError as exc:
            log.warning("commit on source %s: %s", self.name, exc)
        await self.agent.forget_domr(self.name)
        await self.agent.guests.destroy(self.name)
        self.trace.mark("source released")

    def summary(self) -> dict[str, Any]:
        t = self.trace
        points = [n for n, _ in t.marks if n in SYNC_POINTS]
        out = t.as_dict()
        out.update(
            rounds=self.rounds,
            bytes_sent=self.bytes_sent,
            sync_points=points,
            trace_ok=points == list(SYNC_POINTS),
            downtime_ms={"U": round(t.span("U stopped", "U resumed"), 3),
                         "R": round(t.span("R stopped", "R resumed"), 3)},
            total_ms=round(t.span("start", "R resumed"), 3),
            mem_bytes=self.guest.u.pages * 4096,
        )
        return out


def _first(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class SoloMigration(CoMigration):
    """The conventional baseline the paper compares against: the guest's servers run
    in Dom0 (the host agent's namespace, the host's address) and do not move. Domain
    U migrates alone; its servers on the source are stopped (clients are cut off),
    and fresh ones start on the target, which the clients must find and reconnect to.
    The same protocol code serves both; only where it runs differs."""

    async def run(self) -> dict[str, Any]:
        g, hv, agent = self.guest, self.agent.hv, self.agent
        self.guest.state = self.domr.state = "moving"
        self.trace.mark("start")
        servers_stopped = False
        try:
            await self.peer.call("POST", f"/peer/guest/{self.name}/incoming", json=g.spec())
            self.trace.mark("U created on target")
            await self._precopy(other=None)
            await agent.stop_domr(self.name)  # the sessions end here
            servers_stopped = True
            self.trace.mark("servers stopped")
            await agent.guests.pause(g)
            self.u_paused = True
            self.trace.mark("U stopped")
            await self._send_pages(hv.collect_dirty(g.u.domid), len(self.rounds) + 1,
                                   final=True)
            prefix = f"/local/domain/{g.u.domid}/"
            xs = {k[len(prefix):]: v for k, v in hv.xenstore.subtree(prefix[:-1]).items()
                  if "/device/" in k or "/console/" in k}
            await self.peer.call("POST", f"/peer/guest/{self.name}/solo-evtchns",
                                 json={"unbound": hv.ports_of(g.u.domid), "xenstore": xs})
            await self.peer.call("POST", f"/peer/guest/{self.name}/resume")
            self.trace.mark("U resumed")
        except BaseException as exc:
            try:
                await self.peer.call("POST", f"/peer/guest/{self.name}/cancel", timeout=10)
            except KeeperError as cancel:
                log.warning("rollback: cancel: %s", cancel)
            if self.u_paused:
                await agent.guests.unpause(g)
            if servers_stopped:  # the guest stays: so do its servers, freshly started
                try:
                    await agent.start_domr(self.name, agent.host.mgmt_ip,
                                           "00:00:00:00:00:00", restore=False, guest=True,
                                           baseline=True)
                except KeeperError as again:
                    log.error("rollback: servers did not come back: %s", again)
            g.state = "running"
            if not isinstance(exc, Exception):
                raise
            raise MigrationError(f"migration of {self.name} to {self.target} failed, it "
                                 f"stays on {agent.host.name}: {exc}") from exc
        # The guest runs on the target: start its servers there; drop it here.
        await self.peer.call("POST", f"/peer/guest/{self.name}/baseline-server")
        self.trace.mark("servers started")
        await agent.guests.destroy(self.name)
        self.trace.mark("source released")
        t = self.trace
        out = t.as_dict()
        out.update(rounds=self.rounds, bytes_sent=self.bytes_sent, sync_points=[],
                   trace_ok=True, mode="baseline",
                   downtime_ms={"U": round(t.span("U stopped", "U resumed"), 3),
                                "servers": round(t.span("servers stopped",
                                                        "servers started"), 3)},
                   total_ms=round(t.span("start", "servers started"), 3),
                   mem_bytes=g.u.pages * 4096)
        return out
