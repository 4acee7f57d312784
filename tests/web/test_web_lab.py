"""The web console's connections move with Domain R mid-request and mid-frame (root):
half an HTTP request head and half a WebSocket frame cross a co-migration, and each is
completed on the target as if nothing happened."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as we

from keeper import ports
from keeper.errors import KeeperError
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.net import netns
from keeper.web.assets import Assets, novnc_root

pytestmark = pytest.mark.root
GUEST = "guest1"


class WsClient:
    """A blocking WebSocket client (wsproto) carrying RFB, for the lab's client ns."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock, self.ws, self.rfb = sock, WSConnection(ConnectionType.CLIENT), b""
        self.events: list[we.Event] = []
        sock.sendall(self.ws.send(we.Request(host=host, target="/websockify",
                                             subprotocols=["binary"])))
        while not any(isinstance(e, we.AcceptConnection) for e in self.events):
            self._pull()

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed")
        self.ws.receive_data(data)
        for e in self.ws.events():
            if isinstance(e, we.BytesMessage):
                self.rfb += bytes(e.data)
            else:
                self.events.append(e)

    def read(self, n: int) -> bytes:
        while len(self.rfb) < n:
            self._pull()
        out, self.rfb = self.rfb[:n], self.rfb[n:]
        return out

    def wire(self, data: bytes) -> bytes:
        return self.ws.send(we.Message(data=data))

    def rfb_handshake(self) -> None:
        assert self.read(12) == b"RFB 003.008\n"
        self.sock.sendall(self.wire(b"RFB 003.008\n"))
        assert self.read(2) == b"\x01\x01"
        self.sock.sendall(self.wire(b"\x01"))
        assert self.read(4) == b"\0\0\0\0"
        self.sock.sendall(self.wire(b"\x01"))
        self.read(20)
        (n,) = struct.unpack(">I", self.read(4))
        self.read(n)


def key(ch: str) -> bytes:
    return struct.pack(">BBxxI", 4, 1, ord(ch)) + struct.pack(">BBxxI", 4, 0, ord(ch))


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


@pytest.mark.skipif(not Assets("x").installed, reason="noVNC not installed (scripts/setup)")
@pytest.mark.parametrize("fault", [None, "restore"], ids=["moved", "rolled-back"])
async def test_half_a_request_and_half_a_frame_cross_a_co_migration(
    lab: LabSpec, fault: str | None
) -> None:
    """Moved to b; or, with b's agent crashing as it restores Domain R (after the source
    dumped every socket), rolled back on a: the same connections go on either way."""
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=32)
    ip = doc["ip"]
    before = (await ops.journal(lab, GUEST))["count"]
    with netns.entered(lab.client_ns):
        page = socket.create_connection((ip, ports.WEB), timeout=15)
        wsock = socket.create_connection((ip, ports.WEB), timeout=15)
    try:
        page.sendall(b"GET /novnc/core/rfb.js HTTP/1.1\r\nHo")  # half a request head
        client = WsClient(wsock, f"{ip}:{ports.WEB}")
        client.rfb_handshake()
        wsock.sendall(client.wire(key("k")))
        frame = client.wire(key("w") + key("s"))  # one masked frame: 6 + 32 bytes
        wsock.sendall(frame[:9])  # its header and 3 bytes of its payload
        await asyncio.sleep(0.5)  # Domain R has read them: they are in its state now
        status = await ops.status(lab)
        (dom,) = [d for h in status["hosts"] for d in h["domrs"] if d["name"] == GUEST]
        kinds = sorted(s["kind"] for s in dom["domr"]["web_sessions"])
        assert kinds == ["http", "websocket"]

        if fault is None:
            trace = await ops.migrate(lab, GUEST, "b")
            assert trace["trace_ok"] and not trace.get("left_behind")
        else:
            await ops.call(lab, "b", "POST", "/debug/fault",
                           json={"point": fault, "action": "crash"})
            with pytest.raises(KeeperError, match="stays on a"):
                await ops.migrate(lab, GUEST, "b")

        wsock.sendall(frame[9:])  # the rest of the frame, to the target
        page.sendall(b"st: x\r\n\r\n")  # the rest of the request head
        resp = read_all(page)
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == (novnc_root() / "core/rfb.js").read_bytes()
        journal = b""
        for _ in range(100):
            journal = (await ops.journal(lab, GUEST))["journal"][before:]
            if len(journal) >= 3:
                break
            await asyncio.sleep(0.1)
        assert journal == b"kws"

        # the moved session still speaks WebSocket: a ping is answered, then a clean close
        wsock.sendall(client.ws.send(we.Ping(b"after the move")))
        while not any(isinstance(e, we.Pong) for e in client.events):
            client._pull()
        assert we.Pong(payload=b"after the move") in client.events
        wsock.sendall(client.ws.send(we.CloseConnection(code=1000, reason="bye")))
        client.ws.receive_data(read_all(wsock))
        closes = [e for e in client.ws.events() if isinstance(e, we.CloseConnection)]
        assert [c.code for c in closes] == [1000]
    finally:
        page.close()
        wsock.close()
    status = await ops.status(lab)
    want = "b" if fault is None else "a"
    assert [d["host"] for d in status["domains"] if d["name"] == GUEST] == [want]
