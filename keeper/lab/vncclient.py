"""A small RFB client for the bench and the demo: types like a person (one key every
50 ms) and times each key until the framebuffer update showing its echo arrives.

It speaks RFB 3.8 with no authentication, asks for 32 bpp pixels and Raw encoding
(nothing to decode but bytes), and keeps one incremental update request
outstanding. A key's echo is the first update that arrives after the key was sent:
the guest redraws the row the cursor is on for every key it handles.
"""

from __future__ import annotations

import asyncio
import struct
import time

from keeper.lab.typist import KeyLoop, SocketLink, TypistStats

XK_RETURN = 0xFF0D


class VncTypist(KeyLoop):
    def __init__(self, link: SocketLink, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, width: int, height: int,
                 period: float = 0.05) -> None:
        self.link, self.r, self.w = link, reader, writer
        self.width, self.height, self.period = width, height, period
        self.stats = TypistStats()
        self._waiting: list[float] = []  # send times of keys not yet seen echoed

    @classmethod
    async def connect(cls, ns: str, addr: tuple[str, int], *, period: float = 0.05,
                      timeout: float = 10.0) -> VncTypist:
        link = await SocketLink.connect(ns, addr, timeout)
        r, w = await asyncio.open_connection(sock=link.sock)

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
        return cls(link, r, w, width, height, period)

    def retransmits(self) -> int:
        return self.stats.retransmits if self.w.is_closing() else self.link.retransmits()

    def _request(self) -> None:
        self.w.write(struct.pack(">BBHHHH", 3, 1, 0, 0, self.width, self.height))

    async def _key(self, ch: int) -> None:
        keysym = XK_RETURN if ch == 13 else ch
        self.w.write(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))
        await self.w.drain()
        self.stats.sent.append(ch)
        self._waiting.append(time.monotonic())

    def _owed(self) -> int:
        return len(self._waiting)

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
                    self._echoed(t, now)
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
        self.stats.retransmits = self.link.retransmits()  # before the socket goes
        self.w.close()
