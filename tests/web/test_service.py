"""The web console service on real loopback sockets (no root): noVNC's files over HTTP,
RFB sessions over WebSocket (wsproto as the browser), a malformed session closed alone."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as we

from keeper.vnc.keysyms import keysym_to_keys
from keeper.vnc.server import VncHost
from keeper.web import ws
from keeper.web.assets import Assets, novnc_root
from keeper.web.service import WebHost

W, H = 64, 48


class Screen:
    """The Display keeper.vnc.server needs: a fixed picture; input recorded."""

    def __init__(self) -> None:
        self.width, self.height = W, H
        rng = np.random.default_rng(1)
        self.pixels = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
        self.groups: list[list[tuple[str, int, int]]] = []
        self.on_room: Callable[[], None] = lambda: None

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        return self.pixels[y:y + h, x:x + w].tobytes()

    def put_input(self, group: list[tuple[str, int, int]]) -> bool:
        self.groups.append(group)
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def web() -> AsyncIterator[tuple[WebHost, Screen]]:
    screen = Screen()
    vnc = VncHost(screen, "127.0.0.1", "guest", port=free_port())  # type: ignore[arg-type]
    host = WebHost(vnc, "127.0.0.1", "guest", port=free_port())
    screen.on_room = host.on_room
    for svc in (vnc, host):
        svc.bind()
        svc.start()
    try:
        yield host, screen
    finally:
        await host.close()
        await vnc.close()


async def get(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # until the server's FIN
    writer.close()
    return data


def split(resp: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


@pytest.mark.skipif(not Assets("x").installed, reason="noVNC not installed (scripts/setup)")
async def test_the_page_and_novncs_files(web: tuple[WebHost, Screen]) -> None:
    host, _ = web
    status, headers, body = split(await get(host.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK" and headers["Content-Type"].startswith("text/html")
    assert b'import RFB from "/novnc/core/rfb.js"' in body and b"/websockify" in body
    status, headers, body = split(await get(
        host.port, b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status.endswith("200 OK") and headers["Content-Type"].startswith("text/javascript")
    assert body == (novnc_root() / "core/rfb.js").read_bytes()
    assert int(headers["Content-Length"]) == len(body)
    status, headers, body = split(await get(
        host.port, b"HEAD /novnc/core/websock.js HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status.endswith("200 OK") and body == b"" and int(headers["Content-Length"]) > 0
    for path in (b"/novnc/../../../../etc/passwd", b"/novnc/core/../package.json",
                 b"/novnc/docs/API.md", b"/etc/passwd", b"/novnc/core/nothere.js"):
        status, _, _ = split(await get(host.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status.startswith("HTTP/1.1 404"), path
    status, _, _ = split(await get(host.port, b"POST / HTTP/1.1\r\nHost: x\r\n"
                                                b"Content-Length: 0\r\n\r\n"))
    assert status.startswith("HTTP/1.1 405")
    status, _, _ = split(await get(host.port, b"GARBAGE\r\n\r\n"))
    assert status.startswith("HTTP/1.1 400")


class Browser:
    """A WebSocket RFB client: wsproto for the framing, RFB by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.rfb = b""
        self.closed: we.CloseConnection | None = None

    @classmethod
    async def open(cls, port: int) -> Browser:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        b = cls(reader, writer)
        writer.write(b.ws.send(we.Request(host=f"127.0.0.1:{port}", target="/websockify",
                                          subprotocols=["binary"])))
        while True:
            b.ws.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            evs = list(b.ws.events())
            if any(isinstance(e, we.AcceptConnection) for e in evs):
                b._take(evs)
                return b

    def _take(self, evs: list[we.Event]) -> None:
        for e in evs:
            if isinstance(e, we.BytesMessage):
                self.rfb += bytes(e.data)
            elif isinstance(e, we.CloseConnection):
                self.closed = e

    async def read(self, n: int) -> bytes:
        while len(self.rfb) < n:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise EOFError
            self.ws.receive_data(data)
            self._take(list(self.ws.events()))
        out, self.rfb = self.rfb[:n], self.rfb[n:]
        return out

    def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(we.Message(data=data)))

    async def rfb_handshake(self) -> tuple[int, int]:
        assert await self.read(12) == b"RFB 003.008\n"
        self.send(b"RFB 003.008\n")
        assert await self.read(2) == b"\x01\x01"  # one type: None
        self.send(b"\x01")
        assert await self.read(4) == b"\0\0\0\0"
        self.send(b"\x01")  # shared
        w, h = struct.unpack(">HH", await self.read(4))
        await self.read(16)
        (n,) = struct.unpack(">I", await self.read(4))
        assert await self.read(n) == b"guest"
        return w, h

    async def eof(self) -> bytes:
        rest = b""
        while data := await asyncio.wait_for(self.reader.read(65536), 10):
            rest += data
        return rest


async def test_rfb_over_websocket_and_a_malformed_session_closed_alone(
    web: tuple[WebHost, Screen],
) -> None:
    host, screen = web
    good, bad = await Browser.open(host.port), await Browser.open(host.port)
    assert await good.rfb_handshake() == (W, H)
    await bad.rfb_handshake()
    # a full update request, raw: the browser sees the screen's pixels
    good.send(struct.pack(">BBHHHH", 3, 0, 0, 0, W, H))
    head = await good.read(4 + 12)
    assert head[:4] == b"\0\0\0\x01" and struct.unpack(">i", head[12:16])[0] == 0
    pixels = np.frombuffer(await good.read(W * H * 4), np.uint8).reshape(H, W, 4)
    assert np.array_equal(pixels[:, :, :3], screen.pixels[:, :, :3])
    # the bad one sends an unmasked frame: Close 1002, then the server closes TCP
    bad.writer.write(b"\x82\x02hi")
    rest = await bad.eof()
    assert rest[0] == 0x88 and struct.unpack(">H", rest[2:4])[0] == ws.PROTOCOL_ERROR
    # the good one types on
    good.send(struct.pack(">BBxxI", 4, 1, ord("a")) + struct.pack(">BBxxI", 4, 0, ord("a")))
    for _ in range(100):
        if len(screen.groups) >= 2:
            break
        await asyncio.sleep(0.02)
    code, _ = keysym_to_keys(ord("a")) or (0, False)
    assert screen.groups == [[("key", code, 1)], [("key", code, 0)]]
    assert [s["kind"] for s in host.status()] == ["websocket"]
    # a ping in between RFB messages is answered; the session goes on
    good.writer.write(good.ws.send(we.Ping(b"are you there")))
    good.send(struct.pack(">BBHHHH", 3, 1, 0, 0, W, H))
    data = await asyncio.wait_for(good.reader.read(65536), 10)
    good.ws.receive_data(data)
    assert we.Pong(payload=b"are you there") in list(good.ws.events())
    # the browser closes: the closing handshake, then EOF
    good.writer.write(good.ws.send(we.CloseConnection(code=1000)))
    rest = await good.eof()
    good.ws.receive_data(rest)
    assert any(isinstance(e, we.CloseConnection) and e.code == 1000 for e in good.ws.events())
    assert host.status() == []


async def test_http_connections_are_bounded(web: tuple[WebHost, Screen]) -> None:
    host, _ = web
    host.max_http = 2
    idle = [await asyncio.open_connection("127.0.0.1", host.port) for _ in range(2)]
    for _ in range(100):
        if len(host.conns) == 2:
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed at once
    writer.close()
    for r, w in idle:  # the first two are still served
        w.write(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 404")
        w.close()
