"""Pixel formats: wire form, validation, translation against the spec formula."""

from __future__ import annotations

import numpy as np
import pytest

from keeper.vnc.pixels import (
    SERVER_FORMAT,
    PixelFormat,
    cpixel_layout,
    native_to_values,
    values_to_bytes,
)
from tests.vnc.decoder import Format
from tests.vnc.formats import FORMATS


def ours(fmt: Format) -> PixelFormat:
    return PixelFormat.unpack(fmt.wire())


def test_pack_unpack_round_trip() -> None:
    assert PixelFormat.unpack(SERVER_FORMAT.pack()) == SERVER_FORMAT
    for fmt in FORMATS.values():
        assert ours(fmt).pack() == fmt.wire()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_channel_value_translates_as_the_spec_says(name: str) -> None:
    fmt = FORMATS[name]
    v = np.arange(256, dtype=np.uint8)
    zero = np.zeros(256, dtype=np.uint8)
    for b, g, r in ((v, zero, zero), (zero, v, zero), (zero, zero, v), (v, v[::-1], v)):
        native = np.stack([b, g, r, zero], axis=1).tobytes()
        got = native_to_values(native, 256, 1, ours(fmt)).reshape(-1).tolist()
        want = [fmt.value_of(int(r[i]), int(g[i]), int(b[i])) for i in range(256)]
        assert got == want


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_bytes_on_the_wire_use_the_clients_byte_order(name: str) -> None:
    fmt = FORMATS[name]
    values = np.array([[fmt.value_of(200, 100, 50), fmt.value_of(1, 2, 3)]])
    data = values_to_bytes(values, ours(fmt))
    order = "big" if fmt.big_endian else "little"
    n = fmt.nbytes
    assert [int.from_bytes(data[i:i + n], order) for i in range(0, len(data), n)] == \
        values.reshape(-1).tolist()


def test_server_format_is_identity_on_bgrx() -> None:
    rng = np.random.default_rng(5)
    native = rng.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    native[..., 3] = 0
    values = native_to_values(native.tobytes(), 9, 7, SERVER_FORMAT)
    assert values_to_bytes(values, SERVER_FORMAT) == native.tobytes()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cpixel_layout_matches_the_spec_reading(name: str) -> None:
    fmt = FORMATS[name]
    size, _ = cpixel_layout(ours(fmt))
    assert size == fmt.cpixel_shape()[0]


@pytest.mark.parametrize(("fields", "words"), [
    ({"true_colour": False}, "colour-map"),
    ({"bits_per_pixel": 24}, "8, 16 or 32"),
    ({"bits_per_pixel": 0}, "8, 16 or 32"),
    ({"red_max": 254}, "red-max"),
    ({"green_max": 0}, "green-max"),
    ({"blue_shift": 25}, "does not fit"),
    ({"bits_per_pixel": 16}, "does not fit"),
])
def test_unservable_formats_say_why(fields: dict, words: str) -> None:
    base = {"bits_per_pixel": 32, "depth": 24, "big_endian": False, "true_colour": True,
            "red_max": 255, "green_max": 255, "blue_max": 255,
            "red_shift": 16, "green_shift": 8, "blue_shift": 0}
    problem = PixelFormat(**{**base, **fields}).problem()
    assert problem is not None and words in problem


def test_byte_placing_equals_the_tables_for_every_byte_layout() -> None:
    """8-bit channels on byte boundaries are placed, not looked up: the same values,
    for every arrangement of the three bytes and both byte orders."""
    import itertools

    from keeper.vnc import pixels

    data = np.random.default_rng(0).integers(0, 256, 37 * 23 * 4, dtype=np.uint8).tobytes()
    px = np.frombuffer(data, dtype=np.uint8).reshape(23, 37, 4)
    seen = 0
    for shifts in itertools.permutations((0, 8, 16, 24), 3):
        for big in (False, True):
            fmt = pixels.PixelFormat(32, 24, big, True, 255, 255, 255, *shifts)
            assert pixels._byte_places(fmt) is not None
            red, green, blue = pixels._tables(fmt)
            want = red[px[..., 2]] | green[px[..., 1]] | blue[px[..., 0]]
            got = pixels.native_to_values(data, 37, 23, fmt)
            assert got.dtype == want.dtype and np.array_equal(got, want), fmt
            seen += 1
    assert seen == 48
    assert pixels._byte_places(pixels.PixelFormat(32, 24, False, True, 255, 255, 255,
                                                  4, 12, 20)) is None  # off the bytes
    assert pixels._byte_places(pixels.PixelFormat(16, 16, False, True, 31, 63, 31,
                                                  11, 5, 0)) is None
