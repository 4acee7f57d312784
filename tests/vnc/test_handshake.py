"""Version and security handshakes, ClientInit/ServerInit, failures and their wire bytes."""

from __future__ import annotations

import struct

import pytest

from keeper.errors import ProtocolError
from keeper.vnc.rfb import (
    AuthenticationFailed,
    Phase,
    Ready,
    RfbError,
    RfbServer,
    vnc_auth_response,
)
from tests.vnc.helpers import connect, des_response

CHALLENGE = bytes(range(0x10, 0x20))


def server(password: bytes | None = None, **kw: object) -> RfbServer:
    s = RfbServer(width=640, height=480, name="guest1", password=password,
                  random=lambda n: CHALLENGE[:n], **kw)  # type: ignore[arg-type]
    s.connection_made()
    assert s.data_to_send() == b"RFB 003.008\n"
    return s


def reason_string(text: str) -> bytes:
    return struct.pack(">I", len(text)) + text.encode()


VERSIONS = [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n",
            b"RFB 003.005\n", b"RFB 003.889\n", b"RFB 003.006\n"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("password", [None, b"secret"])
def test_handshake_succeeds(version: bytes, password: bytes | None) -> None:
    session = connect(640, 480, version=version, password=password)
    expected_minor = int(version[8:11]) if version[8:11] in (b"007", b"008") else 3
    st = session.server.state
    assert st.version_minor == expected_minor
    assert st.security_type == (2 if password else 1)
    assert st.phase is Phase.NORMAL and st.challenge == b""
    assert session.server.data_to_send() == b""


def test_3_3_with_vnc_auth_exact_bytes() -> None:
    s = server(b"pw")
    assert s.receive_data(b"RFB 003.003\n") == []
    assert s.data_to_send() == b"\x00\x00\x00\x02" + CHALLENGE
    assert s.receive_data(des_response(b"pw", CHALLENGE)) == []
    assert s.data_to_send() == b"\x00\x00\x00\x00"  # SecurityResult OK, also in 3.3
    assert s.receive_data(b"\x00") == [Ready(shared=False)]


def test_3_3_without_auth_goes_straight_to_client_init() -> None:
    s = server()
    assert s.receive_data(b"RFB 003.003\n") == []
    assert s.data_to_send() == b"\x00\x00\x00\x01"
    assert s.receive_data(b"\x01") == [Ready(shared=True)]


def test_3_7_none_has_no_security_result_3_8_has() -> None:
    s7, s8 = server(), server()
    s7.receive_data(b"RFB 003.007\n")
    s8.receive_data(b"RFB 003.008\n")
    assert s7.data_to_send() == s8.data_to_send() == b"\x01\x01"
    s7.receive_data(b"\x01")
    s8.receive_data(b"\x01")
    assert s7.data_to_send() == b""
    assert s8.data_to_send() == b"\x00\x00\x00\x00"
    assert s7.phase is s8.phase is Phase.INIT


def test_server_init_bytes() -> None:
    s = server()
    s.receive_data(b"RFB 003.008\n\x01")
    s.data_to_send()
    assert s.receive_data(b"\x01") == [Ready(shared=True)]
    assert s.data_to_send() == (
        struct.pack(">HH", 640, 480)
        + bytes((32, 24, 0, 1)) + struct.pack(">HHH", 255, 255, 255) + bytes((16, 8, 0, 0, 0, 0))
        + reason_string("guest1")
    )


def test_whole_handshake_in_one_chunk_and_byte_by_byte() -> None:
    stream = b"RFB 003.008\n" + b"\x02" + des_response(b"secret", CHALLENGE) + b"\x01"
    a = server(b"secret")
    assert a.receive_data(stream) == [Ready(shared=True)]
    b = server(b"secret")
    events = []
    for i in range(len(stream)):
        events += b.receive_data(stream[i:i + 1])
    assert events == [Ready(shared=True)]
    assert a.data_to_send() == b.data_to_send()
    assert a.state == b.state


@pytest.mark.parametrize(("version", "wire"), [
    (b"RFB 003.003\n", b"\x00\x00\x00\x01"),
    (b"RFB 003.007\n", b"\x00\x00\x00\x01"),
    (b"RFB 003.008\n", b"\x00\x00\x00\x01" + reason_string("authentication failed")),
])
def test_wrong_password(version: bytes, wire: bytes) -> None:
    s = server(b"secret")
    s.receive_data(version)
    if version != b"RFB 003.003\n":
        s.receive_data(b"\x02")
    s.data_to_send()
    with pytest.raises(AuthenticationFailed) as err:
        s.receive_data(des_response(b"Secret", CHALLENGE))
    assert isinstance(err.value, ProtocolError)
    assert err.value.fault == "client"
    assert err.value.wire == wire
    assert s.data_to_send() == wire  # queued once
    assert s.data_to_send() == b""
    assert s.phase is Phase.FAILED
    with pytest.raises(RfbError, match="already failed: authentication failed"):
        s.receive_data(b"\x01")


def test_password_longer_than_8_bytes_is_truncated() -> None:
    s = server(b"longpassword")
    s.receive_data(b"RFB 003.008\n\x02")
    s.data_to_send()
    s.receive_data(des_response(b"longpass", CHALLENGE))
    assert s.data_to_send() == b"\x00\x00\x00\x00"
    assert vnc_auth_response(b"longpassword", CHALLENGE) == des_response(b"longpass", CHALLENGE)


def test_unoffered_security_type() -> None:
    s8 = server(b"secret")
    s8.receive_data(b"RFB 003.008\n")
    assert s8.data_to_send() == b"\x01\x02"
    with pytest.raises(RfbError) as err:
        s8.receive_data(b"\x01")  # None, though we asked for a password
    assert err.value.fault == "client"
    assert s8.data_to_send() == b"\x00\x00\x00\x01" + reason_string(err.value.reason)
    s7 = server()
    s7.receive_data(b"RFB 003.007\n")
    s7.data_to_send()
    with pytest.raises(RfbError) as err:
        s7.receive_data(b"\x10")
    assert err.value.wire == b"" and s7.data_to_send() == b""  # 3.7 just closes


@pytest.mark.parametrize(("version", "form"), [
    (b"RFB 004.001\n", b"\x00"),  # claims to be newer: list form, zero types
    (b"RFB 005.000\n", b"\x00"),
    (b"RFB 002.000\n", b"\x00\x00\x00\x00"),  # older: 3.3 form, security-type 0
    (b"RFB 000.000\n", b"\x00\x00\x00\x00"),
])
def test_unsupported_major_version_gets_a_reason(version: bytes, form: bytes) -> None:
    s = server()
    with pytest.raises(RfbError) as err:
        s.receive_data(version)
    assert "unsupported RFB version" in err.value.reason
    assert s.data_to_send() == form + reason_string(err.value.reason)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"RFB 3.8\n", b"RFB 003,008\n",
                                     b"\x16\x03\x01", b"rfb 003.008\n", b"RFB 003.008\r"])
def test_not_rfb_fails_at_the_first_wrong_byte(garbage: bytes) -> None:
    s = server()
    with pytest.raises(RfbError) as err:
        for i in range(len(garbage)):  # byte by byte: no waiting for 12 bytes
            s.receive_data(garbage[i:i + 1])
    assert err.value.fault == "client"
    assert s.data_to_send() == b""


def test_data_before_connection_made_is_our_fault() -> None:
    s = RfbServer(width=8, height=8, name="x")
    with pytest.raises(RfbError) as err:
        s.receive_data(b"RFB 003.008\n")
    assert err.value.fault == "us"


def test_connection_made_twice() -> None:
    s = server()
    with pytest.raises(RfbError) as err:
        s.connection_made()
    assert err.value.fault == "us"


def test_bad_random_source() -> None:
    s = RfbServer(width=8, height=8, name="x", password=b"pw", random=lambda n: b"short")
    s.connection_made()
    with pytest.raises(RfbError) as err:
        s.receive_data(b"RFB 003.003\n")
    assert err.value.fault == "us"


def test_default_random_gives_fresh_challenges() -> None:
    challenges = set()
    for _ in range(3):
        s = RfbServer(width=8, height=8, name="x", password=b"pw")
        s.connection_made()
        s.receive_data(b"RFB 003.008\n\x02")
        challenges.add(s.data_to_send()[-16:])
    assert len(challenges) == 3


def test_close_reason_during_auth_3_8_and_3_7() -> None:
    s8 = server(b"pw")
    s8.receive_data(b"RFB 003.008\n\x02")
    s8.data_to_send()
    wire = s8.close_reason("server shutting down")
    assert wire == b"\x00\x00\x00\x01" + reason_string("server shutting down")
    assert s8.data_to_send() == wire
    assert s8.close_reason("again") == b""  # idempotent
    s7 = server(b"pw")
    s7.receive_data(b"RFB 003.007\n\x02")
    s7.data_to_send()
    assert s7.close_reason("bye") == b"\x00\x00\x00\x01"


def test_close_reason_has_no_wire_after_init() -> None:
    session = connect()
    assert session.server.close_reason("bye") == b""
    assert session.server.phase is Phase.FAILED
    with pytest.raises(RfbError):
        session.server.receive_data(b"\x04")


def test_resize_before_server_init_changes_server_init() -> None:
    s = server()
    s.receive_data(b"RFB 003.008\n\x01")
    s.resize(800, 600)
    s.data_to_send()
    s.receive_data(b"\x00")
    assert s.data_to_send()[:4] == struct.pack(">HH", 800, 600)


def test_bad_size_at_construction() -> None:
    with pytest.raises(ValueError):
        RfbServer(width=0, height=10, name="x")
    with pytest.raises(ValueError):
        RfbServer(width=70000, height=10, name="x")
