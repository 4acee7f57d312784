"""Keysym → Linux keycode table, checked against linux/input-event-codes.h when present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keeper.vnc import keysyms
from keeper.vnc.keysyms import keysym_to_keys

HEADER = Path("/usr/include/linux/input-event-codes.h")


def kernel_codes() -> dict[str, int]:
    if not HEADER.exists():
        pytest.skip("no linux/input-event-codes.h here")
    return {m[1]: int(m[2], 0) for m in
            re.finditer(r"#define\s+(KEY_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", HEADER.read_text())}


def test_our_constants_match_the_kernel_header() -> None:
    codes = kernel_codes()
    ours = {n: v for n, v in vars(keysyms).items() if n.startswith("KEY_")}
    assert len(ours) > 50
    for name, value in ours.items():
        assert codes[name] == value, name


def test_letters_digits_and_shifted_characters() -> None:
    codes = kernel_codes()
    for ch in "abcdefghijklmnopqrstuvwxyz":
        assert keysym_to_keys(ord(ch)) == (codes[f"KEY_{ch.upper()}"], False)
        assert keysym_to_keys(ord(ch.upper())) == (codes[f"KEY_{ch.upper()}"], True)
    for d in "0123456789":
        assert keysym_to_keys(ord(d)) == (codes[f"KEY_{d}"], False)
    shifted = {"!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7",
               "*": "8", "(": "9", ")": "0", "_": "MINUS", "+": "EQUAL", "{": "LEFTBRACE",
               "}": "RIGHTBRACE", ":": "SEMICOLON", '"': "APOSTROPHE", "~": "GRAVE",
               "|": "BACKSLASH", "<": "COMMA", ">": "DOT", "?": "SLASH"}
    for ch, key in shifted.items():
        assert keysym_to_keys(ord(ch)) == (codes[f"KEY_{key}"], True), ch
    plain = {"-": "MINUS", "=": "EQUAL", "[": "LEFTBRACE", "]": "RIGHTBRACE",
             ";": "SEMICOLON", "'": "APOSTROPHE", "`": "GRAVE", "\\": "BACKSLASH",
             ",": "COMMA", ".": "DOT", "/": "SLASH", " ": "SPACE"}
    for ch, key in plain.items():
        assert keysym_to_keys(ord(ch)) == (codes[f"KEY_{key}"], False), ch


def test_every_printable_ascii_character_has_a_key() -> None:
    for c in range(0x20, 0x7F):
        assert keysym_to_keys(c) is not None, chr(c)


@pytest.mark.parametrize(("keysym", "key"), [
    (0xFF0D, "ENTER"), (0xFF08, "BACKSPACE"), (0xFF09, "TAB"), (0xFF1B, "ESC"),
    (0xFF51, "LEFT"), (0xFF52, "UP"), (0xFF53, "RIGHT"), (0xFF54, "DOWN"),
    (0xFF50, "HOME"), (0xFF57, "END"), (0xFF55, "PAGEUP"), (0xFF56, "PAGEDOWN"),
    (0xFF63, "INSERT"), (0xFFFF, "DELETE"),
    (0xFFBE, "F1"), (0xFFC5, "F8"), (0xFFC7, "F10"), (0xFFC8, "F11"), (0xFFC9, "F12"),
    (0xFFE1, "LEFTSHIFT"), (0xFFE2, "RIGHTSHIFT"), (0xFFE3, "LEFTCTRL"),
    (0xFFE4, "RIGHTCTRL"), (0xFFE9, "LEFTALT"), (0xFFEA, "RIGHTALT"),
    (0xFFEB, "LEFTMETA"), (0xFFE5, "CAPSLOCK"),
])
def test_function_and_modifier_keys(keysym: int, key: str) -> None:
    assert keysym_to_keys(keysym) == (kernel_codes()[f"KEY_{key}"], False)


def test_shift_tab_and_unknown() -> None:
    assert keysym_to_keys(0xFE20) == (keysyms.KEY_TAB, True)
    for unknown in (0, 0x7F, 0xE9, 0x20AC, 0x1000000, 0xFFFFFFFF):
        assert keysym_to_keys(unknown) is None
