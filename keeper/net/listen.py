"""Listening sockets of Domain R's services (console, SSH, VNC)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("keeper.net")


def listener(ip: str, port: int, backlog: int = 128) -> socket.socket:
    """A non-blocking listening TCP socket on ip:port (address reuse on: a restarted
    service must not wait for TIME_WAIT, and restored sockets share the port)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((ip, port))
        ls.listen(backlog)
        ls.setblocking(False)
    except BaseException:
        ls.close()
        raise
    return ls


class Acceptor:
    """One service's listener: bound early (a restored socket may share the port with
    it only while the restored socket is in repair mode), accepting only between
    `start` and `stop`. Every accepted connection goes to `on_accept`, non-blocking
    and with Nagle off (keystrokes are small and late ones are what users notice)."""

    def __init__(self, ip: str, port: int, on_accept: Callable[[socket.socket], None], *,
                 backlog: int = 128) -> None:
        self.ip, self.port, self.backlog, self.on_accept = ip, port, backlog, on_accept
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        if self.sock is None:
            self.sock = listener(self.ip, self.port, self.backlog)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bind()
        assert self.sock is not None
        if self._loop is None:
            loop.add_reader(self.sock.fileno(), self.accept_pending)
            self._loop = loop

    def stop(self) -> None:
        """Stop accepting; the listener stays bound."""
        if self._loop is not None and self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._loop = None

    def accept_pending(self) -> None:
        """Take every connection waiting in the backlog."""
        if self.sock is None:
            return
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s:%d: %s", self.ip, self.port, exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.on_accept(sock)

    def close(self) -> None:
        """Idempotent: stop accepting and close the listener."""
        with contextlib.suppress(Exception):
            self.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
