"""A small RFB client for the bench and the demo: types like a person (one key every
50 ms) and times each key until the framebuffer update showing its echo arrives.

It speaks RFB 3.8 with no authentication, asks for 32 bpp pixels and Raw encoding
(nothing to decode but bytes), and keeps one incremental update request
outstanding. A key's echo is the first update that arrives after the key was sent:
the guest redraws the row the cursor is on for every key it handles.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field

from keeper.lab import netns
from keeper.lab.typist import script

XK_RETURN = 0xFF0D


@dataclass
class VncTypistStats:
    sent: bytearray = field(default_factory=bytearray)
    echo_latencies_ms: list[float] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)
    updates: int = 0
    errors: list[str] = field(default_factory=list)
    retransmits: int = 0
    mismatches: int = 0

    @property
    def pause_ms_max(self) -> float:
        return max(self.echo_latencies_ms, default=0.0)


class VncTypist:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 width: int, height: int, period: float = 0.05) -> None:
        self.r, self.w = reader, writer
        self.width, self.height, self.period = width, height, period
        self.stats = VncTypistStats()
        self._waiting: list[float] = []  # send times of keys not yet seen echoed
        from keeper.net.tcpinfo import tcp_info

        self._sock = writer.get_extra_info("socket")
        self._tcp_info = tcp_info
        self._base = tcp_info(self._sock).total_retrans

    @classmethod
    async def connect(cls, ns: str, addr: tuple[str, int], *, period: float = 0.05,
                      timeout: float = 10.0) -> VncTypist:
        with netns.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, addr), timeout)
        r, w = await asyncio.open_connection(sock=sock)

        async def exactly(n: int) -> bytes:
            return await asyncio.wait_for(r.readexactly(n), timeout)

        version = await exactly(12)
        if not version.startswith(b"RFB 003."):
            raise ConnectionError(f"not an RFB server: {version!r}")
        w.write(b"RFB 003.008\n")
        (n,) = await exactly(1)
        types = await exactly(n) if n else b""
        if 1 not in types:
            raise ConnectionError(f"server offers security types {list(types)}, not None")
        w.write(b"\x01")
        if struct.unpack(">I", await exactly(4))[0] != 0:
            raise ConnectionError("security handshake failed")
        w.write(b"\x01")  # shared
        width, height = struct.unpack(">HH", await exactly(4))
        await exactly(16)
        (name_len,) = struct.unpack(">I", await exactly(4))
        await exactly(name_len)
        # 32 bpp true colour little-endian, Raw only
        w.write(struct.pack(">B3x", 0) + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255,
                                                     255, 16, 8, 0))
        w.write(struct.pack(">BxHi", 2, 1, 0))
        w.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # one full frame first
        await w.drain()
        return cls(r, w, width, height, period)

    def retransmits(self) -> int:
        try:
            return self._tcp_info(self._sock).total_retrans - self._base
        except OSError:
            return self.stats.retransmits

    def _request(self) -> None:
        self.w.write(struct.pack(">BBHHHH", 3, 1, 0, 0, self.width, self.height))

    async def _key(self, ch: int) -> None:
        keysym = XK_RETURN if ch == 13 else ch
        self.w.write(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))
        await self.w.drain()
        self.stats.sent.append(ch)
        self._waiting.append(time.monotonic())

    async def _read(self) -> None:
        while True:
            (kind,) = await self.r.readexactly(1)
            if kind == 0:  # FramebufferUpdate
                (n,) = struct.unpack(">xH", await self.r.readexactly(3))
                for _ in range(n):
                    _x, _y, w, h, enc = struct.unpack(">HHHHi", await self.r.readexactly(12))
                    if enc != 0:
                        raise ConnectionError(f"asked for Raw, got encoding {enc}")
                    await self.r.readexactly(w * h * 4)
                now = time.monotonic()
                self.stats.updates += 1
                for t in self._waiting:
                    ms = (now - t) * 1e3
                    self.stats.echo_latencies_ms.append(ms)
                    self.stats.samples.append((t, ms))
                self._waiting.clear()
                self._request()
                await self.w.drain()
            elif kind == 2:  # Bell
                continue
            elif kind == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await self.r.readexactly(7))
                await self.r.readexactly(length)
            else:
                raise ConnectionError(f"unexpected server message {kind}")

    async def run(self, stop: asyncio.Event, settle: float = 10.0) -> VncTypistStats:
        reader = asyncio.create_task(self._read())
        line = 0
        try:
            while not stop.is_set():
                for ch in script(line):
                    if reader.done():
                        reader.result()
                    await self._key(ch)
                    await asyncio.sleep(self.period)
                line += 1
            deadline = time.monotonic() + settle
            while self._waiting and time.monotonic() < deadline and not reader.done():
                await asyncio.sleep(0.02)
            if reader.done():
                reader.result()
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            from keeper.aio import cancel_and_wait

            exc = await cancel_and_wait(reader)
            if exc is not None and not self.stats.errors and not isinstance(
                    exc, asyncio.IncompleteReadError):
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        return self.stats

    async def type_text(self, text: bytes) -> None:
        for ch in text:
            await self._key(ch)

    async def watch_frames(self, frames: list[float], pixels: list[int]) -> None:
        """Read updates for ever (until cancelled), keeping one request outstanding;
        note each update's arrival time and how many pixels it carried."""
        while True:
            (kind,) = await self.r.readexactly(1)
            if kind != 0:
                raise ConnectionError(f"unexpected server message {kind}")
            (n,) = struct.unpack(">xH", await self.r.readexactly(3))
            px = 0
            for _ in range(n):
                _x, _y, w, h, _enc = struct.unpack(">HHHHi", await self.r.readexactly(12))
                await self.r.readexactly(w * h * 4)
                px += w * h
            frames.append(time.monotonic())
            pixels.append(px)
            self._request()
            await self.w.drain()

    def close(self) -> None:
        self.stats.retransmits = self.retransmits()
        self.w.close()
