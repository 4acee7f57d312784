"""The WebSocket core (keeper.web.ws) and the handshake (keeper.web.http), against
wsproto as the peer: framing, masking, fragmentation, ping, close, malformed frames,
and checkpoints at every byte of a stream."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from wsproto import ConnectionType, WSConnection
from wsproto import events as we

from keeper.web import http, ws
from keeper.web.ws import WsError, WsServer, frame

HOST = "198.18.0.101:6080"


def handshake(subprotocols: tuple[str, ...] = ("binary",)) -> tuple[WSConnection, WsServer]:
    """A wsproto client and our server, after a real opening handshake."""
    client = WSConnection(ConnectionType.CLIENT)
    raw = client.send(we.Request(host=HOST, target="/websockify",
                                 subprotocols=list(subprotocols)))
    req = http.parse_request(raw)
    assert req is not None and req.wants_websocket and req.path == "/websockify"
    head, chosen = http.websocket_handshake(req)
    client.receive_data(head)
    (accepted,) = list(client.events())
    assert isinstance(accepted, we.AcceptConnection)
    assert accepted.subprotocol == chosen
    return client, WsServer()


def to_server(server: WsServer, data: bytes) -> list[ws.Event]:
    return server.receive_data(data)


def from_server(client: WSConnection, server: WsServer) -> list[we.Event]:
    client.receive_data(server.data_to_send())
    return list(client.events())


def binary(events: list[ws.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ws.BinaryData))


# -- handshake -----------------------------------------------------------------------------


def test_handshake_with_wsproto_picks_binary_and_a_right_accept_key() -> None:
    _, server = handshake()
    assert server.phase is ws.Phase.OPEN
    # RFC 6455 §1.3's own example
    assert http.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_without_a_subprotocol() -> None:
    handshake(subprotocols=())


@pytest.mark.parametrize(("change", "status"), [
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400),
    ({"Connection": "keep-alive"}, 400),
    ({"Origin": "http://evil.example"}, 403),
])
def test_bad_handshakes_are_refused(change: dict[str, str], status: int) -> None:
    headers = {"Host": HOST, "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
               "Origin": f"http://{HOST}", **change}
    raw = ("GET /websockify HTTP/1.1\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    req = http.parse_request(raw)
    assert req is not None
    with pytest.raises(http.HttpError) as exc:
        http.websocket_handshake(req)
    assert exc.value.status == status
    assert http.error_response(exc.value).startswith(f"HTTP/1.1 {status} ".encode())


def test_request_heads_parse_incrementally_and_bad_ones_fail() -> None:
    raw = b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: x\r\n\r\n"
    for n in range(len(raw)):
        assert http.parse_request(raw[:n]) is None
    req = http.parse_request(raw)
    assert req is not None and req.method == "GET" and req.path == "/novnc/core/rfb.js"
    with pytest.raises(http.HttpError) as exc:
        http.parse_request(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    assert exc.value.status == 400
    with pytest.raises(http.HttpError):
        http.parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000)


def test_the_first_websocket_bytes_after_the_head_are_kept() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    raw = client.send(we.Request(host=HOST, target="/websockify"))
    req = http.parse_request(raw + b"\x82\x80abcd")
    assert req is not None and req.rest == b"\x82\x80abcd"


# -- framing -------------------------------------------------------------------------------


def test_binary_both_ways_and_sizes_across_the_length_forms() -> None:
    client, server = handshake()
    for size in (0, 1, 125, 126, 65535, 65536, 300_000):
        data = os.urandom(size)
        events = to_server(server, client.send(we.BytesMessage(data)))
        assert binary(events) == data
        assert events[-1] == ws.BinaryData(events[-1].data, True) or size == 0
        server.send_binary(data)
        got = from_server(client, server)
        assert b"".join(e.data for e in got if isinstance(e, we.BytesMessage)) == data
    assert server.state.frames_in == 7


def test_payload_is_streamed_not_buffered() -> None:
    client, server = handshake()
    wire = client.send(we.BytesMessage(b"x" * 100_000))
    events = to_server(server, wire[:50_000])
    assert binary(events) == b"x" * (50_000 - 14)  # header: 2 + 8 length + 4 mask
    assert events[-1].message_finished is False
    assert len(server.state.header) == 0 and server.state.frame_left > 0
    events = to_server(server, wire[50_000:])
    assert binary(events) == b"x" * (100_000 - 50_000 + 14)
    assert events[-1].message_finished is True


def test_masking_at_every_offset_byte_by_byte() -> None:
    server = WsServer()
    payload = bytes(range(256)) * 3
    for mask in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x12\x34\x56\x78"):
        wire = frame(ws.BINARY, payload, mask=mask)
        assert wire[-len(payload):] != payload or mask == b"\0\0\0\0"
        got = b"".join(binary(server.receive_data(wire[i:i + 1])) for i in range(len(wire)))
        assert got == payload


def test_fragmented_messages_with_a_ping_in_the_middle() -> None:
    client, server = handshake()
    wire = (client.send(we.BytesMessage(b"one-", message_finished=False))
            + client.send(we.Ping(b"hello"))
            + client.send(we.BytesMessage(b"two-", message_finished=False))
            + client.send(we.BytesMessage(b"three", message_finished=True)))
    events = to_server(server, wire)
    assert events == [ws.BinaryData(b"one-", False), ws.Ping(b"hello"),
                      ws.BinaryData(b"two-", False), ws.BinaryData(b"three", True)]
    pong = from_server(client, server)
    assert pong == [we.Pong(payload=b"hello")]


def test_fragmented_text_is_one_message() -> None:
    client, server = handshake()
    wire = (client.send(we.TextMessage("grüß ", message_finished=False))
            + client.send(we.TextMessage("dich", message_finished=True)))
    assert to_server(server, wire) == [ws.TextMessage("grüß dich")]


def test_ping_is_answered_with_the_same_payload() -> None:
    client, server = handshake()
    assert to_server(server, client.send(we.Ping(b"\x00\x01payload"))) == [
        ws.Ping(b"\x00\x01payload")]
    assert from_server(client, server) == [we.Pong(payload=b"\x00\x01payload")]
    server.send_ping(b"ours")
    got = from_server(client, server)
    assert got == [we.Ping(payload=b"ours")]
    assert to_server(server, client.send(got[0].response())) == [ws.Pong(b"ours")]


def test_close_from_the_client_is_echoed() -> None:
    client, server = handshake()
    events = to_server(server, client.send(we.CloseConnection(code=1000, reason="bye")))
    assert events == [ws.CloseReceived(1000, "bye")]
    assert server.phase is ws.Phase.CLOSED
    (closed,) = from_server(client, server)
    assert isinstance(closed, we.CloseConnection) and closed.code == 1000
    with pytest.raises(WsError):
        server.receive_data(frame(ws.BINARY, b"late", mask=b"abcd"))
    assert server.data_to_send() == b""  # no second Close


def test_close_from_us_waits_for_the_clients() -> None:
    client, server = handshake()
    server.close(1001, "going away")
    server.close(1000)  # idempotent
    (closing,) = from_server(client, server)
    assert isinstance(closing, we.CloseConnection) and closing.code == 1001
    assert closing.reason == "going away"
    assert server.phase is ws.Phase.CLOSING
    with pytest.raises(WsError):
        server.send_binary(b"no more")
    events = to_server(server, client.send(closing.response()))
    assert events == [ws.CloseReceived(1001, "going away")] and server.phase is ws.Phase.CLOSED
    assert server.data_to_send() == b""


def test_an_empty_close_is_answered_with_an_empty_close() -> None:
    server = WsServer()
    assert server.receive_data(frame(ws.CLOSE, b"", mask=b"abcd")) == [
        ws.CloseReceived(ws.NO_STATUS, "")]
    assert server.data_to_send() == b"\x88\x00"


# -- malformed input -------------------------------------------------------------------------

M = b"\x01\x02\x03\x04"


def _raw(b0: int, b1: int, rest: bytes = b"") -> bytes:
    return bytes((b0, b1)) + rest


MALFORMED = [
    ("unmasked", frame(ws.BINARY, b"hi"), ws.PROTOCOL_ERROR),
    ("rsv1", bytes((0xC2,)) + frame(ws.BINARY, b"hi", mask=M)[1:], ws.PROTOCOL_ERROR),
    ("opcode 3", bytes((0x83,)) + frame(ws.BINARY, b"hi", mask=M)[1:], ws.PROTOCOL_ERROR),
    ("opcode 0xb", bytes((0x8B,)) + frame(ws.BINARY, b"", mask=M)[1:], ws.PROTOCOL_ERROR),
    ("fragmented ping", frame(ws.PING, b"x", fin=False, mask=M), ws.PROTOCOL_ERROR),
    ("big ping", frame(ws.PING, b"x" * 126, mask=M), ws.PROTOCOL_ERROR),
    ("lone continuation", frame(ws.CONTINUATION, b"x", mask=M), ws.PROTOCOL_ERROR),
    ("message in a message", frame(ws.BINARY, b"a", fin=False, mask=M)
     + frame(ws.BINARY, b"b", mask=M), ws.PROTOCOL_ERROR),
    ("long form for 5", _raw(0x82, 0xFE, struct.pack(">H", 5) + M + b"12345"),
     ws.PROTOCOL_ERROR),
    ("64-bit form for 300", _raw(0x82, 0xFF, struct.pack(">Q", 300) + M), ws.PROTOCOL_ERROR),
    ("64-bit msb", _raw(0x82, 0xFF, struct.pack(">Q", 1 << 63) + M), ws.PROTOCOL_ERROR),
    ("1-byte close", frame(ws.CLOSE, b"\x03", mask=M), ws.PROTOCOL_ERROR),
    ("close 1005", frame(ws.CLOSE, struct.pack(">H", 1005), mask=M), ws.PROTOCOL_ERROR),
    ("close 999", frame(ws.CLOSE, struct.pack(">H", 999), mask=M), ws.PROTOCOL_ERROR),
    ("close reason not utf-8", frame(ws.CLOSE, struct.pack(">H", 1000) + b"\xff", mask=M),
     ws.INVALID_DATA),
    ("text not utf-8", frame(ws.TEXT, b"\xc3\x28", mask=M), ws.INVALID_DATA),
]


@pytest.mark.parametrize(("name", "wire", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_frames_fail_with_a_close_and_poison(name: str, wire: bytes,
                                                       code: int) -> None:
    server = WsServer()
    good = frame(ws.BINARY, b"before", mask=M)
    with pytest.raises(WsError) as exc:
        server.receive_data(good + wire)
    assert exc.value.code == code and exc.value.fault == "client"
    assert binary(exc.value.events).startswith(b"before")  # what came first counts
    out = server.data_to_send()
    assert out[0] == 0x88 and struct.unpack(">H", out[2:4])[0] == code
    assert server.phase is ws.Phase.FAILED
    with pytest.raises(WsError):
        server.receive_data(frame(ws.BINARY, b"after", mask=M))
    client, _ = handshake()  # wsproto, as the client, reads our Close
    client.receive_data(out)
    (closed,) = list(client.events())
    assert isinstance(closed, we.CloseConnection) and closed.code == code


def test_a_text_message_over_the_limit_is_too_big() -> None:
    server = WsServer(state=ws.WsState(max_text=10))
    with pytest.raises(WsError) as exc:
        server.receive_data(frame(ws.TEXT, b"x" * 11, mask=M))
    assert exc.value.code == ws.TOO_BIG


def test_our_misuse_is_our_fault() -> None:
    server = WsServer()
    with pytest.raises(ValueError):
        server.close(1005)
    with pytest.raises(ValueError):
        server.send_ping(b"x" * 126)
    assert server.phase is ws.Phase.OPEN


# -- checkpoints -------------------------------------------------------------------------------


def _stream() -> bytes:
    client, _ = handshake()
    return b"".join([
        client.send(we.BytesMessage(b"A" * 300, message_finished=False)),
        client.send(we.Ping(b"p1")),
        client.send(we.BytesMessage(b"B" * 70_000, message_finished=True)),
        client.send(we.TextMessage("héllo")),
        client.send(we.BytesMessage(b"", message_finished=True)),
        client.send(we.BytesMessage(b"C" * 5)),
        client.send(we.CloseConnection(code=1000, reason="done")),
    ])


def _normalise(events: list[ws.Event]) -> list[object]:
    """Binary parts joined per message: where a stream is cut changes only the parts."""
    out: list[object] = []
    part = b""
    for e in events:
        if isinstance(e, ws.BinaryData):
            part += e.data
            if e.message_finished:
                out.append(("binary", part))
                part = b""
        else:
            out.append(e)
    return out


STREAM = _stream()
EXPECTED = _normalise(WsServer().receive_data(STREAM))


def test_the_reference_stream() -> None:
    assert _normalise(WsServer().receive_data(STREAM)) == [
        ws.Ping(b"p1"), ("binary", b"A" * 300 + b"B" * 70_000), ws.TextMessage("héllo"),
        ("binary", b""), ("binary", b"C" * 5), ws.CloseReceived(1000, "done")]


@settings(max_examples=200, deadline=None)
@given(cuts=hs.lists(hs.integers(min_value=0, max_value=len(STREAM)), max_size=6))
def test_checkpoint_anywhere_mid_frame_round_trips(cuts: list[int]) -> None:
    """Cut the stream anywhere (mid-header, mid-payload, between fragments), checkpoint
    through keeper.serial at each cut, go on in a new core: the same events, the same
    bytes to send."""
    server = WsServer()
    events: list[ws.Event] = []
    out = b""
    pos = 0
    for cut in sorted(cuts):
        events += server.receive_data(STREAM[pos:cut])
        pos = cut
        out += server.data_to_send()
        blob = ws.dumps_state(server.state)
        server = WsServer(state=ws.loads_state(blob))
    events += server.receive_data(STREAM[pos:])
    out += server.data_to_send()
    assert _normalise(events) == EXPECTED
    reference = WsServer()
    reference.receive_data(STREAM)
    assert out == reference.data_to_send()


def test_every_single_byte_cut_round_trips() -> None:
    for cut in range(0, len(STREAM), 97):
        server = WsServer()
        first = server.receive_data(STREAM[:cut])
        server = WsServer(state=ws.loads_state(ws.dumps_state(server.state)))
        assert _normalise(first + server.receive_data(STREAM[cut:])) == EXPECTED
