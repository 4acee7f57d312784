"""The raw console service: TCP sessions on the guest's console, movable.

Each connection is a sans-I/O `RawSession` (keeper.console.raw) driven by a thin
adapter on the event loop's reader/writer callbacks. We do our own `send`, so at any
instant every byte is in exactly one place we can checkpoint: the session's
`pending_out`, or the kernel's send queue (taken by TCP repair). asyncio transports
would hide a write buffer we could not checkpoint.

Several sessions on one console behave like terminals on one serial line: output to
all, input from any. Domain R drives this service as a keeper.domr.services.Service;
what a session types goes to `on_input` (the console device).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from keeper import ports
from keeper.console.raw import OUTPUT_HIGH_WATER, RawSession
from keeper.errors import NotMovable
from keeper.net import tcprepair
from keeper.net.listen import Acceptor
from keeper.net.pump import SocketPump
from keeper.net.sessions import MovableSessions
from keeper.net.tcpinfo import tcp_info
from keeper.net.tcprepair import TcpRepairRecord

log = logging.getLogger("keeper.console")

SEND_CHUNK = 1 << 20
OnInput = Callable[[RawSession], None]


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


@dataclass(slots=True)
class RawCheckpoint:
    """One raw console session in a checkpoint: its core's state and its TCP socket."""

    session: RawSession
    tcp: TcpRepairRecord


@dataclass(slots=True)
class RawConsoleCheckpoint:
    next_session_id: int  # ids are never reused, also not after a move
    sessions: list[RawCheckpoint] = field(default_factory=list)

    @property
    def queued_in(self) -> int:
        """Client bytes not yet handled, in the kernel and ours."""
        return sum(len(c.tcp.inq) + len(c.session.pending_in) for c in self.sessions)

    @property
    def queued_out(self) -> int:
        """Bytes for clients not yet acknowledged, in the kernel and ours."""
        return sum(len(c.tcp.outq) + len(c.session.pending_out) for c in self.sessions)


class Conn(SocketPump):
    """Asyncio adapter for one session: moves bytes between its socket and its core."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, state: RawSession,
        on_input: OnInput, on_close: Callable[[Conn, str], None],
    ) -> None:
        self.loop, self.sock, self.state, self.on_input = loop, sock, state, on_input
        self._on_close = on_close
        self.on_drained: Callable[[], None] | None = None

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        self.sock.setblocking(False)
        self.on_input(self.state)
        self.flush()

    def on_data(self, data: bytes) -> None:
        self.state.receive(data)
        self.on_input(self.state)
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


class RawConsole(MovableSessions):
    """The raw console sessions of one Domain R and their listener (TCP 2323)."""

    name = "console"

    def __init__(self, ip: str, port: int = ports.CONSOLE, *, on_input: OnInput,
                 on_drained: Callable[[], None] = lambda: None, window_probe: bool = True,
                 backlog: int = 512) -> None:
        self.ip, self.port = ip, port
        self.on_input, self.on_drained = on_input, on_drained
        # leave repair mode after a move with a window probe (False: stay silent, so
        # the tests can show what the gratuitous ARP alone does)
        self.window_probe = window_probe
        self.conns: dict[int, Conn] = {}
        self.next_id = 1
        self.closed_sessions = 0
        self.acceptor = Acceptor(ip, port, self._on_accept, backlog=backlog)
        self.loop = asyncio.get_running_loop()
        self.serving = False
        self._in_repair = False  # our sockets are dumped or restored, not yet live

    # -- serving ------------------------------------------------------------------------


    def start(self) -> None:
        self.acceptor.start(self.loop)
        self.serving = True

    def _on_accept(self, sock: socket.socket) -> None:
        state = RawSession(id=self.next_id)
        self.next_id += 1
        conn = self._conn(sock, state)
        if self.serving:  # accepted at a checkpoint: it waits to be dumped
            conn.start()

    def _conn(self, sock: socket.socket, state: RawSession) -> Conn:
        conn = Conn(self.loop, sock, state, self.on_input, self._closed)
        conn.on_drained = self.on_drained
        self.conns[state.id] = conn
        return conn

    def _closed(self, conn: Conn, why: str) -> None:
        if self.conns.pop(conn.state.id, None) is not None:
            self.closed_sessions += 1
            log.info("session %d closed: %s", conn.state.id, why)

    # -- fed by the console device --------------------------------------------------------

    def broadcast(self, data: bytes) -> None:
        for conn in list(self.conns.values()):
            conn.state.queue_output(data)
            conn.flush()

    def may_output(self) -> bool:
        return not any(len(c.state.pending_out) >= OUTPUT_HIGH_WATER
                       for c in self.conns.values())

    def retry_inputs(self) -> None:
        for conn in list(self.conns.values()):
            if conn.state.pending_in:
                self.on_input(conn.state)
                conn.flush()

    # -- moving ---------------------------------------------------------------------------

    async def quiesce(self) -> list[str]:
        self.serving = False
        self.acceptor.stop()
        for conn in self.conns.values():
            conn.stop()
        return []

    def checkpoint(self, left_behind: list[str]) -> RawConsoleCheckpoint:
        """Connections that completed their handshake but were not accepted yet are
        accepted first: closing the listener would reset them."""
        self.acceptor.accept_pending()
        self._in_repair = True  # also if a dump fails midway: rollback takes them out
        sessions: list[RawCheckpoint] = []
        for sid, conn in list(self.conns.items()):
            try:
                rec = tcprepair.dump(conn.sock)
            except NotMovable as exc:
                left_behind.append(f"session {sid}: {exc}")
                continue
            sessions.append(RawCheckpoint(conn.state, rec))
        return RawConsoleCheckpoint(next_session_id=self.next_id, sessions=sessions)



    def restore(self, ckpt: RawConsoleCheckpoint) -> None:
        restored: list[Conn] = []
        try:
            for item in ckpt.sessions:
                r = tcprepair.restore(item.tcp)
                item.session.unqueue_front(r.resend)
                restored.append(self._conn(r.sock, item.session))
        except BaseException:
            for conn in restored:
                tcprepair.release(conn.sock)
                self.conns.pop(conn.state.id, None)
            raise
        self.next_id = ckpt.next_session_id
        self._in_repair = True

    async def prepare_resume(self) -> None:
        """Nothing here can fail: the sessions were rebuilt at restore."""

    async def resume(self) -> None:
        for sid, conn in list(self.conns.items()):
            if not tcprepair.go_live(conn.sock, f"console {sid}",
                                     window_probe=self.window_probe):
                self.conns.pop(sid, None)
        self._in_repair = False
        for conn in list(self.conns.values()):
            conn.start()

    def abandon(self) -> None:
        """The resume failed past the point of no return: the sessions still in repair
        mode end here, each with an RST so its client knows at once."""
        if self._in_repair:
            for conn in list(self.conns.values()):
                tcprepair.reset(conn.sock)
            self.conns.clear()
            self._in_repair = False

    # -- reporting and shutdown -------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
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
        return sessions

    async def close(self) -> None:
        self.serving = False
        self.acceptor.close()
        for conn in list(self.conns.values()):
            if self._in_repair:
                tcprepair.release(conn.sock)  # dumped or restored: nothing on the wire
                self.conns.pop(conn.state.id, None)
            else:
                conn.close("Domain R shutting down")
