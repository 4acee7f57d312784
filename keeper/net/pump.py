"""The asyncio side of a session: reader/writer interest for one non-blocking socket.

Session adapters (raw console, VNC) subclass `SocketPump` and provide `on_data`,
`flush` and `close`. We do our own recv/send (no asyncio transports), so every byte
a session holds is in its own state, where a checkpoint can see it.
"""

from __future__ import annotations

import asyncio
import socket

RECV_CHUNK = 65536


class SocketPump:
    sock: socket.socket
    loop: asyncio.AbstractEventLoop
    _reading = False
    _writing = False

    def want(self, *, read: bool, write: bool) -> None:
        """Watch the socket for reading and/or writing (idempotent)."""
        if self.sock.fileno() < 0:
            return
        fd = self.sock.fileno()
        if read != self._reading:
            if read:
                self.loop.add_reader(fd, self._readable)
            else:
                self.loop.remove_reader(fd)
            self._reading = read
        if write != self._writing:
            if write:
                self.loop.add_writer(fd, self.flush)
            else:
                self.loop.remove_writer(fd)
            self._writing = write

    def stop(self) -> None:
        """Quiesce: no more reads or writes."""
        self.want(read=False, write=False)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"recv: {exc}")
            return
        self.on_data(data)  # b"": the peer closed its side

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self, why: str) -> None:
        raise NotImplementedError
