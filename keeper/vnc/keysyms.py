"""X keysyms (what RFB KeyEvents carry) → Linux input keycodes (linux/input-event-codes.h).

The guest sees a keyboard, not characters, so a character keysym becomes the key that
types it on a US layout, plus "needs shift" for the characters on a key's upper half
('A', '!', ':'). Keysyms for keys (Return, arrows, modifiers, F1-F12) map one to one.
A viewer normally sends Shift itself before an upper-case keysym; `needs_shift` lets the
caller add it when the viewer did not (e.g. pasted text, vncdotool's `type`).
"""

from __future__ import annotations

# linux/input-event-codes.h
KEY_ESC = 1
KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9, KEY_0 = range(2, 12)
KEY_MINUS = 12
KEY_EQUAL = 13
KEY_BACKSPACE = 14
KEY_TAB = 15
KEY_LEFTBRACE = 26
KEY_RIGHTBRACE = 27
KEY_ENTER = 28
KEY_LEFTCTRL = 29
KEY_SEMICOLON = 39
KEY_APOSTROPHE = 40
KEY_GRAVE = 41
KEY_LEFTSHIFT = 42
KEY_BACKSLASH = 43
KEY_COMMA = 51
KEY_DOT = 52
KEY_SLASH = 53
KEY_RIGHTSHIFT = 54
KEY_KPASTERISK = 55
KEY_LEFTALT = 56
KEY_SPACE = 57
KEY_CAPSLOCK = 58
KEY_F1 = 59  # F1..F10 are 59..68
KEY_NUMLOCK = 69
KEY_SCROLLLOCK = 70
KEY_F11 = 87
KEY_F12 = 88
KEY_KPENTER = 96
KEY_RIGHTCTRL = 97
KEY_SYSRQ = 99
KEY_RIGHTALT = 100
KEY_HOME = 102
KEY_UP = 103
KEY_PAGEUP = 104
KEY_LEFT = 105
KEY_RIGHT = 106
KEY_END = 107
KEY_DOWN = 108
KEY_PAGEDOWN = 109
KEY_INSERT = 110
KEY_DELETE = 111
KEY_PAUSE = 119
KEY_LEFTMETA = 125
KEY_RIGHTMETA = 126
KEY_COMPOSE = 127

# Letter keys in alphabetical order (the codes follow the QWERTY rows, not the alphabet).
_LETTERS = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50,
    49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21, 44,
), strict=True))

# Unshifted and shifted characters of the non-letter keys, US layout.
_SYMBOL_KEYS = (
    ("1", "!", KEY_1), ("2", "@", KEY_2), ("3", "#", KEY_3), ("4", "$", KEY_4),
    ("5", "%", KEY_5), ("6", "^", KEY_6), ("7", "&", KEY_7), ("8", "*", KEY_8),
    ("9", "(", KEY_9), ("0", ")", KEY_0), ("-", "_", KEY_MINUS), ("=", "+", KEY_EQUAL),
    ("[", "{", KEY_LEFTBRACE), ("]", "}", KEY_RIGHTBRACE), (";", ":", KEY_SEMICOLON),
    ("'", '"', KEY_APOSTROPHE), ("`", "~", KEY_GRAVE), ("\\", "|", KEY_BACKSLASH),
    (",", "<", KEY_COMMA), (".", ">", KEY_DOT), ("/", "?", KEY_SLASH),
)

# Function and modifier keysyms (X11 keysymdef.h).
_SPECIAL = {
    0xFF08: KEY_BACKSPACE, 0xFF09: KEY_TAB, 0xFF0D: KEY_ENTER, 0xFF13: KEY_PAUSE,
    0xFF14: KEY_SCROLLLOCK, 0xFF15: KEY_SYSRQ, 0xFF1B: KEY_ESC, 0xFFFF: KEY_DELETE,
    0xFF50: KEY_HOME, 0xFF51: KEY_LEFT, 0xFF52: KEY_UP, 0xFF53: KEY_RIGHT, 0xFF54: KEY_DOWN,
    0xFF55: KEY_PAGEUP, 0xFF56: KEY_PAGEDOWN, 0xFF57: KEY_END, 0xFF63: KEY_INSERT,
    0xFF67: KEY_COMPOSE, 0xFF7F: KEY_NUMLOCK, 0xFF8D: KEY_KPENTER, 0xFFAA: KEY_KPASTERISK,
    0xFFE1: KEY_LEFTSHIFT, 0xFFE2: KEY_RIGHTSHIFT, 0xFFE3: KEY_LEFTCTRL,
    0xFFE4: KEY_RIGHTCTRL, 0xFFE5: KEY_CAPSLOCK, 0xFFE7: KEY_LEFTMETA,
    0xFFE8: KEY_RIGHTMETA, 0xFFE9: KEY_LEFTALT, 0xFFEA: KEY_RIGHTALT,
    0xFFEB: KEY_LEFTMETA, 0xFFEC: KEY_RIGHTMETA,  # Super_L/R: the "Windows" keys
    0xFE03: KEY_RIGHTALT,  # ISO_Level3_Shift (AltGr)
}
_SPECIAL.update({0xFFBE + i: KEY_F1 + i for i in range(10)})  # F1..F10
_SPECIAL.update({0xFFC8: KEY_F11, 0xFFC9: KEY_F12})


def _build() -> dict[int, tuple[int, bool]]:
    table: dict[int, tuple[int, bool]] = {k: (v, False) for k, v in _SPECIAL.items()}
    table[ord(" ")] = (KEY_SPACE, False)
    for ch, code in _LETTERS.items():
        table[ord(ch)] = (code, False)
        table[ord(ch.upper())] = (code, True)
    for low, high, code in _SYMBOL_KEYS:
        table[ord(low)] = (code, False)
        table[ord(high)] = (code, True)
    table[0xFE20] = (KEY_TAB, True)  # ISO_Left_Tab: what Shift+Tab sends
    return table


_TABLE = _build()


def keysym_to_keys(keysym: int) -> tuple[int, bool] | None:
    """(Linux keycode, needs_shift) for an X keysym, or None if we have no key for it."""
    return _TABLE.get(keysym)
