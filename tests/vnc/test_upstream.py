"""The upstream RFB client core (keeper.vnc.upstream) against a fake server written here
from rfbproto, byte by byte; and its asyncio adapter over a socketpair.

Server messages are built with struct below and what the client writes is parsed
here too: nothing on the server side reuses keeper.vnc code, except one test that
pairs the client with keeper's own RfbServer (two independent implementations).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper import serial
from keeper.errors import ProtocolError
from keeper.vnc import keysyms, rfb
from keeper.vnc.framebuffer import MemoryFramebuffer
from keeper.vnc.upstream import (
    CHECKPOINT_KIND,
    XT_KEYCODES,
    Bell,
    Connected,
    CutText,
    Damage,
    Leds,
    Phase,
    Ready,
    Resized,
    UpstreamClient,
    UpstreamError,
    UpstreamRefused,
    UpstreamState,
    keysym_for,
)
from keeper.vnc.upstream_link import UpstreamClosed, UpstreamDisplay, UpstreamTimeout

KEY_A, KEY_B, KEY_C = 30, 48, 46  # linux/input-event-codes.h

# --- the fake server: server messages (rfbproto "Server to Client Messages") ---------

TRUE_COLOUR = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
COLOUR_MAP = struct.pack(">BBBBHHHBBBxxx", 8, 8, 0, 0, 0, 0, 0, 0, 0, 0)


def version(minor: int = 8, major: int = 3) -> bytes:
    return b"RFB %03d.%03d\n" % (major, minor)


def string(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


def server_init(w: int, h: int, fmt: bytes = TRUE_COLOUR, name: bytes = b"QEMU") -> bytes:
    return struct.pack(">HH", w, h) + fmt + string(name)


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding)


def raw(x: int, y: int, pixels: np.ndarray) -> bytes:
    """A Raw rectangle of (h, w, 4) BGRX pixels: our format is exactly those bytes."""
    h, w = pixels.shape[:2]
    return header(x, y, w, h, 0) + pixels.astype(np.uint8).tobytes()


def copy_rect(sx: int, sy: int, x: int, y: int, w: int, h: int) -> bytes:
    return header(x, y, w, h, 1) + struct.pack(">HH", sx, sy)


def desktop_size(w: int, h: int) -> bytes:
    return header(0, 0, w, h, -223)


def ext_key_ack(w: int = 0, h: int = 0) -> bytes:
    return header(0, 0, w, h, -258)  # QEMU sends the screen size; no data follows


def led_state(state: int) -> bytes:
    return header(0, 0, 1, 1, -261) + bytes((state,))


def bell() -> bytes:
    return b"\x02"


def server_cut_text(text: bytes) -> bytes:
    return struct.pack(">Bxxx", 3) + string(text)


def colour_map(first: int, colours: Sequence[tuple[int, int, int]]) -> bytes:
    return struct.pack(">BxHH", 1, first, len(colours)) + b"".join(
        struct.pack(">HHH", *c) for c in colours)


# --- what the client sends (rfbproto "Client to Server Messages") ---------------------


def client_messages(data: bytes) -> list[tuple[object, ...]]:
    """Parse the client's normal-phase output; fails on anything malformed."""
    out: list[tuple[object, ...]] = []
    pos = 0
    while pos < len(data):
        kind = data[pos]
        if kind == 0:
            assert data[pos + 1:pos + 4] == b"\0\0\0"
            out.append(("pixel-format", data[pos + 4:pos + 20]))
            pos += 20
        elif kind == 2:
            (n,) = struct.unpack_from(">xxH", data, pos)
            out.append(("encodings", struct.unpack_from(f">{n}i", data, pos + 4)))
            pos += 4 + 4 * n
        elif kind == 3:
            out.append(("request", *struct.unpack_from(">xBHHHH", data, pos)))
            pos += 10
        elif kind == 4:
            down, keysym = struct.unpack_from(">xBxxI", data, pos)
            out.append(("key", down, keysym))
            pos += 8
        elif kind == 5:
            out.append(("pointer", *struct.unpack_from(">xBHH", data, pos)))
            pos += 6
        elif kind == 255:
            sub, down, keysym, keycode = struct.unpack_from(">xBHII", data, pos)
            assert sub == 0
            out.append(("xkey", down, keysym, keycode))
            pos += 12
        else:
            raise AssertionError(f"client sent message type {kind}")
    assert pos == len(data), "client output ends inside a message"
    return out


def full(w: int, h: int) -> tuple[object, ...]:
    return ("request", 0, 0, 0, w, h)


def incremental(w: int, h: int) -> tuple[object, ...]:
    return ("request", 1, 0, 0, w, h)


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    px[..., 3] = 0
    return px


def fb_pixels(client: UpstreamClient) -> np.ndarray:
    return client.fb.reshape(client.height, client.width, 4)


def handshake(w: int = 64, h: int = 48, *, ext: bool = True) -> UpstreamClient:
    """A client through ServerInit, with the QEMU-style notifications, output drained."""
    c = UpstreamClient()
    c.receive_data(version(8))
    assert c.data_to_send() == b"RFB 003.008\n"
    c.receive_data(b"\x01\x01")
    assert c.data_to_send() == b"\x01"
    c.receive_data(struct.pack(">I", 0))
    assert c.data_to_send() == b"\x01"  # ClientInit, shared
    events = c.receive_data(server_init(w, h))
    assert events == [Connected(w, h, "QEMU")]
    c.data_to_send()
    if ext:
        assert c.receive_data(update(ext_key_ack(w, h))) == []
    assert c.receive_data(update(led_state(0))) == [Leds(0)]
    return c


def ready_client(w: int = 64, h: int = 48, *, ext: bool = True,
                 px: np.ndarray | None = None) -> UpstreamClient:
    c = handshake(w, h, ext=ext)
    px = picture(w, h) if px is None else px
    events = c.receive_data(update(raw(0, 0, px)))
    assert events == [Damage(((0, 0, w, h),)), Ready()]
    assert client_messages(c.data_to_send()) == [incremental(w, h)]
    return c


# --- handshake -------------------------------------------------------------------------


def test_handshake_38_asks_for_our_format_encodings_and_a_full_update() -> None:
    c = UpstreamClient()
    assert c.receive_data(version(8)) == []
    assert c.data_to_send() == b"RFB 003.008\n"
    c.receive_data(b"\x02\x02\x01")  # VNC auth and None offered: we take None
    assert c.data_to_send() == b"\x01"
    assert c.phase is Phase.SECURITY_RESULT
    c.receive_data(b"\0\0\0\0")
    assert c.data_to_send() == b"\x01"
    events = c.receive_data(server_init(720, 400, name=b"QEMU (vm1)"))
    assert events == [Connected(720, 400, "QEMU (vm1)")]
    sent = client_messages(c.data_to_send())
    assert sent == [
        ("pixel-format", TRUE_COLOUR),  # 32 bpp LE true colour, red 16 green 8 blue 0
        ("encodings", (0, 1, -223, -258, -261)),
        full(720, 400),
    ]
    assert c.fb.shape == (400, 720 * 4) and c.fb.dtype == np.uint8
    assert not c.ready


@pytest.mark.parametrize(("server", "we_say"), [
    ((3, 7), b"RFB 003.007\n"), ((3, 3), b"RFB 003.003\n"), ((3, 5), b"RFB 003.003\n"),
    ((3, 889), b"RFB 003.008\n"), ((4, 0), b"RFB 003.008\n"), ((3, 8), b"RFB 003.008\n"),
])
def test_version_we_answer(server: tuple[int, int], we_say: bytes) -> None:
    c = UpstreamClient()
    c.receive_data(version(server[1], server[0]))
    assert c.data_to_send() == we_say


def test_handshake_37_has_no_security_result_for_none() -> None:
    c = UpstreamClient()
    c.receive_data(version(7) + b"\x01\x01")
    assert c.data_to_send() == b"RFB 003.007\n\x01\x01"  # version, None, ClientInit
    assert c.phase is Phase.INIT
    assert c.receive_data(server_init(8, 8)) == [Connected(8, 8, "QEMU")]


def test_handshake_33_server_decides() -> None:
    c = UpstreamClient()
    c.receive_data(version(3) + struct.pack(">I", 1))
    assert c.data_to_send() == b"RFB 003.003\n\x01"
    assert c.receive_data(server_init(8, 8))[0] == Connected(8, 8, "QEMU")


@pytest.mark.parametrize(("stream", "words"), [
    (version(8) + b"\x00" + string(b"too many clients"), "too many clients"),
    (version(8) + b"\x01\x02", "not None"),
    (version(8) + b"\x01\x01" + struct.pack(">I", 1) + string(b"go away"), "go away"),
    (version(3) + struct.pack(">I", 0) + string(b"no thanks"), "no thanks"),
    (version(3) + struct.pack(">I", 2), "VNC Authentication"),
    (version(0, 2), "RFB 2.0"),
])
def test_refusals_name_the_server_and_carry_its_reason(stream: bytes, words: str) -> None:
    c = UpstreamClient()
    with pytest.raises(UpstreamRefused) as info:
        c.receive_data(stream)
    assert info.value.fault == "server"
    assert words in str(info.value)
    assert c.phase is Phase.FAILED


def test_refusal_reason_may_arrive_in_pieces() -> None:
    c = UpstreamClient()
    stream = version(8) + b"\x00" + string(b"busy")
    for b in stream[:-1]:
        c.receive_data(bytes((b,)))
    with pytest.raises(UpstreamRefused, match="busy"):
        c.receive_data(stream[-1:])


def test_not_rfb_fails_at_the_first_wrong_byte() -> None:
    c = UpstreamClient()
    with pytest.raises(UpstreamError, match="not an RFB ProtocolVersion") as info:
        c.receive_data(b"SSH-")
    assert info.value.fault == "server"


def test_poisoned_core_refuses_everything_but_data_to_send() -> None:
    c = handshake()
    with pytest.raises(UpstreamError):
        c.receive_data(b"\x07")
    assert c.state.failure == "unknown server message type 7"
    with pytest.raises(UpstreamError, match="already failed") as info:
        c.receive_data(bell())
    assert info.value.fault == "us"
    with pytest.raises(UpstreamError, match="already failed"):
        c.key(keysyms.KEY_ENTER, True)
    assert c.data_to_send() == b""


def test_input_before_the_session_is_our_fault_and_does_not_poison() -> None:
    c = UpstreamClient()
    with pytest.raises(UpstreamError, match="before the RFB session") as info:
        c.key(keysyms.KEY_ENTER, True)
    assert info.value.fault == "us"
    c.receive_data(version(8))
    assert c.phase is Phase.SECURITY


# --- updates ---------------------------------------------------------------------------


def test_first_full_update_fills_the_framebuffer_and_makes_ready() -> None:
    px = picture(64, 48, seed=1)
    c = ready_client(64, 48, px=px)
    assert np.array_equal(fb_pixels(c), px)
    assert c.read(3, 5, 2, 2) == px[5:7, 3:5].tobytes()
    assert c.ready and c.state.updates == 3  # ext key ack, LED state, the frame


def test_notifications_do_not_answer_our_request() -> None:
    """QEMU sends the Extended Key Event and LED State pseudo-rectangles on its own; a
    client that took them for the answer would wait for nothing, and be 'ready' blank."""
    c = handshake(ext=True)
    assert c.data_to_send() == b""  # no new request: the full one is still owed
    assert not c.ready and c.ext_keys
    assert c.receive_data(update(led_state(4))) == [Leds(4)]
    assert c.data_to_send() == b"" and not c.ready


def test_incremental_updates_one_request_at_a_time() -> None:
    c = ready_client(64, 48)
    px = fb_pixels(c).copy()
    patch = picture(10, 4, seed=2)
    events = c.receive_data(update(raw(5, 6, patch), raw(0, 0, patch[:1, :1])))
    assert events == [Damage(((5, 6, 10, 4), (0, 0, 1, 1)))]
    px[6:10, 5:15] = patch
    px[0, 0] = patch[0, 0]
    assert np.array_equal(fb_pixels(c), px)
    assert client_messages(c.data_to_send()) == [incremental(64, 48)]
    # a Bell or cut text is not an update: no request for it
    assert c.receive_data(bell() + server_cut_text(b"clip")) == [Bell(), CutText(b"clip")]
    assert c.data_to_send() == b""
    # an empty update answers the request
    assert c.receive_data(update()) == []
    assert client_messages(c.data_to_send()) == [incremental(64, 48)]


def test_raw_rows_are_written_as_they_arrive() -> None:
    c = ready_client(16, 8)
    patch = picture(16, 8, seed=3)
    stream = update(raw(0, 0, patch))
    c.receive_data(stream[:4 + 12 + 16 * 4 * 3 + 10])  # three rows and a bit
    assert c.phase is Phase.RAW
    assert np.array_equal(fb_pixels(c)[:3], patch[:3])
    assert len(c.state.inbuf) == 10  # only the partial row is buffered
    assert c.receive_data(stream[4 + 12 + 16 * 4 * 3 + 10:]) == [Damage(((0, 0, 16, 8),))]
    assert np.array_equal(fb_pixels(c), patch)


def test_copy_rect_overlapping_moves_like_a_scroll() -> None:
    c = ready_client(32, 24)
    before = fb_pixels(c).copy()
    events = c.receive_data(update(copy_rect(0, 2, 0, 0, 32, 20)))
    assert events == [Damage(((0, 0, 32, 20),))]
    expect = before.copy()
    expect[0:20] = before[2:22]
    assert np.array_equal(fb_pixels(c), expect)


def test_desktop_size_resizes_and_asks_for_everything() -> None:
    c = ready_client(64, 48)
    events = c.receive_data(update(raw(0, 0, picture(4, 4)), desktop_size(80, 60)))
    assert events == [Resized(80, 60)]  # the raw rect drew on the old screen: no damage
    assert c.fb.shape == (60, 80 * 4) and not c.fb.any()
    assert client_messages(c.data_to_send()) == [full(80, 60)]
    px = picture(80, 60, seed=4)
    assert c.receive_data(update(raw(0, 0, px))) == [Damage(((0, 0, 80, 60),))]  # Ready once
    assert np.array_equal(fb_pixels(c), px)
    assert client_messages(c.data_to_send()) == [incremental(80, 60)]


def test_unsolicited_desktop_size_as_qemu_sends_it() -> None:
    """QEMU announces a resize on its own while our incremental request is pending, then
    answers that request with the whole new screen; our full request merges with it."""
    c = ready_client(64, 48)
    assert c.receive_data(update(desktop_size(32, 16))) == [Resized(32, 16)]
    assert client_messages(c.data_to_send()) == [full(32, 16)]
    px = picture(32, 16, seed=5)
    assert c.receive_data(update(raw(0, 0, px))) == [Damage(((0, 0, 32, 16),))]
    assert client_messages(c.data_to_send()) == [incremental(32, 16)]


def test_refresh_asks_for_a_full_update_even_with_one_outstanding() -> None:
    c = ready_client(64, 48)
    c.refresh()
    assert client_messages(c.data_to_send()) == [full(64, 48)]
    c.receive_data(update(raw(0, 0, picture(64, 48, seed=6))))
    assert client_messages(c.data_to_send()) == [incremental(64, 48)]


def test_colour_map_is_an_error_when_everything_was_true_colour() -> None:
    c = ready_client()
    with pytest.raises(UpstreamError, match="SetColourMapEntries") as info:
        c.receive_data(colour_map(0, [(1, 2, 3)]))
    assert info.value.fault == "server"


def test_colour_map_greeting_of_a_colour_mapped_server_is_tolerated() -> None:
    c = UpstreamClient()
    c.receive_data(version(8) + b"\x01\x01" + b"\0\0\0\0")
    c.receive_data(server_init(8, 8, fmt=COLOUR_MAP))
    assert c.receive_data(colour_map(0, [(0, 0, 0)] * 256)) == []
    c.receive_data(update(raw(0, 0, picture(8, 8))))
    with pytest.raises(UpstreamError, match="SetColourMapEntries"):
        c.receive_data(colour_map(0, [(0, 0, 0)]))


@pytest.mark.parametrize(("message", "words"), [
    (update(raw(60, 0, picture(5, 1))), "outside the 64x48"),
    (update(copy_rect(0, 40, 0, 0, 8, 9)), "CopyRect source"),
    (update(header(0, 0, 1, 1, 16)), "encoding 16, which we did not ask for"),
    (update(desktop_size(9000, 10)), "larger than we accept"),
    (struct.pack(">BxxxI", 3, 1 << 21), "ServerCutText of 2097152 bytes"),
    (b"\x96", "unknown server message type 150"),  # EndOfContinuousUpdates: not asked
    (b"\xff\x01", "unknown server message type 255"),  # QEMU audio: not asked
])
def test_server_errors_name_the_server(message: bytes, words: str) -> None:
    c = ready_client(64, 48)
    with pytest.raises(UpstreamError, match=words) as info:
        c.receive_data(bell() + message)
    assert info.value.fault == "server"
    assert info.value.events == [Bell()]  # what came before still counts
    assert c.phase is Phase.FAILED


def test_oversized_server_init_is_refused_not_allocated() -> None:
    c = UpstreamClient()
    c.receive_data(version(8) + b"\x01\x01" + b"\0\0\0\0")
    with pytest.raises(UpstreamError, match="larger than we accept"):
        c.receive_data(server_init(65535, 65535))


def test_pairs_with_keepers_own_rfb_server() -> None:
    """Two independent implementations in memory: keeper's RfbServer (which answers a
    resize with a DesktopSize-only update) and this client."""
    fb = MemoryFramebuffer(40, 30, picture(40, 30, seed=7))
    server = rfb.RfbServer(width=40, height=30, name="keeper")
    server.connection_made()
    client = UpstreamClient()

    def pump() -> list[object]:
        events: list[object] = []
        for _ in range(10):
            down = server.data_to_send()
            if down:
                events += client.receive_data(down)
            up = client.data_to_send()
            if up:
                server.receive_data(up)
            if server.wants_update():
                p = server.pending_request
                assert p is not None
                rects = [] if p.incremental else [rfb.Rect(0, 0, fb.width, fb.height)]
                server.send_update(fb, rects)
            if not down and not up and not server.wants_update():
                break
        return events

    events = pump()
    assert Ready() in events
    assert np.array_equal(fb_pixels(client), fb.pixels)
    fb.resize(50, 20)
    fb.fill(0, 0, 50, 20, (9, 8, 7))
    server.resize(50, 20)
    events = pump()
    assert Resized(50, 20) in events
    assert np.array_equal(fb_pixels(client)[..., :3], fb.pixels[..., :3])


# --- input -----------------------------------------------------------------------------


def test_keys_go_out_as_qemu_extended_key_events_with_xt_codes() -> None:
    c = ready_client(ext=True)
    for code, down in [(keysyms.KEY_LEFTSHIFT, True), (keysyms.KEY_4, True),
                       (keysyms.KEY_4, False), (keysyms.KEY_LEFTSHIFT, False),
                       (keysyms.KEY_RIGHT, True), (keysyms.KEY_RIGHT, False),
                       (keysyms.KEY_PAUSE, True), (keysyms.KEY_SYSRQ, True),
                       (keysyms.KEY_KPENTER, True), (keysyms.KEY_RIGHTALT, True)]:
        assert c.key(code, down)
    assert client_messages(c.data_to_send()) == [
        ("xkey", 1, 0, 0x2A), ("xkey", 1, 0, 0x05), ("xkey", 0, 0, 0x05),
        ("xkey", 0, 0, 0x2A), ("xkey", 1, 0, 0xCD), ("xkey", 0, 0, 0xCD),  # e0 4d
        ("xkey", 1, 0, 0xC6), ("xkey", 1, 0, 0x54), ("xkey", 1, 0, 0x9C),  # rfbproto
        ("xkey", 1, 0, 0xB8),
    ]


def test_without_the_extension_keys_become_keysyms_under_our_shift() -> None:
    c = ready_client(ext=False)
    sent = [c.key(keysyms.KEY_4, True), c.key(keysyms.KEY_4, False),
            c.key(keysyms.KEY_RIGHTSHIFT, True), c.key(keysyms.KEY_4, True),
            c.key(KEY_A, True), c.key(keysyms.KEY_RIGHTSHIFT, False),
            c.key(keysyms.KEY_4, False), c.key(keysyms.KEY_ENTER, True),
            c.key(82, True)]  # KEY_KP0: no keysym known for it
    assert sent == [True] * 8 + [False]
    assert client_messages(c.data_to_send()) == [
        ("key", 1, ord("4")), ("key", 0, ord("4")), ("key", 1, 0xFFE2),
        ("key", 1, ord("$")), ("key", 1, ord("A")), ("key", 0, 0xFFE2),
        ("key", 0, ord("4")), ("key", 1, 0xFF0D),
    ]


def test_pointer_is_clamped_to_the_screen() -> None:
    c = ready_client(64, 48)
    c.pointer(10, 20, 1)
    c.pointer(-5, 1000, 0x104)
    assert client_messages(c.data_to_send()) == [("pointer", 1, 10, 20),
                                                 ("pointer", 4, 0, 47)]


def test_xt_table_follows_rfbproto() -> None:
    assert XT_KEYCODES[KEY_A] == 0x1E  # rfbproto's examples
    assert XT_KEYCODES[keysyms.KEY_RIGHT] == 0xCD
    assert XT_KEYCODES[keysyms.KEY_PAUSE] == 0xC6  # "MUST be sent as 0xc6"
    assert XT_KEYCODES[keysyms.KEY_SYSRQ] == 0x54  # "SHOULD be sent as 0x54"
    codes = list(XT_KEYCODES.values())
    assert len(set(codes)) == len(codes), "two Linux keys on one XT code"
    assert all(0 < c < 0x100 and c not in (0x7F, 0x80, 0xE0) for c in codes)
    # every key Domain R's VNC server can produce has an XT code and a keysym
    for keysym in (*range(0x20, 0x7F), *range(0xFE00, 0x10000)):
        keys = keysyms.keysym_to_keys(keysym)
        if keys is not None:
            assert keys[0] in XT_KEYCODES, (hex(keysym), keys)
            assert keysym_for(keys[0], keys[1]) is not None


# --- checkpoints -----------------------------------------------------------------------


def test_state_round_trips_mid_raw_rectangle() -> None:
    c = ready_client(16, 8)
    patch = picture(16, 8, seed=8)
    stream = update(copy_rect(0, 0, 0, 4, 16, 4), raw(0, 0, patch))
    cut = 4 + 16 + 12 + 16 * 4 * 2 + 7
    c.receive_data(stream[:cut])
    blob = serial.dumps(CHECKPOINT_KIND, c.state)
    state = serial.loads(CHECKPOINT_KIND, blob, UpstreamState)
    assert state == c.state and state.phase is Phase.RAW
    resumed = UpstreamClient(state=state, fb=c.fb.copy())
    whole = ready_client(16, 8)
    assert resumed.receive_data(stream[cut:]) == whole.receive_data(stream)
    assert np.array_equal(resumed.fb, whole.fb)
    assert resumed.data_to_send() == whole.data_to_send()


# --- hypothesis: whatever the server sends, a protocol error or events; never a hang ----

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

W, H = 24, 16
u16 = st.integers(0, 0xFFFF)
small = st.integers(0, 30)


@st.composite
def raw_rects(draw: st.DrawFn) -> bytes:
    x, y = draw(st.integers(0, W)), draw(st.integers(0, H))
    w, h = draw(st.integers(0, W + 2 - x)), draw(st.integers(0, H + 2 - y))
    return raw(x, y, np.full((h, w, 4), draw(st.integers(0, 255)), np.uint8))


rects = st.one_of(
    raw_rects(),
    st.builds(copy_rect, small, small, small, small, small, small),
    st.builds(desktop_size, st.integers(0, 40), st.integers(0, 40)),
    st.builds(ext_key_ack, u16, u16),
    st.builds(led_state, st.integers(0, 255)),
    st.builds(header, u16, u16, u16, u16, st.sampled_from([2, 5, 16, -224, -239, 7])),
)
server_messages = st.one_of(
    st.lists(rects, max_size=4).map(lambda rs: update(*rs)),
    st.just(bell()),
    st.binary(max_size=40).map(server_cut_text),
    st.lists(st.tuples(u16, u16, u16), max_size=3).map(lambda cs: colour_map(0, cs)),
    st.binary(min_size=1, max_size=12),
)
streams = st.lists(server_messages, max_size=12).map(b"".join)


def feed(client: UpstreamClient, data: bytes, cuts: Iterable[int]) -> list[object]:
    """Feed `data` split at `cuts`, answering nothing; only ProtocolError may escape."""
    events: list[object] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        try:
            events += client.receive_data(data[a:b])
        except ProtocolError as exc:
            assert client.phase is Phase.FAILED
            events += getattr(exc, "events", [])
            events.append(("error", str(exc)))
            break
        client.data_to_send()
    return events


@FUZZ
@given(stream=streams, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_fuzz_normal_phase(stream: bytes, cuts: list[int]) -> None:
    whole = feed(ready_client(W, H), stream, [])
    split = ready_client(W, H)
    assert feed(split, stream, cuts) == whole  # how bytes are split changes nothing
    if split.phase is not Phase.FAILED:
        assert split.fb.shape == (split.height, split.width * 4)
        client_messages(split.data_to_send())


handshakes = st.one_of(
    st.sampled_from([version(8), version(7), version(3), version(5), b"RFB 003.00",
                     b"RFB 012.345\n", b"RFX"]),
    st.binary(max_size=16),
)


@FUZZ
@given(parts=st.lists(st.one_of(handshakes, st.binary(max_size=8),
                                st.builds(server_init, small, small, st.just(TRUE_COLOUR),
                                          st.binary(max_size=8)),
                                server_messages), max_size=8),
       cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_from_the_first_byte(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    whole = feed(UpstreamClient(), stream, [])
    assert feed(UpstreamClient(), stream, cuts) == whole


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes_in_every_phase(data: bytes) -> None:
    for make in (UpstreamClient, handshake, ready_client):
        c = make()
        feed(c, data, [])


@FUZZ
@given(code=st.integers(-5, 300), down=st.booleans(), ext=st.booleans())
def test_fuzz_any_keycode_is_sent_or_declined(code: int, down: bool, ext: bool) -> None:
    c = ready_client(ext=ext)
    if c.key(code, down):
        (msg,) = client_messages(c.data_to_send())
        assert msg[0] == ("xkey" if ext and code in XT_KEYCODES else "key")
    else:
        assert c.data_to_send() == b""


# --- the asyncio adapter over a socketpair ---------------------------------------------


class FakeQemu:
    """The server end of a socketpair, driven by the test: handshake, frames, and
    reading (or not reading) what the client writes."""

    def __init__(self, sock: socket.socket, w: int = 32, h: int = 16) -> None:
        self.sock, self.w, self.h = sock, w, h
        self.sock.setblocking(False)
        self.got = b""

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def read(self) -> list[tuple[object, ...]]:
        """Everything the client wrote since the last read (normal phase messages)."""
        new = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            new += chunk
        self.got += new
        return client_messages(new)

    async def until(self, pred: object, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():  # type: ignore[operator]
                await asyncio.sleep(0.002)

    async def greet(self, display: UpstreamDisplay) -> list[tuple[object, ...]]:
        self.send(version(8) + b"\x01\x01" + b"\0\0\0\0" + server_init(self.w, self.h))
        await self.until(lambda: len(self._peek()) >= 12 + 1 + 1 + 20 + 24 + 10)
        self.sock.recv(14)  # version, security type, ClientInit
        first = self.read()
        self.send(update(ext_key_ack(self.w, self.h)) + update(led_state(0))
                  + update(raw(0, 0, picture(self.w, self.h, seed=9))))
        return first

    def _peek(self) -> bytes:
        try:
            return self.sock.recv(1 << 16, socket.MSG_PEEK)
        except BlockingIOError:
            return b""


async def adapter_pair(w: int = 32, h: int = 16) -> tuple[UpstreamDisplay, FakeQemu]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    display = UpstreamDisplay(ours)
    fake = FakeQemu(theirs, w, h)
    connecting = asyncio.create_task(display.connect(timeout=5))
    await asyncio.sleep(0)
    first = await fake.greet(display)
    await connecting
    assert first == [("pixel-format", TRUE_COLOUR), ("encodings", (0, 1, -223, -258, -261)),
                     full(w, h)]
    return display, fake


async def test_adapter_connects_over_a_connected_socket_and_follows_damage() -> None:
    display, fake = await adapter_pair()
    try:
        assert display.connected and display.ready.is_set()
        assert (display.width, display.height) == (32, 16)
        assert display.read(0, 0, 32, 16) == picture(32, 16, seed=9).tobytes()
        damage: list[list[tuple[int, int, int, int]]] = []
        sizes: list[tuple[int, int]] = []
        display.on_damage = damage.append
        display.on_resize = lambda w, h: sizes.append((w, h))
        fake.send(update(raw(1, 2, picture(3, 4, seed=10))))
        await fake.until(lambda: damage)
        assert damage == [[(1, 2, 3, 4)]]
        fake.send(update(desktop_size(8, 8)))
        await fake.until(lambda: sizes)
        assert sizes == [(8, 8)] and display.width == 8
        sent: list[tuple[object, ...]] = []
        await fake.until(lambda: sent.extend(fake.read()) or full(8, 8) in sent)
    finally:
        display.close()
        fake.sock.close()


async def test_put_input_hold_drain_and_room() -> None:
    display, fake = await adapter_pair()
    rooms: list[int] = []
    display.on_room = lambda: rooms.append(1)
    try:
        fake.read()
        assert display.put_input([("key", KEY_A, 1), ("key", KEY_A, 0),
                                  ("pos", 3, 4)])
        with pytest.raises(UpstreamTimeout):
            await display.drain(0.05)  # the fake server has not read the bytes
        assert fake.read() == [("xkey", 1, 0, 0x1E), ("xkey", 0, 0, 0x1E),
                               ("pointer", 0, 3, 4)]
        await display.drain(1.0)  # read: SIOCOUTQ is 0
        display.hold()
        assert not display.put_input([("key", KEY_B, 1)])
        await asyncio.sleep(0.02)
        assert rooms == []  # held: only release_hold() gives room
        display.release_hold()
        assert rooms == [1]
        assert display.put_input([("key", KEY_B, 1)])
        # above the high-water mark: refused until the server reads, then on_room
        display.high_water = 0
        assert not display.put_input([("key", KEY_B, 0)])
        await asyncio.sleep(0.02)
        assert rooms == [1]
        fake.read()
        await fake.until(lambda: len(rooms) == 2)
        assert display.put_input([("key", KEY_B, 0)])
        with pytest.raises(ValueError, match="not"):
            display.put_input([("click", 1, 1)])
    finally:
        display.close()
        fake.sock.close()


async def test_drain_fails_when_qemu_dies_with_input_unread() -> None:
    display, fake = await adapter_pair()
    closed: list[str] = []
    display.on_close = closed.append
    fake.read()
    assert display.put_input([("key", KEY_C, 1)])
    fake.sock.close()  # unread bytes die with the peer: SIOCOUTQ reads 0 again
    with pytest.raises(UpstreamClosed):
        await display.drain(1.0)
    assert not display.connected and len(closed) == 1
    assert not display.put_input([("key", KEY_C, 0)])
    display.close()  # idempotent
    assert len(closed) == 1


async def test_connect_fails_on_a_refusing_server_and_times_out_on_a_silent_one() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.sendall(version(8) + b"\x00" + string(b"busy"))
    with pytest.raises(UpstreamRefused, match="busy"):
        await UpstreamDisplay(ours).connect(timeout=2)
    theirs.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    display = UpstreamDisplay(ours)
    with pytest.raises(UpstreamTimeout):
        await display.connect(timeout=0.1)
    assert not display.connected
    theirs.close()
    with pytest.raises(UpstreamClosed):
        await UpstreamDisplay("/nonexistent/keeper-vnc.sock").connect(timeout=1)
