"""The Domain R session host: raw console sessions over real sockets, movable.

Each connection is a sans-I/O `RawSession` driven by a thin adapter on the event
loop's reader/writer callbacks. We do our own `send`, so at any instant every byte
is in exactly one place we can checkpoint: the session's `pending_out`, or the
kernel's send queue (taken by TCP repair). asyncio transports would hide a write
buffer we could not checkpoint.

Lifecycle seen by the host agent (see keeper.migrate.domr for the order it drives):

    serving --quiesce--> quiesced --checkpoint--> dumped --commit--> (exit)
       ^                    |                        |
       +------ abort -------+-------- abort ---------+
    (new process)  empty --restore--> restored --resume--> serving
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE_MS
from keeper.console.raw import OUTPUT_HIGH_WATER, RawSession
from keeper.domr import checkpoint as ck
from keeper.domr.console import ConsoleBackend
from keeper.domr.display import DisplayBackend
from keeper.errors import KeeperError, NotMovable
from keeper.net import tcprepair
from keeper.net.listen import Acceptor
from keeper.net.pump import SocketPump
from keeper.net.tcpinfo import tcp_info
from keeper.ssh.host import QUIESCE_TIMEOUT, SshConfig, SshHost
from keeper.vnc.server import VncHost

log = logging.getLogger("keeper.domr")

SEND_CHUNK = 1 << 20


class Phase(enum.Enum):
    EMPTY = "empty"  # a new process waiting for a checkpoint
    SERVING = "serving"
    QUIESCED = "quiesced"
    DUMPED = "dumped"
    RESTORED = "restored"
    CLOSED = "closed"


class EchoDevice:
    """Stand-in device for a Domain R without a guest: what a client types comes back."""

    state = None

    def on_input(self, session: RawSession) -> None:
        data = session.take_input()
        if data:
            session.queue_output(data)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


Device = EchoDevice | ConsoleBackend


class Conn(SocketPump):
    """Asyncio adapter for one session: moves bytes between its socket and its core."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, state: RawSession,
        device: Device, on_close: Callable[[Conn, str], None],
    ) -> None:
        self.loop, self.sock, self.state, self.device = loop, sock, state, device
        self._on_close = on_close
        self.on_drained: Callable[[], None] | None = None

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        self.sock.setblocking(False)
        self.device.on_input(self.state)
        self.flush()

    def on_data(self, data: bytes) -> None:
        self.state.receive(data)
        self.device.on_input(self.state)
        self.flush()

    def flush(self) -> None:
        if self.sock.fileno() < 0:
            return
        st = self.state
        held = len(st.pending_out) >= OUTPUT_HIGH_WATER  # this session holds the console
        while st.pending_out:
            try:
                n = self.sock.send(memoryview(st.pending_out)[:SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"send: {exc}")
                return
            st.sent_bytes(n)
        if st.finished:
            self.close("client closed")
            return
        self.want(read=st.wants_input, write=bool(st.pending_out))
        if held and self.on_drained is not None and len(st.pending_out) < OUTPUT_HIGH_WATER:
            self.on_drained()  # it no longer does: let the console hand out more

    def close(self, why: str) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._on_close(self, why)


@dataclass(slots=True)
class MoveStats:
    sessions: int = 0
    bytes: int = 0
    queued_in: int = 0  # client bytes not yet handled (kernel + ours) at the dump
    queued_out: int = 0  # bytes for clients not yet acknowledged (kernel + ours)
    dump_ms: float = 0.0
    restore_ms: float = 0.0


class DomainR:
    def __init__(
        self, name: str, ip: str, mac: str, *, iface: str = "eth0",
        console_port: int = ports.CONSOLE, announce: bool = True,
        announce_schedule: tuple[int, ...] = DEFAULT_SCHEDULE_MS,
        device: Device | None = None, ssh: SshConfig | None = None,
        display: DisplayBackend | None = None,
    ) -> None:
        self.name, self.ip, self.mac, self.iface = name, ip, mac, iface
        self.console_port = console_port
        self.device: Device = device if device is not None else EchoDevice()
        if isinstance(self.device, ConsoleBackend):
            self.device.broadcast = self._broadcast
            self.device.retry_inputs = self._retry_inputs
            self.device.may_output = self._may_output
        self.conns: dict[int, Conn] = {}
        self.next_id = 1
        self.phase = Phase.EMPTY
        self.acceptor = Acceptor(ip, console_port, self._on_accept, backlog=512)
        self.loop = asyncio.get_running_loop()
        self.left_behind: list[str] = []
        self.closed_sessions = 0
        self.last_move = MoveStats()
        self.announce_enabled = announce
        self.announce_schedule = announce_schedule
        self._announcer = None
        self._announce_tasks: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()
        self.ssh: SshHost | None = None
        if ssh is not None:
            self._set_ssh(ssh)
        self.display = display
        self.vnc: VncHost | None = None
        if display is not None:
            self.vnc = VncHost(display, ip, name)
            display.on_damage = self.vnc.damage

    def _set_ssh(self, cfg: SshConfig) -> None:
        self.ssh = SshHost(cfg, self.ip, on_input=self._console_input,
                           on_drained=self.output_drained)

    def _console_input(self, console: RawSession) -> None:
        self.device.on_input(console)

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
        self.acceptor.bind()
        if self.ssh is not None:
            self.ssh.bind()
        if self.vnc is not None:
            self.vnc.bind()

    def start(self) -> None:
        self.bind()
        self.acceptor.start(self.loop)
        if self.ssh is not None:
            self.ssh.start(self.loop)
        self.phase = Phase.SERVING
        self.device.start(self.loop)
        if self.display is not None and self.vnc is not None:
            self.display.start(self.loop)
            self.vnc.start()

    def _broadcast(self, data: bytes) -> None:
        """Console output goes to every session (terminals on one serial line)."""
        for conn in list(self.conns.values()):
            conn.state.queue_output(data)
            conn.flush()
        if self.ssh is not None:
            self.ssh.broadcast(data)

    def _may_output(self) -> bool:
        if any(len(c.state.pending_out) >= OUTPUT_HIGH_WATER for c in self.conns.values()):
            return False
        return self.ssh is None or self.ssh.may_output()

    def output_drained(self) -> None:
        """A session's backlog went down: the console may hand out more."""
        if isinstance(self.device, ConsoleBackend):
            self.device.pump_output()

    def _retry_inputs(self) -> None:
        for conn in list(self.conns.values()):
            if conn.state.pending_in:
                self.device.on_input(conn.state)
                conn.flush()
        if self.ssh is not None:
            self.ssh.retry_inputs()

    def _on_accept(self, sock: socket.socket) -> None:
        state = RawSession(id=self.next_id)
        self.next_id += 1
        conn = Conn(self.loop, sock, state, self.device, self._closed)
        conn.on_drained = self.output_drained
        self.conns[state.id] = conn
        if self.phase is Phase.SERVING:  # accepted at a checkpoint: it waits to be dumped
            conn.start()

    def _closed(self, conn: Conn, why: str) -> None:
        if self.conns.pop(conn.state.id, None) is not None:
            self.closed_sessions += 1
            log.info("session %d closed: %s", conn.state.id, why)

    # -- moving ---------------------------------------------------------------

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise KeeperError(
                f"Domain R {self.name} is {self.phase.value}, "
                f"expected {' or '.join(p.value for p in phases)}"
            )

    async def quiesce(self) -> None:
        """Stop accepting, reading and writing; everything stays where it is.

        The console device stops first (no more output to hand out), then each SSH
        connection is brought to a movable state, waiting a bounded time for a key
        exchange in flight; one that does not get there is reported and stays."""
        self._require(Phase.SERVING, Phase.QUIESCED)
        if self.phase is Phase.QUIESCED:
            return
        self.acceptor.stop()
        if self.ssh is not None:
            self.ssh.stop_accepting()
        self.device.stop()  # from here on the shared ring is not touched (S3)
        if self.display is not None and self.vnc is not None:
            self.display.stop()
            self.vnc.stop()
        for conn in self.conns.values():
            conn.stop()
        self.phase = Phase.QUIESCED
        self.left_behind = []
        if self.ssh is not None:
            self.left_behind += await self.ssh.quiesce(QUIESCE_TIMEOUT)

    def checkpoint(self) -> bytes:
        """Dump every session (the link must already be down). Sockets stay in repair mode.

        Connections that completed their handshake but were not accepted yet are
        accepted first: closing the listener would reset them.
        """
        self._require(Phase.QUIESCED)
        t0 = time.perf_counter()
        self.acceptor.accept_pending()
        sessions: list[ck.SessionCheckpoint] = []
        for sid, conn in list(self.conns.items()):
            try:
                rec = tcprepair.dump(conn.sock)
            except NotMovable as exc:
                self.left_behind.append(f"session {sid}: {exc}")
                continue
            sessions.append(ck.SessionCheckpoint("console", conn.state, rec))
        blob = ck.encode(
            ck.DomrCheckpoint(
                name=self.name, ip=self.ip, mac=self.mac, next_session_id=self.next_id,
                sessions=sessions, left_behind=list(self.left_behind),
                device=self.device.state, ssh=self.ssh.cfg if self.ssh is not None else None,
                ssh_sessions=self.ssh.checkpoint() if self.ssh is not None else [],
                display=self.display.state if self.display is not None else None,
                vnc_sessions=self.vnc.checkpoint() if self.vnc is not None else [],
            )
        )
        self.last_move = MoveStats(
            sessions=len(sessions), bytes=len(blob), dump_ms=(time.perf_counter() - t0) * 1e3,
            queued_in=sum(len(c.tcp.inq) + len(c.session.pending_in) for c in sessions),
            queued_out=sum(len(c.tcp.outq) + len(c.session.pending_out) for c in sessions),
        )
        self.phase = Phase.DUMPED
        return blob

    def abort(self) -> None:
        """Roll back: take the sockets out of repair mode and serve again, here."""
        self._require(Phase.QUIESCED, Phase.DUMPED, Phase.SERVING)
        if self.phase is Phase.DUMPED:
            for conn in list(self.conns.values()):
                with contextlib.suppress(KeeperError):
                    tcprepair.leave_repair(conn.sock, window_probe=True)
            if self.ssh is not None:
                self.ssh.resume_in_place()
            if self.vnc is not None:
                self.vnc.resume_in_place()
        for conn in list(self.conns.values()):
            conn.start()
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
        for conn in list(self.conns.values()):
            tcprepair.release(conn.sock)  # repair mode: no FIN, no RST
        self.conns.clear()
        if self.ssh is not None:
            self.ssh.release()
        if self.vnc is not None:
            self.vnc.release()
        self.acceptor.close()
        self.phase = Phase.CLOSED
        self.stopped.set()

    def restore(self, blob: bytes) -> MoveStats:
        """Bring sessions back from a checkpoint (link still down, sockets in repair)."""
        self._require(Phase.EMPTY)
        t0 = time.perf_counter()
        doc = ck.decode(blob)
        if (doc.name, doc.ip, doc.mac) != (self.name, self.ip, self.mac):
            raise KeeperError(
                f"checkpoint is for {doc.name} {doc.ip} {doc.mac}, this is "
                f"{self.name} {self.ip} {self.mac}"
            )
        if (doc.device is None) != isinstance(self.device, EchoDevice):
            raise KeeperError("checkpoint and this Domain R disagree about the guest console")
        if doc.device is not None:
            assert isinstance(self.device, ConsoleBackend)
            self.device.reconnect(doc.device)  # S7: the same pages, the same port
        if doc.ssh is not None and self.ssh is None:
            self._set_ssh(doc.ssh)  # the same host key: the client sees no change
            self.ssh.bind()  # type: ignore[union-attr]
        if doc.ssh_sessions:
            assert self.ssh is not None
            self.ssh.restore(doc.ssh_sessions)
        if doc.display is not None and self.display is not None and self.vnc is not None:
            self.display.reconnect(doc.display)
            self.vnc.restore(doc.vnc_sessions)
        restored: list[Conn] = []
        try:
            for item in doc.sessions:
                r = tcprepair.restore(item.tcp)
                item.session.unqueue_front(r.resend)
                conn = Conn(self.loop, r.sock, item.session, self.device, self._closed)
                conn.on_drained = self.output_drained
                self.conns[item.session.id] = conn
                restored.append(conn)
        except BaseException:
            for conn in restored:
                tcprepair.release(conn.sock)
            self.conns.clear()
            raise
        self.next_id = doc.next_session_id
        self.left_behind = doc.left_behind
        self.last_move = MoveStats(
            sessions=len(restored), bytes=len(blob),
            restore_ms=(time.perf_counter() - t0) * 1e3,
        )
        self.phase = Phase.RESTORED
        return self.last_move

    async def resume(self) -> None:
        """Link is up: leave repair mode (window probe), announce, serve."""
        self._require(Phase.RESTORED)
        for conn in self.conns.values():
            # Without announcements we stay silent (no window probe either), so the
            # tests can show what the announcement alone does.
            tcprepair.leave_repair(conn.sock, window_probe=self.announce_enabled)
        self._announce()
        for conn in list(self.conns.values()):
            conn.start()
        if self.ssh is not None:
            await self.ssh.resume()
        if self.vnc is not None:
            self.vnc.resume()
        self.start()

    async def announce_now(self) -> None:
        if self._announcer is not None:
            await self._announcer.announce((0,))

    # -- reporting and shutdown -------------------------------------------------

    def status(self) -> dict[str, object]:
        sessions = []
        for sid, conn in sorted(self.conns.items()):
            entry: dict[str, object] = {
                "id": sid, "received": conn.state.received, "sent": conn.state.sent,
                "pending_in": len(conn.state.pending_in),
                "pending_out": len(conn.state.pending_out),
            }
            with contextlib.suppress(OSError):
                info = tcp_info(conn.sock)
                entry["retransmits"] = info.total_retrans
                entry["tcp_state"] = info.state_name
            sessions.append(entry)
        return {
            "name": self.name, "ip": self.ip, "mac": self.mac, "phase": self.phase.value,
            "console_port": self.console_port, "sessions": sessions,
            "closed_sessions": self.closed_sessions, "left_behind": self.left_behind,
            "ssh_sessions": self.ssh.status() if self.ssh is not None else [],
            "vnc_sessions": self.vnc.status() if self.vnc is not None else [],
            "vnc_keys": self.vnc.keys if self.vnc is not None else 0,
            "last_move": {
                "sessions": self.last_move.sessions, "bytes": self.last_move.bytes,
                "dump_ms": self.last_move.dump_ms, "restore_ms": self.last_move.restore_ms,
                "queued_in": self.last_move.queued_in, "queued_out": self.last_move.queued_out,
            },
        }

    async def close(self) -> None:
        """Idempotent: stop accepting, close sessions (normally), stop announcing."""
        if self.phase is Phase.CLOSED:
            self.stopped.set()
            return
        self.acceptor.close()
        for conn in list(self.conns.values()):
            if self.phase in (Phase.DUMPED, Phase.RESTORED):
                tcprepair.release(conn.sock)
                self.conns.pop(conn.state.id, None)
            else:
                conn.close("Domain R shutting down")
        for task in list(self._announce_tasks):
            task.cancel()
        if self._announce_tasks:
            await asyncio.wait(self._announce_tasks, timeout=1)
        if self._announcer is not None:
            self._announcer.close()
        if self.ssh is not None:
            await self.ssh.close()
        if self.vnc is not None:
            self.vnc.close()
        if self.display is not None:
            self.display.close()
        self.device.close()
        self.phase = Phase.CLOSED
        self.stopped.set()
