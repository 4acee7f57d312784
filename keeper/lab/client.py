"""A checking client for the console echo service, run from the lab's client namespace.

It writes a deterministic byte stream and checks that what comes back is exactly
that stream: every byte once, in order. It times each write until its echo arrives
(the pause a user sees) and counts reconnects and TCP retransmissions. Sockets are
created inside the client namespace and then driven from this process's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from keeper.aio import cancel_and_wait
from keeper.lab.typist import SocketLink

_PERIOD = 65521  # prime: offsets line up with no power-of-two block size
_BLOCK = random.Random(0x6B70).randbytes(_PERIOD) * 2


def pattern(conn_id: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of connection `conn_id`'s stream (position-dependent)."""
    out = bytearray()
    pos = offset + conn_id * 977
    while length > 0:
        start = pos % _PERIOD
        n = min(length, _PERIOD)
        out += _BLOCK[start:start + n]
        pos += n
        length -= n
    return bytes(out)


@dataclass
class EchoStats:
    conn_id: int
    sent: int = 0
    received: int = 0
    corrupted: int = 0
    retransmits: int = 0
    # (monotonic time the write went out, ms until its echo was complete)
    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class EchoClient:
    """One connection. `run_typing` sends small writes on a period; `transfer` sends bulk."""

    def __init__(self, ns: str, addr: tuple[str, int], conn_id: int = 0) -> None:
        self.ns, self.addr, self.conn_id = ns, addr, conn_id
        self.stats = EchoStats(conn_id)
        self.link: SocketLink | None = None
        self.sock: socket.socket | None = None
        self._pending: collections.deque[tuple[int, float]] = collections.deque()
        # (end offset of a write, when it went out), oldest first

    async def connect(self, timeout: float = 10.0) -> None:
        self.link = await SocketLink.connect(self.ns, self.addr, timeout)
        self.sock = self.link.sock

    def retransmits(self) -> int:
        return self.link.retransmits() if self.link is not None else 0

    async def _write(self, data: bytes) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, data)
        self.stats.sent += len(data)
        self._pending.append((self.stats.sent, time.monotonic()))

    async def _reader(self, stop_at: int | None, timeout: float) -> None:
        """Read and check echoes until `stop_at` bytes arrived (or forever)."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while stop_at is None or self.stats.received < stop_at:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 18), timeout)
            if not data:
                raise ConnectionError("server closed the connection")
            want = pattern(self.conn_id, self.stats.received, len(data))
            if data != want:
                self.stats.corrupted += sum(a != b for a, b in zip(data, want, strict=True))
            self.stats.received += len(data)
            now = time.monotonic()
            while self._pending and self._pending[0][0] <= self.stats.received:
                _, t = self._pending.popleft()
                self.stats.samples.append((t, (now - t) * 1e3))

    async def echo(self, n: int, timeout: float = 10.0) -> None:
        """Write `n` more bytes of the stream and read until everything came back."""
        await self._write(pattern(self.conn_id, self.stats.sent, n))
        await self._reader(self.stats.sent, timeout)

    @contextlib.asynccontextmanager
    async def _reading(
        self, stop_at: int | None, timeout: float
    ) -> AsyncIterator[asyncio.Task[None]]:
        """A reader task for the block; a broken connection is recorded, not raised."""
        reader = asyncio.create_task(self._reader(stop_at, timeout))
        try:
            yield reader
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            exc = await cancel_and_wait(reader)
            if exc is not None:
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")

    async def run_typing(self, stop: asyncio.Event, *, chunk: int = 8, period: float = 0.05,
                         read_timeout: float = 30.0) -> EchoStats:
        """Type `chunk` bytes every `period` s until `stop`, then wait for all echoes."""
        async with self._reading(None, read_timeout) as reader:
            while not stop.is_set():
                if reader.done():
                    reader.result()
                await self._write(pattern(self.conn_id, self.stats.sent, chunk))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
            deadline = time.monotonic() + read_timeout
            while self.stats.received < self.stats.sent and time.monotonic() < deadline:
                if reader.done():
                    reader.result()
                await asyncio.sleep(0.01)
        return self.stats

    async def transfer(self, total: int, *, block: int = 1 << 16, pace: float = 0.0,
                       timeout: float = 60.0) -> EchoStats:
        """Send `total` bytes (a block every `pace` s, or as fast as the echo allows)
        and read them all back."""
        async with self._reading(total, timeout) as reader:
            while self.stats.sent < total and not reader.done():
                n = min(block, total - self.stats.sent)
                await self._write(pattern(self.conn_id, self.stats.sent, n))
                if pace:
                    await asyncio.sleep(pace)
            await reader
        return self.stats

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.stats.retransmits = self.link.retransmits()
            self.sock = None
