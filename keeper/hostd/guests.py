"""Guests on a host: Domain U (memory, guest process) and its Domain R, as the agent
sees them. The co-migration itself is keeper.migrate (plans, sim); this module holds
the per-host pieces it drives: create, pause/resume, incoming memory, S6 on the
target, and the guest process lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from keeper.aio import uninterrupted
from keeper.domu.guestos import GuestOS
from keeper.domu.memory import GuestMemory
from keeper.errors import KeeperError, LabError
from keeper.hostd import procs
from keeper.vmm.hypercall import HypercallServer
from keeper.vmm.hypervisor import Domain, Hypervisor

log = logging.getLogger("keeper.hostd.guests")
CTL_TIMEOUT = 10.0


@dataclass
class GuestEntry:
    name: str
    u: Domain
    hc_u: HypercallServer
    event_delay_ms: float = 0.0
    dirty_rate: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    ctl: socket.socket | None = None
    state: str = "starting"  # starting | running | paused | incoming | moving
    evtchns_ready: bool = False  # target side: S6 done

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "mem_bytes": self.u.pages * 4096,
                "event_delay_ms": self.event_delay_ms, "dirty_rate": self.dirty_rate}


class Guests:
    def __init__(self, hv: Hypervisor, host: str, rundir: Path) -> None:
        self.hv, self.host, self.rundir = hv, host, rundir
        self.entries: dict[str, GuestEntry] = {}

    def get(self, name: str) -> GuestEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise LabError(f"no guest {name!r} on host {self.host}") from None

    def _hc_path(self, name: str, kind: str) -> str:
        return str(self.rundir / f"hc-{name}-{kind}-{self.host}.sock")

    def label(self, name: str) -> str:
        return f"domu-{name}-{self.host}"

    # -- lifecycle ------------------------------------------------------------------------

    def create_domain(self, name: str, mem_bytes: int, *, event_delay_ms: float = 0.0,
                      dirty_rate: float = 0.0, state: str = "starting") -> GuestEntry:
        if name in self.entries:
            raise LabError(f"guest {name} already exists on host {self.host}")
        u = self.hv.create_domain_u(name, mem_bytes)
        hc = HypercallServer(self.hv, u.domid, Path(self._hc_path(name, "u")))
        entry = GuestEntry(name, u, hc, event_delay_ms, dirty_rate, state=state)
        self.entries[name] = entry
        return entry

    async def start_process(self, entry: GuestEntry, *, resume: bool) -> None:
        """Run the guest process on this memory: boot it, or (resume) start it early on
        a migration target, where it waits for `go` before touching its memory."""
        parent, child = socket.socketpair()
        argv = ["domu", "run", "--name", entry.name, "--hypercall", str(entry.hc_u.path),
                "--mem-fd", str(entry.u.mem_fd), "--dirty-fd", str(entry.u.dirty_fd),
                "--ctl-fd", str(child.fileno()),
                "--event-delay-ms", str(entry.event_delay_ms),
                "--dirty-rate", str(entry.dirty_rate)]
        if resume:
            argv.append("--resume")
        try:
            entry.proc = procs.spawn(self.rundir, self.label(entry.name), argv,
                                     pass_fds=(entry.u.mem_fd, entry.u.dirty_fd, child.fileno()))
        finally:
            child.close()
        parent.setblocking(False)
        entry.ctl = parent
        if resume:
            await self._expect(entry, b"w", "start")
            return
        await self._expect(entry, b"u", "start")
        entry.state = "running"

    async def go(self, entry: GuestEntry) -> None:
        """The migrated memory is complete and S6 is done: let the guest run."""
        await self._command(entry, b"G", b"u", "resume")
        entry.state = "running"

    async def _expect(self, entry: GuestEntry, want: bytes, what: str) -> None:
        assert entry.ctl is not None
        loop = asyncio.get_running_loop()
        try:
            got = await asyncio.wait_for(loop.sock_recv(entry.ctl, 1), CTL_TIMEOUT)
        except TimeoutError:
            raise KeeperError(f"guest {entry.name}: no answer to {what} "
                              f"in {CTL_TIMEOUT:.0f} s") from None
        if got != want:
            raise KeeperError(f"guest {entry.name}: {what} failed (got {got!r}); see "
                              f"{self.rundir / (self.label(entry.name) + '.log')}")

    async def wait_console(self, entry: GuestEntry, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        path = f"/local/domain/{entry.u.domid}/console/port"
        while self.hv.xs_read(path) is None:
            if time.monotonic() > deadline:
                raise KeeperError(f"guest {entry.name} did not publish its console")
            await asyncio.sleep(0.02)

    async def _command(self, entry: GuestEntry, cmd: bytes, answer: bytes,
                       what: str) -> None:
        """One request and its answer, never cut in half (see aio.uninterrupted)."""
        assert entry.ctl is not None
        ctl = entry.ctl

        async def exchange() -> None:
            await asyncio.get_running_loop().sock_sendall(ctl, cmd)
            await self._expect(entry, answer, what)

        await uninterrupted(exchange())

    async def pause(self, entry: GuestEntry) -> None:
        """Stop the guest at a clean point; all its state is then in its memory."""
        await self._command(entry, b"P", b"p", "pause")
        entry.u.paused = True
        entry.state = "paused"

    async def unpause(self, entry: GuestEntry) -> None:
        await self._command(entry, b"R", b"r", "resume")
        entry.u.paused = False
        entry.state = "running"

    async def destroy(self, name: str) -> None:
        """Stop the guest process (if any) and free its domain. Idempotent."""
        entry = self.entries.pop(name, None)
        if entry is None:
            return
        if entry.ctl is not None:
            with contextlib.suppress(OSError):
                entry.ctl.send(b"Q")
        if entry.proc is not None:
            await procs.reap(entry.proc)
        if entry.ctl is not None:
            entry.ctl.close()
        procs.forget(self.rundir, self.label(name))
        entry.hc_u.close()
        self.hv.destroy(entry.u.domid)

    def _read_guest(self, name: str) -> GuestOS:
        """The guest OS as its memory holds it (read only: no dirty log attached)."""
        entry = self.get(name)
        assert entry.u.mem is not None
        return GuestOS.attach(GuestMemory(entry.u.mem, None))

    def screen(self, name: str) -> bytes:
        """The guest's framebuffer (BGRX, 800x600), read from its memory."""
        gos = self._read_guest(name)
        if gos.display is None:
            raise KeeperError(f"guest {name} has no display")
        return gos.display.pixels()

    def journal(self, name: str) -> dict[str, object]:
        gos = self._read_guest(name)
        return {"name": name, "host": self.host, "journal": gos.journal(),
                "count": gos.journal_count(), "info": gos.info()}

