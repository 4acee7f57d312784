"""FramebufferUpdates through the whole server, decoded by the independent decoder."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper.vnc import encodings as enc
from keeper.vnc import rfb
from keeper.vnc.framebuffer import MemoryFramebuffer
from keeper.vnc.pixels import PixelFormat, cpixel_layout, values_to_bytes
from keeper.vnc.rfb import CopyRect, Phase, Rect, ResizeUnsupported, RfbError, UpdateRequest
from tests.vnc.decoder import ClientScreen, Format, Reader, expected_values
from tests.vnc.formats import FORMATS
from tests.vnc.helpers import Session, connect, set_encodings, update_request
from tests.vnc.images import KINDS, framebuffer

PIXEL_ENCODINGS = {"raw": enc.RAW, "hextile": enc.HEXTILE, "zrle": enc.ZRLE}


def assert_screen_matches(screen: ClientScreen, fb: MemoryFramebuffer,
                          x: int = 0, y: int = 0, w: int | None = None,
                          h: int | None = None) -> None:
    w = fb.width - x if w is None else w
    h = fb.height - y if h is None else h
    want = expected_values(fb.read(x, y, w, h), screen.fmt)
    got = screen.area(x, y, w, h)
    if got != want:
        bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        pytest.fail(f"pixel ({x + bad % w}, {y + bad // w}): got {got[bad]}, want {want[bad]}")


def full_update(session: Session, fb: MemoryFramebuffer) -> list:
    session.send(update_request(False, 0, 0, fb.width, fb.height))
    return session.update(fb, [Rect(0, 0, fb.width, fb.height)])


@pytest.mark.parametrize("encoding", sorted(PIXEL_ENCODINGS))
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_round_trip_every_format(encoding: str, fmt_name: str) -> None:
    code = PIXEL_ENCODINGS[encoding]
    fmt = FORMATS[fmt_name]
    width, height = 147, 83  # not multiples of 16 or 64: partial tiles at both edges
    session = connect(width, height, fmt=fmt, encodings=[code])
    rng = np.random.default_rng(hash((encoding, fmt_name)) % 2**32)
    for i, kind in enumerate(KINDS):
        fb = framebuffer(kind, width, height, seed=i)
        rects = full_update(session, fb)
        assert [r.encoding for r in rects] == [code]
        assert_screen_matches(session.screen, fb)
        # then some random sub-rectangles of a changed picture, incrementally
        fb2 = framebuffer(KINDS[(i + 3) % len(KINDS)], width, height, seed=100 + i)
        areas = []
        for _ in range(3):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            w, h = int(rng.integers(1, width - x + 1)), int(rng.integers(1, height - y + 1))
            areas.append(Rect(x, y, w, h))
        session.send(update_request(True, 0, 0, width, height))
        fb.pixels[:] = fb2.pixels
        session.update(fb, areas)
        for a in areas:
            assert_screen_matches(session.screen, fb, a.x, a.y, a.w, a.h)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt_name=st.sampled_from(sorted(FORMATS)),
    encoding=st.sampled_from(sorted(PIXEL_ENCODINGS)),
    width=st.integers(1, 140),
    height=st.integers(1, 70),
    colours=st.integers(1, 300),
    run=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_hypothesis(fmt_name: str, encoding: str, width: int, height: int,
                               colours: int, run: int, seed: int) -> None:
    """Small palettes and long runs in odd sizes: every tile-encoding branch and edge."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colours, 4), dtype=np.uint8)
    flat = np.repeat(rng.integers(0, colours, width * height // run + 1), run)
    fb = MemoryFramebuffer(width, height,
                           palette[flat[:width * height]].reshape(height, width, 4))
    session = connect(width, height, fmt=FORMATS[fmt_name],
                      encodings=[PIXEL_ENCODINGS[encoding]])
    full_update(session, fb)
    assert_screen_matches(session.screen, fb)


def test_preference_zrle_then_hextile_then_raw() -> None:
    fb = framebuffer("blocks", 40, 30)
    for listed, used in (([enc.RAW, enc.HEXTILE, enc.ZRLE], enc.ZRLE),
                         ([enc.HEXTILE, 7, enc.COPY_RECT], enc.HEXTILE),
                         ([7, 6, -239], enc.RAW), ([], enc.RAW)):
        session = connect(40, 30, encodings=listed)
        assert [r.encoding for r in full_update(session, fb)] == [used]


def test_copyrect_when_accepted_and_incremental() -> None:
    fb = framebuffer("text", 120, 90, seed=3)
    session = connect(120, 90, encodings=[enc.COPY_RECT, enc.HEXTILE])
    full_update(session, fb)
    fb.copy(0, 10, 0, 0, 120, 60)  # scroll up by 10 rows
    fb.fill(0, 60, 120, 30, (255, 255, 255))  # new content at the bottom
    session.send(update_request(True, 0, 0, 120, 90))
    rects = session.update(fb, [Rect(0, 60, 120, 30)], [CopyRect(0, 10, 0, 0, 120, 60)])
    assert [r.encoding for r in rects] == [enc.COPY_RECT, enc.HEXTILE]
    assert_screen_matches(session.screen, fb)


def test_copyrect_becomes_pixels_for_a_full_request_or_when_not_accepted() -> None:
    for encodings, incremental in (([enc.COPY_RECT, enc.RAW], False), ([enc.RAW], True)):
        fb = framebuffer("noise", 50, 40, seed=4)
        session = connect(50, 40, encodings=encodings)
        full_update(session, fb)
        fb.copy(5, 5, 20, 20, 10, 10)
        session.send(update_request(incremental, 0, 0, 50, 40))
        rects = session.update(fb, [], [CopyRect(5, 5, 20, 20, 10, 10)])
        assert [r.encoding for r in rects] == [enc.RAW]
        assert_screen_matches(session.screen, fb)


def test_copyrect_outside_the_framebuffer_is_our_bug() -> None:
    fb = framebuffer("noise", 20, 20)
    session = connect(20, 20, encodings=[enc.COPY_RECT])
    session.send(update_request(True, 0, 0, 20, 20))
    with pytest.raises(RfbError) as err:
        session.server.send_update(fb, [], [CopyRect(15, 0, 0, 0, 10, 10)])
    assert err.value.fault == "us"


def test_rects_are_clipped_and_empty_ones_dropped() -> None:
    fb = framebuffer("blocks", 30, 20)
    session = connect(30, 20)
    session.send(update_request(False, 0, 0, 30, 20))
    rects = session.update(fb, [Rect(-5, -5, 10, 10), Rect(25, 15, 50, 50), Rect(3, 3, 0, 4),
                                Rect(40, 40, 5, 5)])
    assert [(r.x, r.y, r.w, r.h) for r in rects] == [(0, 0, 5, 5), (25, 15, 5, 5)]
    assert_screen_matches(session.screen, fb, 0, 0, 5, 5)
    assert_screen_matches(session.screen, fb, 25, 15, 5, 5)


def test_empty_update_is_allowed_and_clears_the_request() -> None:
    session = connect(10, 10)
    session.send(update_request(True, 0, 0, 10, 10))
    assert session.server.wants_update()
    assert session.update(MemoryFramebuffer(10, 10), []) == []
    assert not session.server.wants_update()


def test_send_update_without_a_request_is_our_bug() -> None:
    session = connect(10, 10)
    with pytest.raises(RfbError) as err:
        session.server.send_update(MemoryFramebuffer(10, 10), [])
    assert err.value.fault == "us"
    assert session.server.phase is Phase.FAILED


def test_framebuffer_of_the_wrong_size_is_our_bug() -> None:
    session = connect(10, 10)
    session.send(update_request(False, 0, 0, 10, 10))
    with pytest.raises(RfbError, match="resize"):
        session.server.send_update(MemoryFramebuffer(11, 10), [])


def test_pixel_format_change_applies_to_the_next_update() -> None:
    fb = framebuffer("palette16", 70, 70)
    session = connect(70, 70, encodings=[enc.ZRLE])
    full_update(session, fb)
    assert_screen_matches(session.screen, fb)
    for name in ("rgb565-be", "bgr233", "high3-le"):
        session.send(b"\x00\x00\x00\x00" + FORMATS[name].wire())
        session.screen.fmt = FORMATS[name]
        full_update(session, fb)  # the same zlib stream continues across formats
        assert_screen_matches(session.screen, fb)


# -- DesktopSize


def test_resize_sends_only_desktop_size_then_a_full_refresh() -> None:
    fb = framebuffer("blocks", 64, 48)
    session = connect(64, 48, encodings=[enc.ZRLE, enc.DESKTOP_SIZE])
    full_update(session, fb)
    fb.resize(100, 30)
    fb.fill(64, 0, 36, 30, (9, 99, 199))
    session.server.resize(100, 30)
    session.send(update_request(True, 0, 0, 64, 48))  # the client still thinks 64x48
    rects = session.update(fb, [Rect(0, 0, 100, 30)])  # our rects are dropped
    assert [(r.encoding, r.w, r.h) for r in rects] == [(enc.DESKTOP_SIZE, 100, 30)]
    assert (session.screen.width, session.screen.height) == (100, 30)
    # the next request, though incremental, is served whole
    events = session.send(update_request(True, 0, 0, 10, 10))
    assert events == [rfb.UpdateRequested(False, 0, 0, 100, 30)]
    assert session.server.pending_request == UpdateRequest(False, 0, 0, 100, 30)
    session.update(fb, [Rect(0, 0, 100, 30)])
    assert_screen_matches(session.screen, fb)


def test_resize_back_before_telling_the_client_cancels_it() -> None:
    fb = framebuffer("blocks", 20, 20)
    session = connect(20, 20, encodings=[enc.RAW, enc.DESKTOP_SIZE])
    session.server.resize(30, 30)
    session.server.resize(20, 20)
    session.send(update_request(True, 0, 0, 20, 20))
    assert [r.encoding for r in session.update(fb, [Rect(0, 0, 5, 5)])] == [enc.RAW]


def test_resize_without_desktop_size_support() -> None:
    session = connect(20, 20, encodings=[enc.RAW])
    with pytest.raises(ResizeUnsupported) as err:
        session.server.resize(30, 30)
    assert err.value.fault == "us" and err.value.wire == b""
    assert session.server.phase is Phase.FAILED


def test_resize_crops_the_pending_request() -> None:
    session = connect(100, 100, encodings=[enc.DESKTOP_SIZE])
    session.send(update_request(True, 50, 50, 50, 50))
    session.server.resize(60, 70)
    assert session.server.pending_request == UpdateRequest(True, 50, 50, 10, 20)


# -- LastRect and the U16 rectangle count


def test_decoder_understands_last_rect() -> None:
    """The server never needs LastRect (it always knows its count); the pseudo-rectangle
    encoder is still spec-exact: an update announcing 65535 rectangles ends at it."""
    screen = ClientScreen(4, 4, FORMATS["native"])
    raw = struct.pack("<I", 0x123456) * 4
    data = (struct.pack(">BxH", 0, 0xFFFF) + enc.rect_header(0, 0, 2, 2, enc.RAW) + raw
            + enc.last_rect() + struct.pack(">BxH", 0, 0))
    r = Reader(data)
    assert [x.encoding for x in screen.read_message(r)] == [enc.RAW]
    assert screen.read_message(r) == [] and r.done()
    assert screen.area(0, 0, 2, 2) == [0x123456] * 4


def test_too_many_rects_collapse_into_their_bounding_box(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rfb, "MAX_RECTS", 3)
    fb = framebuffer("noise", 40, 40)
    session = connect(40, 40, encodings=[enc.COPY_RECT, enc.HEXTILE])
    full_update(session, fb)
    fb.copy(0, 0, 30, 30, 5, 5)
    session.send(update_request(True, 0, 0, 40, 40))
    rects = session.update(fb, [Rect(1, 1, 2, 2), Rect(10, 12, 3, 3), Rect(5, 20, 1, 1)],
                           [CopyRect(0, 0, 30, 30, 5, 5)])
    assert [(r.x, r.y, r.w, r.h, r.encoding) for r in rects] == [(1, 1, 34, 34, enc.HEXTILE)]
    assert_screen_matches(session.screen, fb)


# -- encoder branches, checked directly


def one_tile(values: list[list[int]]) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def test_zrle_picks_the_cheapest_subencoding() -> None:
    fmt = rfb.SERVER_FORMAT
    rng = np.random.default_rng(1)
    solid = np.full((64, 64), 7, dtype=np.uint32)
    two = rng.integers(0, 2, (64, 64)).astype(np.uint32)
    five = rng.integers(0, 5, (64, 64)).astype(np.uint32)
    runs = np.repeat(np.arange(16, dtype=np.uint32) * 1000, 256).reshape(64, 64)
    few_long = np.repeat(rng.integers(0, 40, 64), 64).astype(np.uint32).reshape(64, 64)
    noise = rng.integers(0, 2**24, (64, 64)).astype(np.uint32)
    cases = {1: solid, 2: two, 5: five, 128: runs, 128 + 40: few_long, 0: noise}
    for sub, tile in cases.items():
        data = enc.zrle_data(tile, fmt)
        if sub == 128 + 40:
            k = len(np.unique(tile))
            assert data[0] == 128 + k
        else:
            assert data[0] == sub, (sub, data[0])
        screen = ClientScreen(64, 64, FORMATS["native"])
        inner = Reader(data)
        screen.zrle(inner, 0, 0, 64, 64)
        assert inner.done()
        assert screen.area(0, 0, 64, 64) == tile.reshape(-1).tolist()


def test_hextile_tile_kinds() -> None:
    fmt = rfb.SERVER_FORMAT
    screen = ClientScreen(16, 64, FORMATS["native"])
    solid = np.full((16, 16), 5, dtype=np.uint32)
    mono = solid.copy()
    mono[2:5, 3:9] = 9
    coloured = solid.copy()
    coloured[0, 0], coloured[15, 15], coloured[7, 3:12] = 1, 2, 3
    noise = np.random.default_rng(0).integers(0, 2**24, (16, 16)).astype(np.uint32)
    values = np.concatenate([solid, mono, coloured, noise])
    data = enc.encode_hextile(values, fmt)
    # tile masks: bg specified; bg carried + fg + subrects; coloured subrects; raw
    assert data[0] == 2
    assert data[1 + 4] == 4 | 8
    r = Reader(data)
    screen.hextile(r, 0, 0, 16, 64)
    assert r.done()
    assert screen.area(0, 0, 16, 64) == values.reshape(-1).tolist()


def test_set_encodings_reply_is_not_needed_for_pseudo_encodings() -> None:
    session = connect(8, 8)
    events = session.send(set_encodings([enc.DESKTOP_SIZE, enc.LAST_RECT, -239, 21]))
    assert events == [rfb.EncodingsChanged((-223, -224, -239, 21))]
    assert session.server.data_to_send() == b""
    assert session.server.accepts(enc.DESKTOP_SIZE) and session.server.accepts(enc.RAW)
    assert not session.server.accepts(enc.ZRLE)


def test_decoder_is_strict_about_hextile_carry_over() -> None:
    """Sanity check of the test decoder itself: it refuses a tile that leans on a
    background that a raw tile invalidated."""
    screen = ClientScreen(32, 16, Format(8, 8, False, 7, 7, 3, 0, 3, 6))
    data = bytes([1]) + bytes(256) + bytes([0])  # raw tile, then "same background"
    with pytest.raises(Exception, match="background"):
        screen.hextile(Reader(data), 0, 0, 32, 16)


def test_resize_to_an_impossible_size_is_a_value_error() -> None:
    session = connect(20, 20, encodings=[enc.DESKTOP_SIZE])
    with pytest.raises(ValueError):
        session.server.resize(0, 10)
    assert session.server.phase is Phase.NORMAL


def _hextile_tile_by_tile(values: np.ndarray, fmt: PixelFormat) -> bytes:
    """Hextile with every tile decided by its own encoder, no array pre-pass."""
    height, width = values.shape
    runs = enc._Runs.of(values)
    out, bg, fg = bytearray(), None, None
    for ty in range(0, height, 16):
        for tx in range(0, width, 16):
            coded = enc._hextile_tile(values, runs, tx, ty, fmt, bg, fg)
            if coded is None:
                out.append(1)
                out += values_to_bytes(values[ty:ty + 16, tx:tx + 16], fmt)
                bg = fg = None
            else:
                data, bg, fg = coded
                out += data
    return bytes(out)


@pytest.mark.parametrize("fmt", [
    PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0),
    PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0),
    PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)], ids=["32bpp", "16bpp", "8bpp"])
def test_tile_pre_pass_changes_no_byte(fmt: PixelFormat) -> None:
    """The whole-screen classification (solid, surely raw) agrees with each tile's own
    encoder, carried background and foreground included, on screens of every kind."""
    rng = np.random.default_rng(3)
    mask = (1 << fmt.depth) - 1
    for trial in range(40):
        h, w = int(rng.integers(1, 150)), int(rng.integers(1, 150))
        palette = rng.integers(0, 1 << 24, int(rng.choice([1, 2, 3, 6, 40, 5000])),
                               dtype=np.uint32) & mask
        blocks = 1 + trial % 5
        pick = rng.integers(0, palette.size, (h // blocks + 1, w // blocks + 1))
        values = np.ascontiguousarray(
            np.repeat(np.repeat(palette[pick], blocks, 0), blocks, 1)[:h, :w])
        assert enc.encode_hextile(values, fmt) == _hextile_tile_by_tile(values, fmt)
        colours = enc._TileStats.of(enc._tiles(values, 64)).colours
        assert np.array_equal(enc._colour_counts(enc._tiles(values, 64)), colours)
        for i, tile in enumerate(enc._tiles(values, 64)):
            assert colours[i] == np.unique(tile).size


def _text_screen(rng: np.random.Generator, h: int, w: int, fg: int, bg: int) -> np.ndarray:
    """A text console's look: 9x16 cells of random glyph-like bitmaps, two colours."""
    glyphs = rng.random((64, 16, 9)) < 0.3
    glyphs[:, :2] = glyphs[:, 14:] = False  # line spacing
    cells = rng.integers(0, 64, (-(-h // 16), -(-w // 9)))
    bits = glyphs[cells].swapaxes(1, 2).reshape(cells.shape[0] * 16, cells.shape[1] * 9)
    return np.ascontiguousarray(np.where(bits, fg, bg).astype(np.uint32)[:h, :w])


@pytest.mark.parametrize("fmt", [
    PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0),
    PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)], ids=["32bpp", "8bpp"])
def test_text_screens_encode_as_tile_by_tile(fmt: PixelFormat) -> None:
    """The two-colour fast paths (Hextile's subrectangles of every text tile at once,
    ZRLE's palette without a sort) write the same bytes as the general ones, on
    whole and partial tiles, with a cursor block (a third colour) here and there."""
    rng = np.random.default_rng(7)
    mask = (1 << fmt.depth) - 1
    cp, _ = cpixel_layout(fmt)
    for h, w in ((400, 720), (37, 101), (16, 16), (64, 130)):
        values = _text_screen(rng, h, w, 0xA8A8A8 & mask, 0)
        values[h // 2:h // 2 + 3, 5:14] = 0x00FF00 & mask  # the cursor
        assert enc.encode_hextile(values, fmt) == _hextile_tile_by_tile(values, fmt)
        for ty in range(0, h, 64):
            for tx in range(0, w, 64):
                tile = values[ty:ty + 64, tx:tx + 64]
                n = np.unique(tile).size
                # colours=3 where there are 2: the general path, np.unique's palette
                general = enc._zrle_tile(tile, fmt, cp, 3 if n == 2 else n)
                assert enc._zrle_tile(tile, fmt, cp, n) == general
                assert enc._zrle_tile(tile, fmt, cp, 0) == general
