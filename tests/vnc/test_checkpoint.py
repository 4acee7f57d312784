"""Checkpoints: the state is plain data, and a restored server continues the same
connection — half-read messages, owed updates and the client's one zlib stream included."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest

from keeper import serial
from keeper.errors import CheckpointError
from keeper.vnc import encodings as enc
from keeper.vnc.encodings import ZLIB_WINDOW, ZlibState, ZlibStream
from keeper.vnc.rfb import (
    CHECKPOINT_KIND,
    KeyEvent,
    Phase,
    Ready,
    Rect,
    RfbError,
    RfbServer,
    RfbState,
    UpdateRequest,
    dumps_state,
    loads_state,
)
from tests.vnc.formats import FORMATS
from tests.vnc.helpers import connect, des_response, key_event, update_request
from tests.vnc.images import framebuffer
from tests.vnc.test_updates import assert_screen_matches


def restore(server: RfbServer, password: bytes | None = None,
            challenge: bytes = bytes(16)) -> RfbServer:
    blob = serial.dumps(CHECKPOINT_KIND, server.state)
    state = serial.loads(CHECKPOINT_KIND, blob, RfbState)
    assert state == server.state
    return RfbServer(width=1, height=1, name="-", password=password,
                     random=lambda n: challenge, state=state)


def test_state_round_trips_in_every_phase() -> None:
    challenge = bytes(range(16))
    s = RfbServer(width=300, height=200, name="dómain", password=b"pw",
                  random=lambda n: challenge)
    phases = [s.phase]
    s.connection_made()
    for chunk in (b"RFB 003.008\n", b"\x02", des_response(b"pw", challenge), b"\x01"):
        s = restore(s, b"pw", challenge)
        phases.append(s.phase)
        s.receive_data(chunk)
    s = restore(s, b"pw", challenge)
    phases.append(s.phase)
    assert phases == [Phase.NEW, Phase.VERSION, Phase.SECURITY, Phase.VNC_AUTH, Phase.INIT,
                      Phase.NORMAL]
    out = s.data_to_send()
    assert out.startswith(b"RFB 003.008\n\x01\x02" + challenge + b"\x00\x00\x00\x00")
    assert out.endswith(b"d\xc3\xb3main")


def test_failed_state_round_trips_and_stays_failed() -> None:
    session = connect()
    with pytest.raises(RfbError):
        session.send(b"\x09")
    s = restore(session.server)
    assert s.phase is Phase.FAILED and "unknown client message type 9" in s.state.failure
    with pytest.raises(RfbError, match="already failed"):
        s.receive_data(b"")


def test_checkpoint_kind_and_damage_are_checked() -> None:
    blob = dumps_state(connect().server.state)
    assert loads_state(blob) is not None
    with pytest.raises(CheckpointError):
        serial.loads("console", blob, RfbState)
    with pytest.raises(CheckpointError):
        loads_state(blob[:-5] + b"\xc1" * 5)


def test_restored_during_auth_needs_the_password_again() -> None:
    s = RfbServer(width=8, height=8, name="x", password=b"pw", random=lambda n: b"c" * n)
    s.connection_made()
    s.receive_data(b"RFB 003.008\n\x02")
    assert b"pw" not in dumps_state(s.state)  # no secret in a checkpoint
    good = restore(s, b"pw")
    good.receive_data(des_response(b"pw", b"c" * 16))
    assert good.phase is Phase.INIT
    bad = restore(s, None)
    with pytest.raises(RfbError) as err:
        bad.receive_data(des_response(b"pw", b"c" * 16))
    assert err.value.fault == "us"


def test_mid_stream_checkpoints_keep_the_zlib_stream() -> None:
    """Partial message buffered, an update owed, a ZRLE stream in progress: checkpoint,
    restore, continue — several times; the client's single inflater decodes it all."""
    width, height = 200, 120
    session = connect(width, height, fmt=FORMATS["native"], encodings=[enc.ZRLE])
    inflater = session.screen.inflater
    rng = np.random.default_rng(7)
    fb = framebuffer("text", width, height, seed=1)
    session.send(update_request(False, 0, 0, width, height))
    session.update(fb, [Rect(0, 0, width, height)])
    assert_screen_matches(session.screen, fb)
    kinds = ["text", "palette16", "noise", "blocks", "stripes", "palette127"]
    for round_, kind in enumerate(kinds):
        # an update owed and half a key event in the buffer when the checkpoint is taken
        session.send(update_request(True, 0, 0, width, height))
        pending = key_event(0x61 + round_, True)
        assert session.send(pending[:3]) == []
        blob = dumps_state(session.server.state)
        assert session.server.state.zlib.started and session.server.state.zlib.window
        session.server = RfbServer(width=1, height=1, name="-", state=loads_state(blob))
        assert session.server.wants_update()
        assert session.server.pending_request == UpdateRequest(True, 0, 0, width, height)
        assert session.send(pending[3:]) == [KeyEvent(0x61 + round_, True)]
        new = framebuffer(kind, width, height, seed=round_)
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        fb.pixels[y:, x:] = new.pixels[y:, x:]
        session.update(fb, [Rect(x, y, width - x, height - y)])
        assert_screen_matches(session.screen, fb)
    assert session.screen.inflater is inflater and not inflater.unused_data


def test_restored_stream_still_refers_back_into_the_window() -> None:
    """The same picture again after a restore compresses to almost nothing: the new
    compressor really starts from the old window, and the client agrees with it."""
    width, height = 96, 64
    fb = framebuffer("noise", width, height, seed=3)
    session = connect(width, height, encodings=[enc.ZRLE])
    session.send(update_request(False, 0, 0, width, height))
    session.server.send_update(fb, [Rect(0, 0, width, height)])
    first = session.server.data_to_send()
    session.screen.read_all(first)
    session.checkpoint()
    session.send(update_request(False, 0, 0, width, height))
    session.server.send_update(fb, [Rect(0, 0, width, height)])
    again = session.server.data_to_send()
    session.screen.read_all(again)
    assert_screen_matches(session.screen, fb)
    assert len(first) > width * height * 3  # noise does not compress ...
    assert len(again) < len(first) // 20  # ... but a repeat does, across the restore


def test_zlib_stream_across_many_restores() -> None:
    """ZlibStream alone: chunks with repeats reaching back across restore points, a
    restore after every chunk, a window that wraps; one client-side decompressobj."""
    rnd = random.Random(11)
    state = ZlibState(level=6)
    inflater = zlib.decompressobj()
    history = b""
    for i in range(40):
        if history and rnd.random() < 0.6:
            start = rnd.randrange(max(0, len(history) - ZLIB_WINDOW), len(history))
            chunk = history[start:start + rnd.randrange(1, 5000)] + rnd.randbytes(50)
        else:
            chunk = rnd.randbytes(rnd.randrange(1, 9000))
        state = loads_state_zlib(state) if i % 2 else state  # restore every other chunk
        data = ZlibStream(state).compress(chunk)
        assert inflater.decompress(data) == chunk
        history += chunk
        assert state.window == history[-ZLIB_WINDOW:]


def loads_state_zlib(state: ZlibState) -> ZlibState:
    return serial.loads("zlib", serial.dumps("zlib", state), ZlibState)


def test_only_the_first_compressor_writes_a_zlib_header() -> None:
    state = ZlibState()
    first = ZlibStream(state).compress(b"hello")
    assert first[0] == 0x78  # CMF: deflate, 32K window
    second = ZlibStream(loads_state_zlib(state)).compress(b"hello")
    inflater = zlib.decompressobj()
    assert inflater.decompress(first + second) == b"hellohello"


def test_handshake_output_not_yet_sent_survives_a_checkpoint() -> None:
    s = RfbServer(width=8, height=8, name="x")
    s.connection_made()
    s.receive_data(b"RFB 003.008\n\x01\x00")
    s = restore(s)
    out = s.data_to_send()
    assert out.startswith(b"RFB 003.008\n\x01\x01\x00\x00\x00\x00\x00\x08\x00\x08")
    assert s.phase is Phase.NORMAL and s.state.shared is False


def test_ready_after_restore_in_init() -> None:
    s = RfbServer(width=8, height=8, name="x")
    s.connection_made()
    s.receive_data(b"RFB 003.003\n")
    assert restore(s).receive_data(b"\x01") == [Ready(shared=True)]


def test_stream_goes_stored_when_deflate_does_not_pay_and_back() -> None:
    """Incompressible rectangles switch the stream to stored blocks for a run, then
    compression is tried again; a restore in between and the level switches keep one
    stream the client's single decompressobj follows."""
    rnd = random.Random(5)
    state = ZlibState()
    inflater = zlib.decompressobj()
    noise = [rnd.randbytes(enc.STORE_PROBE + 1000) for _ in range(3)]
    text = b"guest1:~$ ls -l /var/log\r\n" * 4000
    sent = []
    for i, chunk in enumerate([noise[0], noise[1], text, noise[2]] + [text] * enc.STORE_RUN):
        if i == 2:
            state = loads_state_zlib(state)  # a checkpoint while stored
        out = ZlibStream(state).compress(chunk)
        assert inflater.decompress(out) == chunk
        sent.append((len(out), state.stored))
    assert sent[0][1] == enc.STORE_RUN  # noise did not shrink: stored from then on
    assert sent[1][0] > len(noise[1])  # stored: a little larger than the data
    assert sent[2][0] > len(text) // 2  # text while stored: not compressed
    assert state.stored == 0
    assert sent[-1][0] < len(text) // 20  # compressed again, against the window
