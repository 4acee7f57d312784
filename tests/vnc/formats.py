"""Client pixel formats the tests exercise: every bpp, both byte orders, odd layouts."""

from __future__ import annotations

from tests.vnc.decoder import Format

FORMATS = {
    "bgr233": Format(8, 8, False, 7, 7, 3, 0, 3, 6),
    "rgb332": Format(8, 8, False, 7, 7, 3, 5, 2, 0),
    "rgb565-le": Format(16, 16, False, 31, 63, 31, 11, 5, 0),
    "rgb565-be": Format(16, 16, True, 31, 63, 31, 11, 5, 0),
    "rgb555-be": Format(16, 15, True, 31, 31, 31, 10, 5, 0),
    "rgb444-odd": Format(16, 12, False, 15, 15, 15, 1, 6, 11),
    "native": Format(32, 24, False, 255, 255, 255, 16, 8, 0),
    "native-be": Format(32, 24, True, 255, 255, 255, 16, 8, 0),
    "bgr0-le": Format(32, 24, False, 255, 255, 255, 0, 8, 16),  # vncdotool's default
    "high3-le": Format(32, 24, False, 255, 255, 255, 24, 16, 8),  # CPIXEL = top 3 bytes
    "high3-be": Format(32, 24, True, 255, 255, 255, 8, 16, 24),
    "depth32": Format(32, 32, False, 255, 255, 255, 16, 8, 0),  # CPIXEL = whole PIXEL
    "straddle": Format(32, 24, True, 255, 255, 255, 4, 12, 20),  # fits neither 3 bytes
    "tiny-max": Format(32, 6, False, 3, 3, 3, 0, 10, 20),
}
