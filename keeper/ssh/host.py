"""The SSH service of a Domain R: a listener on port 22 and the live sessions.

Domain R owns one `SshHost` when it serves a guest console over SSH. Connections
are accepted on our own listening socket and handed to asyncssh one by one
(`asyncssh.run_server`), so the listener — like every other socket of Domain R — is
ours to bind before a restore and to close without a sound after a move. Domain R
drives it as a keeper.domr.services.Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from keeper import ports
from keeper.console.raw import RawSession
from keeper.errors import NotMovable
from keeper.net import tcprepair
from keeper.net.listen import Acceptor
from keeper.net.tcprepair import Restored, TcpRepairRecord
from keeper.ssh import movable, policy
from keeper.ssh.console import LOGIN, ConsoleServer, ConsoleSession, ConsoleSessionState
from keeper.ssh.movable import SshSessionState

log = logging.getLogger("keeper.ssh")

QUIESCE_TIMEOUT = 2.0  # how long a move waits for a key exchange in flight to end
# How long resume waits for the peers to take what the old host never sent: below the
# host agent's control call timeout, so the failure that comes back is ours.
RESEND_TIMEOUT = 10.0


@dataclass(slots=True)
class SshConfig:
    """What the SSH service needs; it travels with Domain R (the host key above all:
    the client must see the same host key after a move)."""

    host_key: str  # OpenSSH private key text: lives only in Domain R and its checkpoint
    authorized_keys: str
    login: str = LOGIN
    password: str | None = None


@dataclass(slots=True)
class SshCheckpoint:
    """One SSH connection in a Domain R checkpoint: asyncssh's state (with our
    sessions' state inside) and its TCP socket."""

    state: SshSessionState
    tcp: TcpRepairRecord


@dataclass(slots=True)
class SshHostCheckpoint:
    """The SSH service in a Domain R checkpoint: its configuration (the target starts
    the service from it) and its connections."""

    config: SshConfig
    sessions: list[SshCheckpoint] = field(default_factory=list)


class SshHost:
    name = "ssh"

    def __init__(self, cfg: SshConfig, ip: str, *, on_input: Callable[[RawSession], None],
                 on_drained: Callable[[], None] = lambda: None, port: int = ports.SSH) -> None:
        self.cfg, self.ip, self.port = cfg, ip, port
        self.on_input = on_input
        self.on_drained = on_drained
        self.sessions: set[ConsoleSession] = set()
        self.conns: set[asyncssh.SSHServerConnection] = set()
        self.acceptor = Acceptor(ip, port, self._on_accept)
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 1
        self.servers: set[ConsoleServer] = set()
        self._frozen: list[asyncssh.SSHServerConnection] = []  # by quiesce
        self._left: set[ConsoleServer] = set()  # not movable at quiesce: not dumped
        self._dumped: list[tuple[asyncssh.SSHServerConnection, socket.socket]] = []
        self._incoming: list[tuple[SshSessionState, Restored]] = []
        self._prepared: asyncssh.SSHServerConnectionOptions | None = None
        # connections not yet authenticated, by client address (keeper.ssh.policy)
        self._startups: dict[str, int] = {}
        self.refused_startups = 0
        self.stalled = 0  # clients disconnected for leaving their output unread
        self._stall_timer: asyncio.TimerHandle | None = None
        self._serving = False
        # only what a move can carry (keeper.ssh.movable): ciphers whose state is keys
        # and counters, no compression, no time-based rekeying, no line editor; and of
        # those only what keeper.ssh.policy allows (modern algorithms, no SHA-1)
        self._kw = movable.server_options(
            server_host_keys=policy.host_keys([cfg.host_key]),
            authorized_client_keys=asyncssh.import_authorized_keys(cfg.authorized_keys),
            encoding=None, allow_pty=True, x11_forwarding=False, agent_forwarding=False,
            keepalive_interval=30, **policy.options())
        self._options = asyncssh.SSHServerConnectionOptions(
            server_factory=self._server, **self._kw)

    # -- the Console interface sessions use -----------------------------------------------

    def attach(self, session: ConsoleSession) -> None:
        self.sessions.add(session)

    def detach(self, session: ConsoleSession) -> None:
        self.sessions.discard(session)

    def input(self, console: RawSession) -> None:
        self.on_input(console)

    def _server(self) -> ConsoleServer:
        srv = ConsoleServer(self._new_session, login=self.cfg.login, password=self.cfg.password)
        self.servers.add(srv)
        return srv

    def _new_session(self) -> ConsoleSession:
        state = ConsoleSessionState(console=RawSession(id=self._next_id))
        self._next_id += 1
        return ConsoleSession(self, state)

    # -- Domain R's side ---------------------------------------------------------------------

    def bind(self) -> None:
        self.acceptor.bind()

    def start(self) -> None:
        self.acceptor.start(asyncio.get_running_loop())
        self._serving = True
        self._watch_stalls()

    def _on_accept(self, sock: socket.socket) -> None:
        try:
            source = sock.getpeername()[0]
        except OSError:
            sock.close()
            return
        if (sum(self._startups.values()) >= policy.MAX_STARTUPS
                or self._startups.get(source, 0) >= policy.PER_SOURCE_STARTUPS):
            # as OpenSSH does: said in clear, before any key exchange costs us a thing
            self.refused_startups += 1
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(b"Exceeded MaxStartups\r\n")
            sock.close()
            log.info("ssh connection from %s refused: too many unauthenticated", source)
            return
        self._startups[source] = self._startups.get(source, 0) + 1
        task = asyncio.create_task(self._serve(sock, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, source: str) -> None:
        try:
            conn = await asyncio.wait_for(
                asyncssh.run_server(sock, options=self._options), timeout=policy.LOGIN_TIMEOUT)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            log.info("ssh connection failed: %s", exc)
            sock.close()
            return
        finally:
            left = self._startups.get(source, 1) - 1
            if left > 0:
                self._startups[source] = left
            else:
                self._startups.pop(source, None)
        await self._watch(conn)

    async def _watch(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conns.add(conn)
        try:
            await conn.wait_closed()
        finally:
            self.conns.discard(conn)
            self.servers = {s for s in self.servers if s.conn is not conn}
            self._left = {s for s in self._left if s.conn is not conn}

    # -- moving ----------------------------------------------------------------------------

    async def quiesce(self, timeout: float = QUIESCE_TIMEOUT) -> list[str]:
        """Stop accepting, bring every connection to a movable state (bounded). Those
        that do not get there keep working where they are; they are reported and left
        behind."""
        self.acceptor.stop()
        self._serving = False
        left = []
        for srv in list(self.servers):
            if srv.conn is None:
                continue
            try:
                await movable.quiesce(srv.conn, timeout)
            except NotMovable as exc:
                left.append(f"ssh connection of {srv.conn.get_extra_info('peername')}: {exc}")
                self.servers.discard(srv)  # it stays, unmoved, unless the move rolls back
                self._left.add(srv)
                continue
            self._frozen.append(srv.conn)
        return left

    def checkpoint(self, left_behind: list[str]) -> SshHostCheckpoint:
        """Dump each quiesced connection: asyncssh state, our sessions, its socket."""
        out = []
        for srv in list(self.servers):
            conn = srv.conn
            if conn is None or conn not in self.conns:
                continue
            sock = movable.dup_socket(conn)
            rec = tcprepair.dump(sock)
            apps = {movable.channel_number(s.chan): s.export_state()
                    for s in srv.sessions if s.chan is not None}
            out.append(SshCheckpoint(state=movable.export(conn, apps), tcp=rec))
            self._dumped.append((conn, sock))
        return SshHostCheckpoint(config=self.cfg, sessions=out)

    def resume_in_place(self) -> None:
        """The move was abandoned: every connection goes on here, dumped or only
        quiesced, and those left behind may try again at the next move."""
        for _conn, sock in self._dumped:
            tcprepair.leave_repair(sock, window_probe=True)
            sock.close()
        self._dumped.clear()
        for conn in self._frozen:
            movable.resume_in_place(conn)
        self._frozen.clear()
        self.servers |= self._left
        self._left.clear()

    def release(self) -> None:
        """The move succeeded: drop our copies without sending anything."""
        for conn, sock in self._dumped:
            movable.release(conn)
            sock.close()  # in repair mode: no FIN, no RST
        self._dumped.clear()
        self._frozen.clear()
        self.acceptor.close()

    def restore(self, ckpt: SshHostCheckpoint) -> None:
        """Re-create the sockets (repair mode, link down); adopt them at `resume`."""
        restored: list[tuple[SshSessionState, Restored]] = []
        try:
            for item in ckpt.sessions:
                restored.append((item.state, tcprepair.restore(item.tcp)))
        except BaseException:
            for _, r in restored:
                tcprepair.release(r.sock)
            raise
        self._incoming += restored

    async def prepare_resume(self) -> None:
        """What can fail without the sockets, while they are still silent: each
        state must be importable here (asyncssh's version, its ciphers), and the
        server's options are worked out once for every connection."""
        for state, _ in self._incoming:
            movable.check_importable(state)
        self._prepared = await movable.prepare_options(self._kw) if self._incoming else None

    async def resume(self) -> None:
        """Link up: leave repair mode, send what the old host never sent, adopt.

        Those bytes are SSH packets the old host already encrypted: they reach the
        kernel whole and before anything asyncssh writes. The loop sends them, every
        connection at once as its peer's window allows, so one slow reader cannot stall
        every session of this Domain R as a blocking send would. This is past the point
        of no return (the sockets left repair mode): a connection whose bytes cannot be
        sent (RESEND_TIMEOUT) or that cannot be adopted ends alone, with an RST, and
        the others are served."""
        loop = asyncio.get_running_loop()
        incoming, self._incoming = self._incoming, []
        prepared, self._prepared = self._prepared, None
        live: list[tuple[SshSessionState, Restored]] = []
        for state, restored in incoming:
            if tcprepair.go_live(restored.sock, "ssh connection"):
                restored.sock.setblocking(False)
                live.append((state, restored))
        sent = await asyncio.gather(*(self._resend(loop, r) for _, r in live))
        for (state, restored), why in zip(live, sent, strict=True):
            if why is not None:
                log.error("ssh connection reset: %s", why)
                tcprepair.reset(restored.sock)
                continue
            srv = self._server()
            try:
                conn = await movable.import_(
                    state, restored.sock, server_factory=lambda srv=srv: srv,
                    session_factory=lambda app, srv=srv: self._restored_session(srv, app),
                    options=self._kw, prepared=prepared, loop=loop)
            except Exception as exc:  # import_ closed it
                log.error("ssh connection could not be adopted: %r", exc)
                self.servers.discard(srv)
                continue
            srv.conn = conn
            # One keepalive at once: the client's answer comes after anything it sent
            # in the blackout, so a packet lost there (a key, an Enter it now waits
            # on) is a gap our ACK tells its TCP of (SACK), resent at once instead of
            # at its loss-probe timer, 200 ms and more for a lone segment (measured:
            # the SSH pause's tail in bench/downtime.py). One small packet each way.
            movable.probe(conn)
            task = asyncio.create_task(self._watch(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def abandon(self) -> None:
        """The resume failed past the point of no return elsewhere: the connections
        not served yet end here, each with an RST."""
        for _, restored in self._incoming:
            tcprepair.reset(restored.sock)
        self._incoming, self._prepared = [], None

    @staticmethod
    async def _resend(loop: asyncio.AbstractEventLoop, restored: Restored) -> str | None:
        """Hand the never-sent bytes to the kernel; why not, if it could not."""
        if not restored.resend:
            return None
        try:
            await asyncio.wait_for(loop.sock_sendall(restored.sock, restored.resend),
                                   RESEND_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            peer: object = "?"
            with contextlib.suppress(OSError):
                peer = restored.sock.getpeername()
            return f"{len(restored.resend)} unsent bytes for {peer}: {exc!r}"
        return None

    def _restored_session(self, srv: ConsoleServer, app: dict[str, Any]) -> ConsoleSession:
        session = ConsoleSession.restored(self, app)
        session.server = srv
        srv.sessions.add(session)
        return session

    def may_output(self) -> bool:
        backed_up = [s for s in self.sessions if s.backed_up()]
        if backed_up:
            self._watch_stalls()
        return not backed_up

    def drained(self) -> None:
        self.on_drained()

    def broadcast(self, data: bytes) -> None:
        for s in list(self.sessions):
            s.write(data)

    # -- clients that stop reading ------------------------------------------------------

    def _watch_stalls(self) -> None:
        """While a session holds the console back, look again every second: one that
        has for STALL_SECONDS is disconnected, so the others' output flows again."""
        if self._stall_timer is not None or not self._serving:
            return
        if any(s.backed_up() for s in self.sessions):
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(1.0, self._check_stalls)

    def _check_stalls(self) -> None:
        self._stall_timer = None
        if not self._serving:
            return  # frozen for a move: the target starts counting afresh
        now = time.monotonic()
        cut = False
        for s in list(self.sessions):
            since = s.backed_up_since(now)
            if since is None or now - since < policy.STALL_SECONDS:
                continue
            srv = s.server
            if srv is None or srv.conn is None:
                continue
            unread = s.chan.get_write_buffer_size() if s.chan is not None else 0
            log.info("ssh session %d: client left %d bytes unread for %.0f s: disconnected",
                     s.state.console.id, unread, now - since)
            self.stalled += 1
            srv.conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                                f"keeper: output unread for {policy.STALL_SECONDS:.0f} s "
                                f"({unread} bytes) holds the guest console back")
            for other in list(srv.sessions):
                self.detach(other)
            cut = True
        if cut:
            self.on_drained()  # the console may hand out output again
        self._watch_stalls()

    def retry_inputs(self) -> None:
        for s in list(self.sessions):
            if s.state.console.pending_in:
                self.on_input(s.state.console)

    def status(self) -> list[dict[str, object]]:
        return [{"id": s.state.console.id, "term": s.state.term_type,
                 "size": s.state.term_size, "received": s.state.console.received}
                for s in self.sessions]

    async def close(self) -> None:
        """Idempotent: stop accepting, close connections, wait for their tasks."""
        self.acceptor.close()
        self._serving = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        incoming, self._incoming = self._incoming, []
        for _, restored in incoming:
            tcprepair.release(restored.sock)  # restored, never resumed: still in repair
        for conn in list(self.conns):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
