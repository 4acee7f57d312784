"""A tiny RFB client for tests, paired with an RfbServer in memory (h11 tests/helpers style).

Client messages are built here from rfbproto with struct, and the server's output is
parsed by tests/vnc/decoder.py: nothing on the client side reuses keeper.vnc code.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, modes

from keeper.vnc.framebuffer import Framebuffer
from keeper.vnc.rfb import CopyRect, Event, Rect, RfbServer, dumps_state, loads_state
from tests.vnc.decoder import SERVER_NATIVE, ClientScreen, Format, Reader, Rectangle, server_init

try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # cryptography < 43
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

# -- client messages (rfbproto "Client to Server Messages")


def set_pixel_format(fmt: Format) -> bytes:
    return b"\x00\x00\x00\x00" + fmt.wire()


def set_encodings(codes: Sequence[int]) -> bytes:
    return struct.pack(">BxH", 2, len(codes)) + b"".join(struct.pack(">i", c) for c in codes)


def update_request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h)


def key_event(keysym: int, down: bool) -> bytes:
    return struct.pack(">BBxxI", 4, int(down), keysym)


def pointer_event(buttons: int, x: int, y: int) -> bytes:
    return struct.pack(">BBHH", 5, buttons, x, y)


def cut_text(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 6, len(text)) + text


def des_response(password: bytes, challenge: bytes) -> bytes:
    """VNC Authentication, client side, from the spec text: key = password truncated or
    zero-padded to 8 bytes, the lowest bit of each byte taken first (so reverse them)."""
    key = bytearray(password[:8] + b"\0" * (8 - len(password[:8])))
    for i, b in enumerate(key):
        key[i] = sum(((b >> bit) & 1) << (7 - bit) for bit in range(8))
    enc = Cipher(TripleDES(bytes(key) * 3), modes.ECB()).encryptor()
    return enc.update(challenge) + enc.finalize()


# -- a connected pair


class Session:
    """An RfbServer and the client's view of the screen, talking in memory."""

    def __init__(self, server: RfbServer, screen: ClientScreen, password: bytes | None,
                 rng: random.Random) -> None:
        self.server = server
        self.screen = screen
        self.password = password
        self.rng = rng

    def send(self, data: bytes, *, chunk: int | None = None) -> list[Event]:
        """Client → server, optionally in pieces of `chunk` bytes."""
        if chunk is None:
            return self.server.receive_data(data)
        events: list[Event] = []
        for i in range(0, len(data), chunk):
            events += self.server.receive_data(data[i:i + chunk])
        return events

    def update(self, fb: Framebuffer, rects: Sequence[Rect],
               copies: Sequence[CopyRect] = ()) -> list[Rectangle]:
        """The server answers the pending request; the client decodes the update."""
        self.server.send_update(fb, rects, copies)
        data = self.server.data_to_send()
        r = Reader(data)
        rects_seen = self.screen.read_message(r)
        assert r.done(), "one update, nothing else"
        return rects_seen

    def checkpoint(self) -> None:
        """Serialise the server's state, drop the server, resume from the record."""
        state = loads_state(dumps_state(self.server.state))
        assert state == self.server.state
        self.server = RfbServer(width=1, height=1, name="ignored with state",
                                password=self.password, random=self.rng.randbytes,
                                state=state)


def connect(
    width: int = 64,
    height: int = 48,
    *,
    version: bytes = b"RFB 003.008\n",
    password: bytes | None = None,
    fmt: Format | None = None,
    encodings: Sequence[int] | None = None,
    name: str = "keeper test",
    shared: bool = True,
    seed: int = 0,
) -> Session:
    """Handshake a new server and a client; optionally set pixel format and encodings."""
    rng = random.Random(seed)
    server = RfbServer(width=width, height=height, name=name, password=password,
                       random=rng.randbytes)
    server.connection_made()
    assert server.data_to_send() == b"RFB 003.008\n"
    assert server.receive_data(version) == []
    out = server.data_to_send()
    minor = int(version[8:11])
    if minor in (7, 8):
        assert out[0] == 1, out
        sec = out[1]
        assert server.receive_data(bytes((sec,))) == []
        out = server.data_to_send()
    else:
        sec = int.from_bytes(out[:4], "big")
        out = out[4:]
    if sec == 2:
        assert len(out) == 16
        assert server.receive_data(des_response(password or b"", out)) == []
        assert server.data_to_send() == b"\x00\x00\x00\x00"
    elif minor == 8:
        assert out == b"\x00\x00\x00\x00"
    else:
        assert out == b""
    events = server.receive_data(bytes((int(shared),)))
    assert len(events) == 1
    w, h, native, got_name, used = server_init(out := server.data_to_send())
    assert (w, h, native, got_name, used) == (width, height, SERVER_NATIVE, name, len(out))
    screen = ClientScreen(width, height, native)
    session = Session(server, screen, password, rng)
    if fmt is not None:
        session.send(set_pixel_format(fmt))
        screen.fmt = fmt
    if encodings is not None:
        session.send(set_encodings(encodings))
    return session
