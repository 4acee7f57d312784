"""The Domain R session host: its services, their devices, and moving them.

Domain R serves a guest's console over raw TCP (keeper.console.service) and SSH
(keeper.ssh.host), and its keyboard and screen over VNC (keeper.vnc.server). Each is a
keeper.domr.services.Service; Domain R wires them to the device backends and drives
them all through the phases of a move.

Lifecycle seen by the host agent (see keeper.migrate.domr for the order it drives):

    serving --quiesce--> quiesced --checkpoint--> dumped --commit--> (exit)
       ^                    |                        |
       +------ abort -------+-------- abort ---------+
    (new process)  empty --restore--> restored --resume--> serving
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE_MS
from keeper.collector import collector_paused
from keeper.console.raw import RawSession
from keeper.console.service import EchoDevice, RawConsole, RawConsoleCheckpoint
from keeper.domr import checkpoint as ck
from keeper.domr.console import ConsoleBackend
from keeper.domr.display import DisplayBackend
from keeper.domr.services import ConsoleFed, Service
from keeper.errors import KeeperError
from keeper.qemu.chardev import ChardevConsole, ChardevState
from keeper.qemu.display import QemuDisplay, QemuDisplayState
from keeper.ssh.host import SshConfig, SshHost
from keeper.vnc.server import VncHost, VncHostCheckpoint
from keeper.web.service import WebHost, WebHostCheckpoint

log = logging.getLogger("keeper.domr")

# where each service's sessions appear in /status (callers read these names)
STATUS_KEYS = {"console": "sessions", "ssh": "ssh_sessions", "vnc": "vnc_sessions",
               "web": "web_sessions"}


class Phase(enum.Enum):
    EMPTY = "empty"  # a new process waiting for a checkpoint
    SERVING = "serving"
    QUIESCED = "quiesced"
    DUMPED = "dumped"
    RESTORED = "restored"
    CLOSED = "closed"


Device = EchoDevice | ConsoleBackend | ChardevConsole
Display = DisplayBackend | QemuDisplay
DRAIN_TIMEOUT = 5.0  # for QEMU to read what we sent it, the VM running


@dataclass(slots=True)
class MoveStats:
    """The last move, for the control API's headers. Counts the raw console's sessions."""

    sessions: int = 0
    bytes: int = 0
    queued_in: int = 0  # client bytes not yet handled (kernel + ours) at the dump
    queued_out: int = 0  # bytes for clients not yet acknowledged (kernel + ours)
    dump_ms: float = 0.0
    restore_ms: float = 0.0
    # per service: sessions moved, left behind, client input held across the switchover
    # (console: bytes; vnc: key presses); for the agent's metrics
    by_rms: dict[str, dict[str, float]] = field(default_factory=dict)


def _keys_held(part: Any) -> int:
    """Client input in a service's checkpoint that the guest has not taken yet: the raw
    console's bytes (kernel queue and session), VNC's and the web console's key presses.
    (SSH's is ciphertext in the kernel queue: not counted as keys.)"""
    if isinstance(part, RawConsoleCheckpoint):
        return part.queued_in
    if isinstance(part, VncHostCheckpoint):
        groups = [g for c in part.sessions for g in c.session.pending_input] + part.orphaned
    elif isinstance(part, WebHostCheckpoint):  # a browser's VNC sessions (noVNC)
        groups = [g for c in part.sessions for g in c.session.vnc.pending_input]
    else:
        return 0
    return sum(1 for g in groups for kind, _, down in g if kind == "key" and down)


class DomainR:
    def __init__(
        self, name: str, ip: str, mac: str, *, iface: str = "eth0",
        console_port: int = ports.CONSOLE, announce: bool = True,
        announce_schedule: tuple[int, ...] = DEFAULT_SCHEDULE_MS,
        device: Device | None = None, ssh: SshConfig | None = None,
        display: Display | None = None,
    ) -> None:
        self.name, self.ip, self.mac, self.iface = name, ip, mac, iface
        self.console_port = console_port
        self.device: Device = device if device is not None else EchoDevice()
        self.input_held = False  # a QEMU guest's migration holds input here (hold_input)
        if not isinstance(self.device, EchoDevice):
            self.device.broadcast = self._broadcast
            self.device.retry_inputs = self._retry_inputs
            self.device.may_output = self._may_output
        self.phase = Phase.EMPTY
        self.loop = asyncio.get_running_loop()
        self.left_behind: list[str] = []
        self._left_at_quiesce: dict[str, int] = {}
        self.last_move = MoveStats()
        self.announce_enabled = announce
        self.announce_schedule = announce_schedule
        self._announcer = None
        self._announce_tasks: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()
        # Without announcements the raw console resumes silently (no window probe
        # either), so the tests can show what the announcement alone does.
        self.console = RawConsole(ip, console_port, on_input=self._console_input,
                                  on_drained=self.output_drained, window_probe=announce)
        self.ssh: SshHost | None = None
        if ssh is not None:
            self._add_ssh(ssh)
        self.display = display
        self.vnc: VncHost | None = None
        self.web: WebHost | None = None  # the web console: noVNC, VNC over WebSocket
        if display is not None:
            self.vnc = VncHost(display, ip, name)
            self.web = WebHost(self.vnc, ip, name)
            display.on_damage = self._damage
            display.on_room = self._display_room
            if isinstance(display, QemuDisplay):
                display.on_resize = self._resize

    def _add_ssh(self, cfg: SshConfig) -> SshHost:
        self.ssh = SshHost(cfg, self.ip, on_input=self._console_input,
                           on_drained=self.output_drained)
        return self.ssh

    @property
    def services(self) -> list[Service[Any]]:
        """Every service, always in this order: raw console, SSH, VNC, web console."""
        return [s for s in (self.console, self.ssh, self.vnc, self.web) if s is not None]

    # -- the display's side: VNC viewers and browsers watch the same screen --------------

    def _damage(self, rects: list[tuple[int, int, int, int]]) -> None:
        for svc in (self.vnc, self.web):
            if svc is not None:
                svc.damage(rects)

    def _display_room(self) -> None:
        for svc in (self.vnc, self.web):
            if svc is not None:
                svc.on_room()

    def _resize(self, width: int, height: int) -> None:
        for svc in (self.vnc, self.web):
            if svc is not None:
                svc.resize(width, height)

    @property
    def _fed(self) -> list[ConsoleFed]:
        """The services whose sessions are terminals on the guest's console."""
        return [s for s in (self.console, self.ssh) if s is not None]

    # -- the console device's side ----------------------------------------------------

    def _console_input(self, console: RawSession) -> None:
        self.device.on_input(console)

    def _broadcast(self, data: bytes) -> None:
        """Console output goes to every session (terminals on one serial line)."""
        for svc in self._fed:
            svc.broadcast(data)

    def _may_output(self) -> bool:
        return all(svc.may_output() for svc in self._fed)

    def _retry_inputs(self) -> None:
        for svc in self._fed:
            svc.retry_inputs()

    def output_drained(self) -> None:
        """A session's backlog went down: the console may hand out more."""
        if not isinstance(self.device, EchoDevice):
            self.device.pump_output()

    # -- serving --------------------------------------------------------------

    def prepare_announcer(self) -> None:
        """Open the ARP socket now, in our namespace, so resume does not wait for scapy."""
        from keeper.arp import Announcer

        try:
            self._announcer = Announcer(self.iface, self.ip, self.mac)
        except KeeperError as exc:  # servers in Dom0 (the baseline) have no link of ours
            log.info("no gratuitous ARP: %s", exc)

    def bind(self) -> None:
        """Bind and listen (not yet accepting). Before any restore: a restored socket
        may share the port with a listener only while it is in repair mode."""
        for svc in self.services:
            svc.bind()

    def start(self) -> None:
        """Serve: every service accepts, then the devices hand out what they hold."""
        self.bind()
        for svc in self.services:
            svc.start()
        self.phase = Phase.SERVING
        self.device.start(self.loop)
        if self.display is not None:
            self.display.start(self.loop)
        if self.input_held:  # a restart during a QEMU migration: input stays held
            for link in (self.device, self.display):
                if isinstance(link, ChardevConsole | QemuDisplay):
                    link.hold(True)

    async def hold_input(self, on: bool) -> None:
        """Hold the guest's input here (on) or let it flow (off). Holding returns once
        QEMU has read everything sent before: a QEMU guest's migration calls this
        before QEMU may stop the VM, which would drop keys (keeper.migrate.qemu)."""
        self.input_held = on
        links = [x for x in (self.device, self.display)
                 if isinstance(x, ChardevConsole | QemuDisplay)]
        for link in links:
            link.hold(on)
        if on:
            await asyncio.gather(*(link.drain(DRAIN_TIMEOUT) for link in links))

    def _qemu_guest(self) -> str | None:
        for link in (self.device, self.display):
            if isinstance(link, ChardevConsole | QemuDisplay) and link.state is not None:
                return link.state.guest
        return None

    # -- moving ---------------------------------------------------------------

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise KeeperError(
                f"Domain R {self.name} is {self.phase.value}, "
                f"expected {' or '.join(p.value for p in phases)}"
            )

    async def quiesce(self) -> None:
        """Stop accepting, reading and writing; everything stays where it is.

        The console device stops first (no more output to hand out), then every
        service at once: SSH waits a bounded time for a key exchange in flight, and a
        connection that does not get there is reported and stays."""
        self._require(Phase.SERVING, Phase.QUIESCED)
        if self.phase is Phase.QUIESCED:
            return
        self.device.stop()  # from here on the shared ring is not touched (S3)
        if self.display is not None:
            self.display.stop()
        self.phase = Phase.QUIESCED
        self.left_behind = []
        self._left_at_quiesce = {}
        services = self.services
        for svc, left in zip(services, await asyncio.gather(*(svc.quiesce() for svc in services)),
                             strict=True):
            self.left_behind += left
            self._left_at_quiesce[svc.name] = len(left)

    def checkpoint(self) -> bytes:
        """Dump every session (the link must already be down). Sockets stay in repair mode."""
        with collector_paused():
            self._require(Phase.QUIESCED)
            t0 = time.perf_counter()
            parts, by_rms = {}, {}
            for svc in self.services:
                before = len(self.left_behind)
                w, c = time.perf_counter(), time.thread_time()
                parts[svc.name] = part = svc.checkpoint(self.left_behind)
                by_rms[svc.name] = {
                    "moved": len(part.sessions), "keys_held": _keys_held(part),
                    "left_behind": len(self.left_behind) - before
                    + self._left_at_quiesce.get(svc.name, 0),
                    # where a dump's time goes, per service: wall, and this thread's CPU
                    # (on a loaded machine the two differ several times over)
                    "dump_ms": round((time.perf_counter() - w) * 1e3, 3),
                    "dump_cpu_ms": round((time.thread_time() - c) * 1e3, 3)}
            console = parts["console"]
            blob = ck.encode(
                ck.DomrCheckpoint(
                    name=self.name, ip=self.ip, mac=self.mac, console=console,
                    left_behind=list(self.left_behind),
                    device=self.device.state if isinstance(self.device, ConsoleBackend) else None,
                    ssh=parts.get("ssh"),
                    display=self.display.state if isinstance(self.display, DisplayBackend)
                    else None,
                    vnc=parts.get("vnc"), web=parts.get("web"), qemu_guest=self._qemu_guest(),
                )
            )
            self.last_move = MoveStats(
                sessions=len(console.sessions), bytes=len(blob),
                dump_ms=(time.perf_counter() - t0) * 1e3,
                queued_in=console.queued_in, queued_out=console.queued_out, by_rms=by_rms,
            )
            self.phase = Phase.DUMPED
            return blob

    def abort(self) -> None:
        """Roll back: take the sockets out of repair mode and serve again, here."""
        self._require(Phase.QUIESCED, Phase.DUMPED, Phase.SERVING)
        if self.phase is not Phase.SERVING:
            for svc in self.services:
                svc.resume_in_place()
        self.start()
        self._announce()  # reclaim the switch port, whatever a failed target did

    def _announce(self) -> None:
        if self.announce_enabled and self._announcer is not None:
            task = asyncio.create_task(self._announcer.announce(self.announce_schedule))
            self._announce_tasks.add(task)
            task.add_done_callback(self._announce_tasks.discard)

    def commit(self) -> None:
        """The move succeeded elsewhere: drop everything without a sound."""
        self._require(Phase.DUMPED)
        for svc in self.services:
            svc.release()
        self.phase = Phase.CLOSED
        self.stopped.set()

    async def restore(self, blob: bytes) -> MoveStats:
        """Bring sessions back from a checkpoint (link still down, sockets in repair).
        A QEMU guest's links are made to the QEMU on this host (S7, before `cont`)."""
        with collector_paused():
            self._require(Phase.EMPTY)
            t0 = time.perf_counter()
            doc = ck.decode(blob)
            if (doc.name, doc.ip, doc.mac) != (self.name, self.ip, self.mac):
                raise KeeperError(
                    f"checkpoint is for {doc.name} {doc.ip} {doc.mac}, this is "
                    f"{self.name} {self.ip} {self.mac}"
                )
            guest_console = doc.device is not None or doc.qemu_guest is not None
            if guest_console == isinstance(self.device, EchoDevice):
                raise KeeperError("checkpoint and this Domain R disagree about the guest console")
            if doc.device is not None:
                if not isinstance(self.device, ConsoleBackend):
                    raise KeeperError("a simulated guest's checkpoint, but this Domain R has "
                                      "no hypercall channel")
                self.device.reconnect(doc.device)  # S7: the same pages, the same port
            if doc.qemu_guest is not None:
                if not isinstance(self.device, ChardevConsole):
                    raise KeeperError("a QEMU guest's checkpoint, but this Domain R has no "
                                      "device channel")
                self.device.reconnect(ChardevState(guest=doc.qemu_guest))
                if isinstance(self.display, QemuDisplay):
                    await self.display.reconnect(QemuDisplayState(guest=doc.qemu_guest))
            if doc.ssh is not None and self.ssh is None:
                # the same host key: the client sees no change; bound before its sockets
                # are restored on its port
                self._add_ssh(doc.ssh.config).bind()
            if doc.display is not None and isinstance(self.display, DisplayBackend):
                self.display.reconnect(doc.display)
            parts = {"console": doc.console, "ssh": doc.ssh, "vnc": doc.vnc, "web": doc.web}
            for svc in self.services:
                part = parts[svc.name]
                if part is not None:
                    svc.restore(part)
            self.left_behind = doc.left_behind
            self.last_move = MoveStats(
                sessions=len(doc.console.sessions), bytes=len(blob),
                restore_ms=(time.perf_counter() - t0) * 1e3,
            )
            self.phase = Phase.RESTORED
            return self.last_move

    async def resume(self, *, fail_prepare_after: int | None = None,
                     fail_after: int | None = None) -> list[str]:
        """Link is up: leave repair mode (window probe), announce, serve.

        Two phases (docs/design.md, the window). First every service prepares what
        can fail while its sockets are still silent (in repair mode, they neither
        answer nor acknowledge): a failure there raises and nothing of this R was
        seen, so the move rolls back whole. Then every service leaves repair mode:
        from the first socket on, this R is the only one that may serve the IP, so a
        service that fails then ends its own sessions (each with an RST, its clients
        reconnect) and the others serve on. Returns those failures, one line each.
        `fail_prepare_after` and `fail_after` are drills: fail after that many
        services prepared, resp. resumed."""
        with collector_paused():
            self._require(Phase.RESTORED)
            for done, svc in enumerate(self.services):
                if fail_prepare_after is not None and done >= fail_prepare_after:
                    names = ", ".join(s.name for s in self.services[:done])
                    raise KeeperError(f"fault drill: preparing the resume failed after "
                                      f"{done} services ({names})")
                await svc.prepare_resume()
            # A task: it goes on the wire at our first wait, after the raw console's probes.
            self._announce()
            failed: list[str] = []
            for done, svc in enumerate(self.services):
                try:
                    if fail_after is not None and done >= fail_after:
                        raise KeeperError(f"fault drill: resume failed after {done} services")
                    await svc.resume()
                except Exception as exc:  # past the point of no return: forward, not back
                    log.error("%s did not resume, its sessions end: %s", svc.name, exc)
                    failed.append(f"{svc.name}: {exc}")
                    svc.abandon()
            self.start()
            return failed

    async def announce_now(self) -> None:
        if self._announcer is not None:
            await self._announcer.announce((0,))

    # -- reporting and shutdown -------------------------------------------------

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "name": self.name, "ip": self.ip, "mac": self.mac, "phase": self.phase.value,
            "console_port": self.console_port, "sessions": [],
            "closed_sessions": self.console.closed_sessions, "left_behind": self.left_behind,
            "ssh_sessions": [], "vnc_sessions": [], "web_sessions": [],
            "vnc_keys": self.vnc.keys if self.vnc is not None else 0,
            "last_move": {
                "sessions": self.last_move.sessions, "bytes": self.last_move.bytes,
                "dump_ms": self.last_move.dump_ms, "restore_ms": self.last_move.restore_ms,
                "queued_in": self.last_move.queued_in, "queued_out": self.last_move.queued_out,
            },
        }
        for svc in self.services:
            doc[STATUS_KEYS[svc.name]] = svc.status()
        return doc

    async def close(self) -> None:
        """Idempotent: close every service (its sessions normally, or silently if in
        repair mode), stop announcing, let go of the devices."""
        if self.phase is Phase.CLOSED:
            self.stopped.set()
            return
        for svc in self.services:
            await svc.close()
        for task in list(self._announce_tasks):
            task.cancel()
        if self._announce_tasks:
            await asyncio.wait(self._announce_tasks, timeout=1)
        if self._announcer is not None:
            self._announcer.close()
        if self.display is not None:
            self.display.close()
        self.device.close()
        self.phase = Phase.CLOSED
        self.stopped.set()
