"""Client-to-server messages after the handshake: events, buffering, limits, errors."""

from __future__ import annotations

import struct

import pytest

from keeper.errors import ProtocolError
from keeper.vnc.pixels import PixelFormat
from keeper.vnc.rfb import (
    MAX_CUT_TEXT,
    CutText,
    EncodingsChanged,
    KeyEvent,
    Phase,
    PixelFormatChanged,
    PointerEvent,
    RfbError,
    UpdateRequest,
    UpdateRequested,
)
from tests.vnc.formats import FORMATS
from tests.vnc.helpers import (
    connect,
    cut_text,
    key_event,
    pointer_event,
    set_encodings,
    set_pixel_format,
    update_request,
)

STREAM = [
    (set_pixel_format(FORMATS["rgb565-be"]),
     PixelFormatChanged(PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0))),
    (set_encodings([16, 5, 1, 0, -223]), EncodingsChanged((16, 5, 1, 0, -223))),
    (update_request(True, 1, 2, 3, 4), UpdateRequested(True, 1, 2, 3, 4)),
    (key_event(0x61, True), KeyEvent(keysym=0x61, down=True)),
    (key_event(0xFFE1, False), KeyEvent(keysym=0xFFE1, down=False)),
    (pointer_event(0b101, 300, 7), PointerEvent(buttons=5, x=300, y=7)),
    (cut_text(b"caf\xe9\nline"), CutText(text=b"caf\xe9\nline")),
    (cut_text(b""), CutText(text=b"")),
    (set_encodings([]), EncodingsChanged(())),
    (key_event(0xFFFFFFFF, True), KeyEvent(keysym=0xFFFFFFFF, down=True)),
]


def test_every_message_in_one_chunk() -> None:
    session = connect(640, 480)
    data = b"".join(m for m, _ in STREAM)
    assert session.send(data) == [e for _, e in STREAM]
    assert session.server.state.inbuf == b""


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 13, 64])
def test_every_split_gives_the_same_events(chunk: int) -> None:
    session = connect(640, 480)
    data = b"".join(m for m, _ in STREAM)
    assert session.send(data, chunk=chunk) == [e for _, e in STREAM]


def test_partial_message_waits_in_the_state() -> None:
    session = connect(640, 480)
    msg = key_event(0x41, True)
    assert session.send(msg[:5]) == []
    assert session.server.state.inbuf == msg[:5]
    assert session.send(msg[5:] + pointer_event(1, 2, 3)[:1]) == [KeyEvent(0x41, True)]
    assert session.server.state.inbuf == b"\x05"


def test_update_requests_are_cropped_and_merged() -> None:
    session = connect(100, 80)
    server = session.server
    assert not server.wants_update()
    assert session.send(update_request(True, 90, 70, 50, 50)) == [
        UpdateRequested(True, 90, 70, 10, 10)]
    assert server.wants_update()
    session.send(update_request(True, 0, 0, 10, 10))
    assert server.pending_request == UpdateRequest(True, 0, 0, 100, 80)
    session.send(update_request(False, 5, 5, 1, 1))
    assert server.pending_request == UpdateRequest(False, 0, 0, 100, 80)


def test_empty_request_still_solicits_an_update() -> None:
    session = connect(100, 80)
    assert session.send(update_request(True, 500, 500, 10, 10)) == [
        UpdateRequested(True, 100, 80, 0, 0)]
    assert session.server.wants_update()
    session.send(update_request(True, 1, 2, 3, 4))
    assert session.server.pending_request == UpdateRequest(True, 1, 2, 3, 4)


def test_cut_text_limit() -> None:
    session = connect()
    text = b"x" * MAX_CUT_TEXT
    assert session.send(cut_text(text), chunk=65536) == [CutText(text)]
    with pytest.raises(RfbError, match="ClientCutText") as err:
        session.send(struct.pack(">BxxxI", 6, MAX_CUT_TEXT + 1))  # refused on the header
    assert err.value.fault == "client"


def test_colour_map_format_is_refused_clearly() -> None:
    session = connect()
    fmt = bytearray(FORMATS["bgr233"].wire())
    fmt[3] = 0  # true-colour-flag off
    with pytest.raises(RfbError, match="colour-map pixel formats are not supported"):
        session.send(b"\x00\x00\x00\x00" + bytes(fmt))


@pytest.mark.parametrize("wire", [
    bytes((24, 24, 0, 1)) + struct.pack(">HHH", 255, 255, 255) + bytes((16, 8, 0, 0, 0, 0)),
    bytes((16, 16, 0, 1)) + struct.pack(">HHH", 31, 63, 30) + bytes((11, 5, 0, 0, 0, 0)),
    bytes((16, 16, 0, 1)) + struct.pack(">HHH", 31, 63, 31) + bytes((12, 5, 0, 0, 0, 0)),
])
def test_other_bad_formats(wire: bytes) -> None:
    session = connect()
    with pytest.raises(RfbError, match="SetPixelFormat"):
        session.send(b"\x00\x00\x00\x00" + wire)


@pytest.mark.parametrize("kind", [1, 7, 8, 150, 248, 251, 255])
def test_unknown_message_type(kind: int) -> None:
    session = connect()
    with pytest.raises(ProtocolError) as err:
        session.send(key_event(0x62, True) + bytes((kind,)) + b"\x00" * 20)
    assert err.value.fault == "client"
    assert f"unknown client message type {kind}" in str(err.value)
    assert err.value.events == [KeyEvent(0x62, True)]  # what came before still counts
    assert session.server.phase is Phase.FAILED
    with pytest.raises(RfbError, match="already failed"):
        session.send(key_event(0x63, True))
    with pytest.raises(RfbError):
        session.server.resize(10, 10)
    assert session.server.data_to_send() == b""  # RFB has no failure message here
