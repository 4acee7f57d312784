"""The target half of a migration on this host: what the peer protocol's routes
(keeper.migrate.peer.routes) call. Each method checks the state it needs, passes
its failure drill, and does one step; cancels are idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from keeper.errors import BadRequest, KeeperError
from keeper.hostd import metrics
from keeper.migrate import pagestream
from keeper.migrate import peer as peer_protocol
from keeper.migrate.peer import DeviceLinks, IncomingGuest, PrepareDomr, SoloLinks, refused
from keeper.net import placement
from keeper.qemu.machine import TcpConsoles

if TYPE_CHECKING:
    from keeper.hostd.agent import HostAgent

log = logging.getLogger("keeper.hostd")
WATCH_PERIOD = 1.0  # s: how often a target holding an unsettled pair asks its source


class AgentTarget:
    """Implements keeper.migrate.peer.Target for a host agent."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        # guests resumed here by a migration whose Domain R has not settled yet: a
        # rollback may still discard them (their run is invisible until R serves)
        self.provisional: set[str] = set()
        self.fenced: dict[str, int] = {}  # Domain R name -> the epoch refused here
        # restored pairs not settled yet: name -> (source host, when prepared here)
        self.watching: dict[str, tuple[str, float]] = {}
        self._watches: set[asyncio.Task[None]] = set()

    async def release(self, name: str) -> dict[str, Any]:
        """(as a source) The target took over the pair this agent left undecided
        (it serves there, confirmed): drop the copies kept here, silently (R's
        sockets are in repair mode, its link down). Refused for any other state."""
        a = self.agent
        if a.outgoing.get(name) != "failed_after_resume":
            raise KeeperError(f"{name}: nothing left undecided here "
                              f"({a.outgoing.get(name, 'unknown')})")
        r = a.domrs.get(name)
        if r is not None:
            with contextlib.suppress(KeeperError):
                await r.control.call("POST", "/commit", timeout=10)
            await a.forget_domr(name)
        await a.guests.destroy(name)
        await a.qemu.destroy(name)
        a.outgoing[name] = "released"
        return {"released": name}

    async def migration(self, name: str) -> dict[str, Any]:
        """(as a source) Whether this agent drives `name`'s move, or how it ended;
        `started` lets a target tell a restarted agent (which knows nothing of it)."""
        return {"state": self.agent.outgoing.get(name, "unknown"),
                "started": self.agent.started}

    def identity(self) -> dict[str, Any]:
        return {"host": self.agent.host.name, "mgmt_ip": self.agent.host.mgmt_ip}

    # -- Domain U ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lock(self, name: str, only: str = "") -> AsyncIterator[None]:
        """Making and cancelling a half-made domain are serialised: a cancel that
        overtakes its create (the source gave up mid-call) waits for it, then
        removes what it made. Each create takes only its own domain's lock (`only`
        "u" or "r"), so that the twin Domain R and the incoming U are made at once;
        everything else takes both (U's first), so that resuming, settling and
        cancelling the pair stay ordered against each other."""
        async with contextlib.AsyncExitStack() as stack:
            for kind in ("u", "r"):
                if only in ("", kind):
                    await stack.enter_async_context(self.agent.lock(f"incoming-{kind}:{name}"))
            yield

    async def incoming_guest(self, req: IncomingGuest) -> dict[str, Any]:
        async with self._lock(req.name, only="u"):
            return await self._incoming_guest(req)

    async def _incoming_guest(self, req: IncomingGuest) -> dict[str, Any]:
        a = self.agent
        placement.check_name(req.name)
        a.drills.check("incoming")
        if req.kind == "qemu":
            accel = req.options.get("accel")
            q = await a.qemu.incoming(req.name, req.mem_bytes >> 20,
                                      accel=accel if isinstance(accel, str) else None,
                                      baseline=self._baseline_consoles(req))
            return {"uri": q.migrate_uri}
        if req.kind != "sim":
            raise BadRequest(f"no guest kind {req.kind!r} (sim, qemu)")
        stale = a.guests.entries.get(req.name)
        if stale is not None and stale.state == "incoming":
            await a.guests.destroy(req.name)  # from an earlier, failed migration
        entry = a.guests.create_domain(req.name, req.mem_bytes,
                                       event_delay_ms=req.event_delay_ms,
                                       dirty_rate=req.dirty_rate, state="incoming")
        try:
            await a.guests.start_process(entry, resume=True)  # waits for `go`
        except BaseException:
            await a.guests.destroy(req.name)
            raise
        entry.state = "incoming"
        return {"domid": entry.u.domid}

    def _baseline_consoles(self, req: IncomingGuest) -> TcpConsoles | None:
        """The baseline's QEMU consoles, on this host's address: options.baseline is
        {"vnc_display": int, "serial_port": int} (or absent: Domain R's Unix sockets)."""
        b = req.options.get("baseline")
        if b is None:
            return None
        if not isinstance(b, dict):
            raise BadRequest("options.baseline must be an object")
        display, port = b.get("vnc_display"), b.get("serial_port")
        if not isinstance(display, int) or isinstance(display, bool) or not 0 <= display < 100:
            raise BadRequest("options.baseline.vnc_display must be an integer 0..99")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise BadRequest("options.baseline.serial_port must be a TCP port")
        return TcpConsoles(host=self.agent.host.mgmt_ip, vnc_display=display, serial_port=port)

    async def apply_pages(self, name: str,
                          read: Callable[[int], Awaitable[bytes]]) -> dict[str, Any]:
        entry = self.agent.guests.get(name)
        if entry.state != "incoming":
            raise KeeperError(f"guest {entry.name} is {entry.state}, not incoming")
        self.agent.drills.check("pages")
        assert entry.u.mem is not None
        written, nbytes = await pagestream.apply(read, memoryview(entry.u.mem), entry.u.pages)
        metrics.PAGES_RECEIVED.inc(written)
        return {"pages": written, "bytes": nbytes}

    async def associate(self, name: str) -> dict[str, Any]:
        a = self.agent
        q = a.qemu.entries.get(name)
        a.drills.check("associate", guest_pid=q.machine.pid if q is not None else None)
        r = a.domr(name)
        if r.devices is not None:  # a QEMU guest's twin may now open that guest's sockets
            a.qemu.get(name)
            r.devices.associate(name)
            return {"guest": name}
        if r.r_domid is None:
            raise KeeperError(f"Domain R {name} serves no guest")
        a.hv.associate(r.r_domid, a.guests.get(name).u.domid)
        return {"r": r.r_domid}

    async def restore_links(self, name: str, links: DeviceLinks) -> dict[str, Any]:
        a = self.agent
        if name in a.qemu.entries:
            # S6 for QEMU: the device sockets are up since QEMU started; what travels
            # is the journal so far, so the union stays in migration order
            q = a.qemu.get(name)
            a.drills.check("evtchns", guest_pid=q.machine.pid)
            journal = links.state.get("journal", "")
            if not isinstance(journal, str):
                raise BadRequest("links.state.journal must be a string")
            q.history = journal.encode("ascii", errors="replace")
            q.links_ready = True
            return {"journal_bytes": len(q.history)}
        entry = a.guests.get(name)
        a.drills.check("evtchns")
        r = a.domr(name)
        if r.r_domid is None:
            raise KeeperError(f"Domain R {name} serves no guest")
        pairs = [(int(p[0]), int(p[1])) for p in links.pairs]
        a.hv.restore_evtchns(r.r_domid, entry.u.domid, pairs)  # S6
        entry.evtchns_ready = True
        return {"pairs": pairs}

    async def solo_links(self, name: str, links: SoloLinks) -> dict[str, Any]:
        """The baseline: U's ports come back unbound (offered to Dom0), and the
        toolstack re-creates U's XenStore entries so fresh backends can find it."""
        a = self.agent
        entry = a.guests.get(name)
        for port in links.unbound:
            a.hv.evtchn.alloc_unbound(entry.u.domid, 0, port=int(port))
        for rel, value in links.xenstore.items():
            a.hv.xs_write(0, f"/local/domain/{entry.u.domid}/{rel}", value)
        entry.evtchns_ready = True
        return {"ports": links.unbound}

    async def resume_guest(self, name: str) -> dict[str, Any]:
        async with self._lock(name):  # ordered against a cancel that discards it
            return await self._resume_guest(name)

    async def _resume_guest(self, name: str) -> dict[str, Any]:
        if name in self.agent.qemu.entries:
            return await self._resume_qemu(name)
        entry = self.agent.guests.get(name)
        if not entry.evtchns_ready:  # S6: never before the channels are back
            raise KeeperError(f"guest {entry.name}: event channels not re-established")
        self.agent.drills.check("guest_resume")
        self.provisional.add(name)  # before it runs: a cancel from here on removes it
        await self.agent.guests.go(entry)
        self.agent.drills.check("guest_resumed")  # U runs here; the answer not yet sent
        return {"resumed": entry.name}

    async def _resume_qemu(self, name: str) -> dict[str, Any]:
        q = self.agent.qemu.get(name)
        if not q.links_ready:  # S6: never before the device links are re-made
            raise KeeperError(f"guest {name}: device links not re-established")
        self.agent.drills.check("guest_resume", guest_pid=q.machine.pid)
        # the incoming side has all of the VM once the source saw `completed`
        for _ in range(500):
            if await q.machine.status() != "inmigrate":
                break
            await asyncio.sleep(0.01)
        if q.baseline is None:  # Domain R's link is there before the VM runs
            await q.wait_console_client()
        # (the baseline's clients find this host only after the source QEMU is gone)
        self.provisional.add(name)
        await q.machine.cont()
        q.state = "running"
        self.agent.drills.check("guest_resumed", guest_pid=q.machine.pid)
        return {"resumed": name, "status": await q.machine.status()}

    async def cancel_guest(self, name: str) -> dict[str, Any]:
        async with self._lock(name):
            # a guest that already ran here is removed too while its migration has
            # not settled: nothing of its run left this host (R never served it)
            provisional = name in self.provisional
            self.provisional.discard(name)
            entry = self.agent.guests.entries.get(name)
            if entry is not None and (entry.state == "incoming" or provisional):
                await self.agent.guests.destroy(name)
            q = self.agent.qemu.entries.get(name)
            if q is not None and (q.state == "incoming" or provisional):
                await self.agent.qemu.destroy(name)
        return {"cancelled": name}

    async def baseline_server(self, name: str) -> dict[str, Any]:
        entry = await self.agent.start_baseline_servers(name)
        return {"ip": entry.ip}

    # -- Domain R ------------------------------------------------------------------------

    async def prepare_domr(self, req: PrepareDomr) -> dict[str, Any]:
        async with self._lock(req.name, only="r"):
            return await self._prepare_domr(req)

    async def _prepare_domr(self, req: PrepareDomr) -> dict[str, Any]:
        a = self.agent
        placement.check_name(req.name)
        a.parse_schedule(req.announce_schedule)
        a.drills.check("prepare")
        stale = a.domrs.get(req.name)
        if stale is not None and stale.state == "incoming":
            await a.stop_domr(req.name)  # a leftover from an earlier, failed move
        await a.start_domr(req.name, req.ip, req.mac, restore=True, announce=req.announce,
                           announce_schedule=req.announce_schedule, guest=req.guest,
                           kind=req.kind)
        if req.source:
            self.watching[req.name] = (req.source, time.time())
        return {"ready": req.name}

    async def restore_domr(self, name: str, checkpoint: bytes,
                           epoch: int = 0) -> dict[str, Any]:
        a = self.agent
        entry = a.domr(name)
        if entry.state != "incoming":
            raise KeeperError(f"Domain R {entry.name} is {entry.state}, not incoming")
        if self.fenced.get(name, -1) >= epoch:  # a replayed, older checkpoint
            raise KeeperError(f"Domain R {name}: epoch {epoch} was fenced here")
        a.drills.check("restore")
        checkpoint = a.drills.damaged(checkpoint)
        t0 = time.monotonic()
        restored = await entry.control.call("POST", "/restore", data=checkpoint)
        a.drills.check("restored")
        entry.state = "restored"
        entry.epoch = epoch
        if name in self.watching:  # this host now holds all of the pair: watch its source
            task = asyncio.create_task(self._watch(name), name=f"watch-{name}")
            self._watches.add(task)
            task.add_done_callback(self._watches.discard)
        return {"sessions": restored["sessions"], "restore_ms": restored["restore_ms"],
                "restore_call_ms": (time.monotonic() - t0) * 1e3, "epoch": epoch}

    async def resume_domr(self, name: str) -> dict[str, Any]:
        """R leaves repair mode here. Under the guest's lock, so that `settle_domr`
        sees it either not started or finished (its compare-and-set)."""
        a = self.agent
        async with self._lock(name):
            entry = a.domr(name)
            if entry.state != "restored":
                raise KeeperError(f"Domain R {entry.name} is {entry.state}, not restored")
            entry.state = "resuming"  # before the link goes up: settle fences it then
            pid = entry.proc.pid if entry.proc is not None else None
            t1 = time.monotonic()
            a.wire.watch(name, entry.ip)  # client retransmissions from here on
            await a.set_link(entry.name, up=True)  # the source's link is down already
            a.drills.check("link_up", domr_pid=pid)
            t2 = time.monotonic()
            drill = "&".join(f"{q}=1" for point, q in (("resume_prepare", "fail_prepare_after"),
                                                        ("resume_midway", "fail_after"))
                             if a.drills.armed.pop(point, None) == "fail")
            try:
                done = await entry.control.call("POST", "/resume?" + drill if drill
                                                else "/resume")
            except BaseException:
                # R refused before any socket left repair mode (or its answer was
                # lost): off the wire at once, so that whatever it does next reaches
                # no client; the source's settle then fences it and rolls back
                with contextlib.suppress(Exception):
                    await a.set_link(entry.name, up=False)
                raise
            entry.state = "running"
            a.wire.resumed(name)
            failed = list(done.get("failed", []))
            for why in failed:  # past the point of no return: R serves the others
                log.error("Domain R %s resumed without %s", name, why)
            a.drills.check("resumed", domr_pid=pid)  # serving; the answer not yet sent
            return {"link_up_ms": (t2 - t1) * 1e3,
                    "resume_ms": (time.monotonic() - t2) * 1e3, "failed": failed}

    async def settle_domr(self, name: str) -> dict[str, Any]:
        """The peer route (the source asks); see `_settle_domr`."""
        self.agent.drills.check("settle")
        return await self._settle_domr(name)

    async def _settle_domr(self, name: str) -> dict[str, Any]:
        """The arbitration of the window (docs/design.md): after RESUME_R, whatever
        its answer was, the source asks this once. A Domain R that serves here (it
        left repair mode and its process lives) is confirmed: it and its guest are
        this host's now, R outlives this agent from here on. Anything else of that
        name is fenced: link down, process stopped, its epoch refused from then on,
        so the source may safely serve again with its own copy. Idempotent; the
        lock orders it against a resume still running."""
        a = self.agent
        async with self._lock(name):
            entry = a.domrs.get(name)
            if entry is not None and entry.state == "running" and entry.proc is not None \
                    and entry.proc.poll() is None:
                await entry.control.call("POST", "/confirm", timeout=10)
                self.provisional.discard(name)
                self.watching.pop(name, None)
                return {"state": "resumed", "epoch": entry.epoch}
            epoch = entry.epoch if entry is not None else -1
            if entry is not None and entry.state in ("incoming", "restored", "resuming",
                                                     "running"):
                await self._fence(name, epoch)
            return {"state": "fenced", "epoch": epoch}

    async def _fence(self, name: str, epoch: int) -> None:
        self.watching.pop(name, None)
        self.fenced[name] = max(epoch, self.fenced.get(name, -1))
        await self.agent.set_link(name, up=False)
        await self.agent.stop_domr(name)

    async def _watch(self, name: str) -> None:
        """While this host holds a restored pair whose move has not settled, ask the
        source now and then. If its agent is gone (connection refused) or is a new
        one (started after the prepare: the old one died, and the source's U and
        unconfirmed state with it), nothing can restart the source's copy, so this
        host takes the pair over: U runs, R leaves repair mode, and is confirmed.
        A silent source (a partition, or slow) is waited for, never guessed about;
        a source that rolled back without reaching us has its leftovers removed."""
        while name in self.watching:
            await asyncio.sleep(WATCH_PERIOD)
            if name not in self.watching:
                return
            source, since = self.watching[name]
            try:
                doc = await self.agent.peer(source).migration(name)
            except KeeperError as exc:
                if not refused(exc):
                    continue
                doc = {"state": "gone", "started": 0.0}
            state = doc.get("state")
            if state == "driving" and float(doc.get("started", 0.0)) <= since:
                continue
            if state == "rolled_back" and float(doc.get("started", 0.0)) <= since:
                log.warning("the source %s rolled back %s: removing what is left here",
                            source, name)
                with contextlib.suppress(KeeperError):
                    await self.cancel_guest(name)
                with contextlib.suppress(KeeperError):
                    await self.cancel_domr(name)
                return
            restarted = float(doc.get("started", 0.0)) > since
            log.warning("the source %s of %s is %s: taking the pair over", source, name,
                        "a new agent" if restarted else state)
            try:
                await self._take_over(name, source if state == "failed_after_resume" else "")
            except KeeperError as exc:
                log.error("could not take %s over: %s", name, exc)
            return

    async def _take_over(self, name: str, release: str) -> None:
        """U runs here, R resumes and is confirmed; then `release` (a source that left
        the move undecided and still holds its copies) is told to drop them."""
        a = self.agent
        g = a.guests.entries.get(name)
        q = a.qemu.entries.get(name)
        if (g is not None and g.state == "incoming") or (q is not None and q.state == "incoming"):
            await self.resume_guest(name)
        entry = a.domrs.get(name)
        if entry is not None and entry.state == "restored":
            await self.resume_domr(name)
        verdict = await self._settle_domr(name)
        log.warning("took %s over: %s", name, verdict["state"])
        if release and verdict["state"] == "resumed":  # its copies are garbage now
            with contextlib.suppress(KeeperError):
                await a.peer(release).release(name)

    async def cancel_domr(self, name: str) -> dict[str, Any]:
        a = self.agent
        async with self._lock(name):
            entry = a.domrs.get(name)
            if entry is not None and entry.state in ("incoming", "restored", "resuming"):
                await self._fence(name, entry.epoch)
            a.wire.forget(name)
        return {"cancelled": name}

    async def wire_domr(self, name: str, seeds: peer_protocol.WireSeeds) -> dict[str, Any]:
        """Client retransmissions seen here after the resume (keeper.hostd.clientwire),
        once the window closed, judged with what the source saw of each flow."""
        highs = {}
        for flow, high in seeds.highs.items():
            if not isinstance(high, int) or isinstance(high, bool) or not 0 <= high < 1 << 32:
                raise BadRequest(f"highs[{flow!r}] must be a TCP sequence number")
            highs[str(flow)[:64]] = high
        return await self.agent.wire.result(name, highs)
