"""A small request/answer server on a Unix SEQPACKET socket, with file descriptors.

What the hypercall channel (keeper.vmm.hypercall) and the QEMU device channel
(keeper.qemu.devices) share: one socket per client domain at a path only root can
reach (so which socket a request came through says who asks), a message is one
msgpack map, the answer {"ok": result} or {"error": text} with file descriptors
attached by SCM_RIGHTS. Calls are rare (set-up, restore), so each connection gets a
thread with blocking I/O.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from keeper.errors import KeeperError

log = logging.getLogger("keeper.seqpacket")
MAX_MSG = 1 << 16

# (result, fds to pass, whether those fds were opened for this answer: closed after)
Answer = tuple[Any, list[int], bool]
Handler = Callable[[dict[str, Any]], Answer]


class SeqpacketServer:
    def __init__(self, path: Path, handle: Handler, *, name: str) -> None:
        self.path, self._handle, self.name = path, handle, name
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"{self.name}-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    data = conn.recv(MAX_MSG)
                except OSError:
                    return
                if not data:
                    return
                fds: list[int] = []
                owned = False
                try:
                    req = msgpack.unpackb(data, raw=False)
                    if not isinstance(req, dict):
                        raise KeeperError("a request is a map")
                    result, fds, owned = self._handle(req)
                    reply: dict[str, Any] = {"ok": result}
                except (KeeperError, KeyError, TypeError, ValueError, OSError) as exc:
                    reply = {"error": str(exc) or type(exc).__name__}
                try:
                    socket.send_fds(conn, [msgpack.packb(reply)], fds)
                except OSError:
                    return
                finally:
                    if owned:
                        for fd in fds:
                            os.close(fd)
        finally:
            self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Idempotent: stop accepting, drop connections, remove the socket file."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)
