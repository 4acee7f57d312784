"""What every Domain R service does with its sessions' sockets across a move.

A service (raw console, VNC) keeps its sessions in `conns` (each with a `sock` and a
`start()`), listens through an `Acceptor`, and sets `_in_repair` while its sockets are
dumped or restored but not yet live. Rolling back and letting go are then the same
for all of them.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Protocol

from keeper.errors import KeeperError
from keeper.net import tcprepair
from keeper.net.listen import Acceptor


class Session(Protocol):
    sock: socket.socket

    def start(self) -> None: ...


class MovableSessions:
    conns: dict[int, Any]  # id -> a Session
    acceptor: Acceptor
    _in_repair: bool
    # restored on the target, not served yet: (state, socket) after restore, then
    # (state, socket, protocol core) after prepare_resume
    _incoming: list[Any]
    _ready: list[Any]

    def _unserved(self) -> list[socket.socket]:
        """Take every restored socket not served yet (both lists emptied)."""
        socks = [item[1] for item in (*self._incoming, *self._ready)]
        self._incoming, self._ready = [], []
        return socks

    def abandon(self) -> None:
        """The resume failed past the point of no return: the sessions not served yet
        end here, each with an RST."""
        for sock in self._unserved():
            tcprepair.reset(sock)

    def bind(self) -> None:
        self.acceptor.bind()

    def resume_in_place(self) -> None:
        """Roll back a quiesce or a checkpoint: sockets leave repair mode, serve again."""
        if self._in_repair:
            for conn in list(self.conns.values()):
                with contextlib.suppress(KeeperError):
                    tcprepair.leave_repair(conn.sock, window_probe=True)
            self._in_repair = False
        for conn in list(self.conns.values()):
            conn.start()

    def release(self) -> None:
        """The move succeeded: drop every socket in repair mode (no FIN, no RST)."""
        for conn in list(self.conns.values()):
            tcprepair.release(conn.sock)
        self.conns.clear()
        self.acceptor.close()
