"""The SSH service of a Domain R: a listener on port 22 and the live sessions.

Domain R owns one `SshHost` when it serves a guest console over SSH. Connections
are accepted on our own listening socket and handed to asyncssh one by one
(`asyncssh.run_server`), so the listener — like every other socket of Domain R — is
ours to bind before a restore and to close without a sound after a move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

from keeper.console.raw import RawSession
from keeper.ssh.console import LOGIN, ConsoleServer, ConsoleSession, ConsoleSessionState

log = logging.getLogger("keeper.ssh")

SSH_PORT = 22
MOVABLE_CIPHERS = ("chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com",
                   "aes128-gcm@openssh.com")


@dataclass(slots=True)
class SshConfig:
    """What the SSH service needs; it travels with Domain R (the host key above all:
    the client must see the same host key after a move)."""

    host_key: str  # OpenSSH private key text: lives only in Domain R and its checkpoint
    authorized_keys: str
    login: str = LOGIN
    password: str | None = None


class SshHost:
    def __init__(self, cfg: SshConfig, ip: str, *, on_input: Callable[[RawSession], None],
                 port: int = SSH_PORT) -> None:
        self.cfg, self.ip, self.port = cfg, ip, port
        self.on_input = on_input
        self.sessions: set[ConsoleSession] = set()
        self.conns: set[asyncssh.SSHServerConnection] = set()
        self.listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._next_id = 1
        self._options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=[asyncssh.import_private_key(cfg.host_key)],
            authorized_client_keys=asyncssh.import_authorized_keys(cfg.authorized_keys),
            server_factory=self._server, encoding=None, line_editor=False, allow_pty=True,
            x11_forwarding=False, agent_forwarding=False,
            # only what a move can carry: ciphers whose state is keys and counters,
            # no compression (zlib state cannot be exported), no time-based rekeying
            encryption_algs=list(MOVABLE_CIPHERS), compression_algs=["none"],
            rekey_seconds=None, rekey_bytes=1 << 40, keepalive_interval=30,
        )

    # -- the Console interface sessions use -----------------------------------------------

    def attach(self, session: ConsoleSession) -> None:
        self.sessions.add(session)

    def detach(self, session: ConsoleSession) -> None:
        self.sessions.discard(session)

    def input(self, console: RawSession) -> None:
        self.on_input(console)

    def _server(self) -> ConsoleServer:
        return ConsoleServer(self._new_session, login=self.cfg.login, password=self.cfg.password)

    def _new_session(self) -> ConsoleSession:
        state = ConsoleSessionState(console=RawSession(id=self._next_id))
        self._next_id += 1
        return ConsoleSession(self, state)

    # -- Domain R's side ---------------------------------------------------------------------

    def bind(self) -> None:
        if self.listener is None:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((self.ip, self.port))
            ls.listen(64)
            ls.setblocking(False)
            self.listener = ls

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bind()
        assert self.listener is not None
        if not self._accepting:
            loop.add_reader(self.listener.fileno(), self._accept_ready)
            self._accepting = True

    def stop_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._accepting and self.listener is not None:
            loop.remove_reader(self.listener.fileno())
        self._accepting = False

    def _accept_ready(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("ssh accept: %s", exc)
                return
            task = asyncio.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = await asyncio.wait_for(
                asyncssh.run_server(sock, options=self._options), timeout=120)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            log.info("ssh connection failed: %s", exc)
            sock.close()
            return
        self.conns.add(conn)
        try:
            await conn.wait_closed()
        finally:
            self.conns.discard(conn)

    def broadcast(self, data: bytes) -> None:
        for s in list(self.sessions):
            s.write(data)

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
        if self.listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self._accepting = False
        for conn in list(self.conns):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
