"""QEMU guests on a host: a real Linux VM per guest, run by this agent (DESIGN.md §8).

Each guest is a `QemuMachine` (keeper.qemu.machine) with its QMP, serial console and
VNC server on Unix sockets in `<rundir>/qemu-<guest>-<host>/` (0600; QMP stays the
agent's), and its input journal on its second serial port, a file there. QEMU dies
with the agent (PR_SET_PDEATHSIG), so a crashed agent leaves no VM running behind a
Domain R that nobody drives. A baseline guest (`baseline`, the stock set-up) has no
Domain R: its serial console and VNC server listen on the host's address (TCP).

The journal of a guest that migrated is the union, in migration order, of every
QEMU process's file: the source hands what it has (`history`) to the target when
the VM has stopped there (S6), and the target reads history + its own file.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keeper.errors import KeeperError, LabError
from keeper.hostd import procs
from keeper.qemu import image as guest_image
from keeper.qemu import journal
from keeper.qemu.machine import QemuError, QemuMachine, TcpConsoles

log = logging.getLogger("keeper.hostd.qemu")
BOOT_TIMEOUT = 90.0  # TCG on a loaded 2-core machine: a few seconds usually


@dataclass
class QemuGuestEntry:
    name: str
    machine: QemuMachine
    mem_mb: int
    state: str = "starting"  # starting | running | incoming | moving
    release: str | None = None  # the kernel release the guest reported
    history: bytes = b""  # journal records of the QEMU processes before this one
    migrate_uri: str | None = None  # target side: where the stream comes in
    links_ready: bool = False  # target side: S6 done, `cont` allowed
    baseline: TcpConsoles | None = None  # the stock set-up: consoles on the host address
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def accel(self) -> str | None:
        return self.machine.accel

    def journal_bytes(self) -> bytes:
        try:
            own = self.machine.paths.journal.read_bytes()
        except (QemuError, FileNotFoundError):  # not started yet, or nothing written
            own = b""
        return self.history + own

    async def wait_console_client(self, timeout: float = 5.0) -> None:
        """Until QEMU has accepted a client on the serial console: QEMU drops what the
        guest writes while its chardev has no client, so `cont` waits for Domain R's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            chardevs = await self.machine.execute("query-chardev")
            serial = next((c for c in chardevs if c.get("label") == "serial0"), None)
            if serial is None or not str(serial.get("filename", "")).startswith("disconnected"):
                return
            if loop.time() > deadline:
                raise KeeperError(f"guest {self.name}: nobody on its serial console after "
                                  f"{timeout:.0f} s (Domain R's link)")
            await asyncio.sleep(0.005)

    def services(self) -> dict[str, int]:
        """The baseline's consoles: QEMU's own servers, on the host's address."""
        b = self.baseline
        return {} if b is None else {"console": b.serial_port, "vnc": b.vnc_port}

    def devices(self) -> dict[str, Path]:
        p = self.machine.paths
        return {k: v for k, v in (("serial", p.serial), ("vnc", p.vnc)) if v is not None}


class QemuGuests:
    def __init__(self, host: str, mgmt_ip: str, rundir: Path) -> None:
        self.host, self.mgmt_ip, self.rundir = host, mgmt_ip, rundir
        self.entries: dict[str, QemuGuestEntry] = {}
        self._image: guest_image.GuestImage | None = None

    def get(self, name: str) -> QemuGuestEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise LabError(f"no QEMU guest {name!r} on host {self.host}") from None

    def image(self) -> guest_image.GuestImage:
        if self._image is None:
            self._image = guest_image.load()
            if self._image is None:
                raise KeeperError("no QEMU guest image: run ./scripts/setup (it builds "
                                  f"one into {guest_image.default_cache()})")
        return self._image

    def label(self, name: str) -> str:
        return f"qemu-{name}-{self.host}"

    def _machine(self, name: str, mem_mb: int, *, incoming: bool, accel: str | None,
                 baseline: TcpConsoles | None) -> QemuMachine:
        return QemuMachine(self.image(), name=f"{name}-{self.host}",
                           run_dir=self.rundir / self.label(name), memory_mb=mem_mb,
                           accel=accel, incoming=incoming, tcp_consoles=baseline)

    async def _start(self, entry: QemuGuestEntry) -> None:
        await entry.machine.start()
        assert entry.machine.pid is not None
        procs.record(self.rundir, self.label(entry.name), entry.machine.pid)

    async def create(self, name: str, mem_mb: int, *,
                     baseline: TcpConsoles | None = None) -> QemuGuestEntry:
        """Boot a guest here; returns once its kernel reported in on the journal."""
        if name in self.entries:
            raise LabError(f"guest {name} already exists on host {self.host}")
        entry = QemuGuestEntry(name, self._machine(name, mem_mb, incoming=False, accel=None,
                                                   baseline=baseline), mem_mb,
                               baseline=baseline)
        self.entries[name] = entry
        try:
            await self._start(entry)
            entry.release = await entry.machine.wait_booted(BOOT_TIMEOUT)
        except BaseException:
            await self.destroy(name)
            raise
        entry.state = "running"
        return entry

    async def incoming(self, name: str, mem_mb: int, *, accel: str | None,
                       baseline: TcpConsoles | None = None) -> QemuGuestEntry:
        """A migration target: QEMU started `-incoming defer -S`, listening for the
        stream on the management address (a free port), capabilities set."""
        stale = self.entries.get(name)
        if stale is not None and stale.state == "incoming":
            await self.destroy(name)  # from an earlier, failed migration
        if name in self.entries:
            raise LabError(f"guest {name} already exists on host {self.host}")
        entry = QemuGuestEntry(name, self._machine(name, mem_mb, incoming=True, accel=accel,
                                                   baseline=baseline), mem_mb,
                               state="incoming", baseline=baseline)
        self.entries[name] = entry
        try:
            await self._start(entry)
            await entry.machine.set_capabilities()
            entry.migrate_uri = f"tcp:{self.mgmt_ip}:{_free_port(self.mgmt_ip)}"
            await entry.machine.migrate_incoming(entry.migrate_uri)
        except BaseException:
            await self.destroy(name)
            raise
        return entry

    async def destroy(self, name: str) -> None:
        """Stop the VM (if any) and forget it. Idempotent."""
        entry = self.entries.pop(name, None)
        if entry is None:
            return
        await entry.machine.close(keep_journal=False)
        procs.forget(self.rundir, self.label(name))

    def journal(self, name: str) -> dict[str, object]:
        entry = self.get(name)
        records = journal.parse(entry.journal_bytes())
        stream = journal.input_stream(records)
        return {"name": name, "host": self.host, "journal": stream, "count": len(stream),
                "info": {"kind": "qemu", "accel": entry.accel,
                         "kernel": journal.kernel_release(records) or entry.release,
                         "typed_text": journal.typed_text(records),
                         "serial": journal.serial_bytes(records).hex(),
                         "dropped": sum(isinstance(r, journal.Dropped) for r in records)}}

    async def screen(self, name: str) -> bytes:
        """The VM's screen as QEMU draws it (PPM, from QMP screendump)."""
        entry = self.get(name)
        path = entry.machine.paths.dir / "screen.ppm"
        await entry.machine.screendump(path)
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def status(self) -> list[dict[str, object]]:
        return [{"name": g.name, "kind": "qemu", "state": g.state, "accel": g.accel,
                 "kernel": g.release, "mem_bytes": g.mem_mb << 20, "pid": g.machine.pid,
                 "mode": "keeper" if g.baseline is None else "baseline"}
                for g in self.entries.values()]

    def servers(self) -> list[dict[str, object]]:
        """The baseline guests' servers here: QEMU's own VNC server and serial console
        on this host's address (there is no Domain R; `keeper lab status` lists them as
        the guest's domain). Each QEMU process has its own: a target's listen from its
        start, a source's until it exits."""
        return [{"name": g.name, "ip": g.baseline.host, "mac": None, "state": g.state,
                 "baseline": True, "kind": "qemu", "services": g.services(),
                 "pid": g.machine.pid}
                for g in self.entries.values() if g.baseline is not None]

    async def close(self) -> None:
        await asyncio.gather(*(self.destroy(n) for n in list(self.entries)))


def _free_port(ip: str) -> int:
    """A TCP port free on `ip` now (QEMU binds it a moment later; the lab's address
    is ours alone, so nobody takes it meanwhile)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])
