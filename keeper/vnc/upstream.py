"""Sans-I/O RFB *client* core: Domain R's link to QEMU's own VNC server.

For a QEMU guest the screen and keyboard stay inside QEMU (DESIGN.md §8), so Domain R
is a viewer of QEMU's VNC server and re-serves what it sees through its own RFB server
(`keeper.vnc.rfb`). `UpstreamClient` never touches a socket: bytes from the server in,
events out, bytes to send. Its protocol state is `UpstreamState`, plain data that
round-trips through `keeper.serial`; the pixels live beside it in `fb` (a numpy array
H x W*4 of BGRX bytes), never in the state — a checkpoint must not copy a screen.

Order of calls (the adapter's side):

1. For every chunk read from the server: `events = receive_data(chunk)`; act on the
   events (Connected, Ready, Damage, Resized, Bell, CutText, Leds).
2. After any call, write out `data_to_send()`.
3. Input once `ready` (the first full framebuffer arrived): `key(linux_keycode, down)`,
   `pointer(x, y, buttons)`; `refresh()` asks for the whole screen again.
4. On an `UpstreamError` from `receive_data` the machine is poisoned: every call but
   `data_to_send()` raises from then on; close the connection (RFB has no client
   failure message). Input before the session is up raises (fault "us") and poisons
   nothing.

What we ask of the server, right after ServerInit:
- SetPixelFormat 32 bpp little-endian true colour, red at shift 16, green 8, blue 0:
  BGRX in memory, the layout of Domain R's framebuffer (and QEMU's own surface, so
  QEMU sends its bytes unconverted).
- SetEncodings Raw, CopyRect, DesktopSize (-223), QEMU Extended Key Event (-258) and
  QEMU LED State (-261). Raw: over a local Unix socket a memcpy beats any compressor.
  LED State: while a client has it, QEMU turns off its "lock key sync", which would
  otherwise press Caps Lock or Num Lock behind our back whenever the keysym we send
  disagrees with the modifier state QEMU guesses (and queue those presses in a timer
  queue that a migration does not carry). With it, a key we send is the key the guest
  gets, nothing added. ExtendedDesktopSize is not asked for: we never ask the server
  to resize, and DesktopSize says all we need.

Updates: one request outstanding. A full (non-incremental) request after ServerInit,
after every DesktopSize and on `refresh()`; an incremental one after each update that
answers a request. An update answers a request unless it holds only notification
pseudo-rectangles (Extended Key Event, LED State) — QEMU sends those unsolicited, the
first right after SetEncodings. Servers merge the requests they have not answered
(QEMU keeps one flag), so one answering update settles every request sent before it.

Keys: with the server's Extended Key Event announcement, a Linux KEY_* code goes out
as QEMU Extended Key Event (255/0) with its XT set-1 keycode and keysym 0 — exact
keys, Shift and all, whatever keymap QEMU would otherwise apply. Without it, as a
plain KeyEvent with the keysym that key types on a US layout under the Shift state we
have sent (tracked in the state), so a server that maps keysyms gets the character.

Illegal server input raises `UpstreamError` (a ProtocolError with fault "server");
our own misuse raises it with fault "us".
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from keeper import serial
from keeper.errors import ProtocolError
from keeper.vnc import encodings as enc
from keeper.vnc.keysyms import KEY_LEFTSHIFT, KEY_RIGHTSHIFT, keysym_to_keys
from keeper.vnc.pixels import PIXEL_FORMAT_SIZE, PixelFormat

__all__ = [
    "CHECKPOINT_KIND", "CLIENT_FORMAT", "ENCODINGS", "EXT_KEY_EVENT", "LED_STATE",
    "MAX_CUT_TEXT", "MAX_SIZE", "XT_KEYCODES", "Bell", "Connected", "CutText", "Damage",
    "Event", "Leds", "Phase", "Ready", "Resized", "UpstreamClient", "UpstreamError",
    "UpstreamRefused", "UpstreamState", "dumps_state", "keysym_for", "loads_state",
    "xt_keycode",
]

CHECKPOINT_KIND = "vnc.upstream"
CLIENT_VERSION_MINORS = (3, 7, 8)
SEC_NONE = 1
SEC_VNC_AUTH = 2
EXT_KEY_EVENT = -258  # QEMU Extended Key Event pseudo-encoding
LED_STATE = -261  # QEMU LED State pseudo-encoding
ENCODINGS = (enc.RAW, enc.COPY_RECT, enc.DESKTOP_SIZE, EXT_KEY_EVENT, LED_STATE)
MAX_SIZE = 8192  # per dimension: a bigger framebuffer is refused, not allocated
MAX_CUT_TEXT = 1 << 20
MAX_STRING = 1 << 16  # failure reasons and desktop names

# Domain R's framebuffer layout: bytes B, G, R, X = a little-endian word R<<16|G<<8|B.
CLIENT_FORMAT = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)

_U32 = struct.Struct(">I")
_RECT = struct.Struct(">HHHHi")
_SHIFT_BITS = {KEY_LEFTSHIFT: 1, KEY_RIGHTSHIFT: 2}


# --- Linux KEY_* -> XT keycodes (QEMU Extended Key Event) ----------------------------

# rfbproto "QEMU Extended Key Event Message": the keycode is the XT (set 1) make code;
# one-byte codes below 0x7f as is, "0xe0 XX" two-byte codes as 0x80 | XX. Linux's
# KEY_* numbers were laid out after set 1, so the main block (Esc .. keypad '.',
# 102nd, F11, F12) is the identity. The rest, by set-1 make sequence (0xe0XX = two
# bytes), as the Linux and AT set 1 columns of keycodemapdb (data/keymaps.csv, the
# table QEMU's own keymaps are generated from) pair them; only keys QEMU 7.2 has a
# QKeyCode for (F13-F24 it drops: tests/vnc/test_upstream_qemu.py asks QEMU itself).
# Print Screen/SysRq is 0x54 and Pause 0xe046 (-> 0xc6), as rfbproto requires.
_SET1_OTHER = {
    89: 0x73,  # KEY_RO
    91: 0x77,  # KEY_HIRAGANA
    92: 0x79,  # KEY_HENKAN
    93: 0x70,  # KEY_KATAKANAHIRAGANA
    94: 0x7B,  # KEY_MUHENKAN
    96: 0xE01C,  # KEY_KPENTER
    97: 0xE01D,  # KEY_RIGHTCTRL
    98: 0xE035,  # KEY_KPSLASH
    99: 0x54,  # KEY_SYSRQ (Print Screen)
    100: 0xE038,  # KEY_RIGHTALT
    101: 0x5B,  # KEY_LINEFEED
    102: 0xE047,  # KEY_HOME
    103: 0xE048,  # KEY_UP
    104: 0xE049,  # KEY_PAGEUP
    105: 0xE04B,  # KEY_LEFT
    106: 0xE04D,  # KEY_RIGHT
    107: 0xE04F,  # KEY_END
    108: 0xE050,  # KEY_DOWN
    109: 0xE051,  # KEY_PAGEDOWN
    110: 0xE052,  # KEY_INSERT
    111: 0xE053,  # KEY_DELETE
    113: 0xE020,  # KEY_MUTE
    114: 0xE02E,  # KEY_VOLUMEDOWN
    115: 0xE030,  # KEY_VOLUMEUP
    116: 0xE05E,  # KEY_POWER
    117: 0x59,  # KEY_KPEQUAL
    119: 0xE046,  # KEY_PAUSE
    121: 0x7E,  # KEY_KPCOMMA
    124: 0x7D,  # KEY_YEN
    125: 0xE05B,  # KEY_LEFTMETA
    126: 0xE05C,  # KEY_RIGHTMETA
    127: 0xE05D,  # KEY_COMPOSE (Menu)
    128: 0xE068,  # KEY_STOP
    129: 0xE005,  # KEY_AGAIN
    130: 0xE006,  # KEY_PROPS
    131: 0xE007,  # KEY_UNDO
    132: 0xE00C,  # KEY_FRONT
    133: 0xE078,  # KEY_COPY
    134: 0x64,  # KEY_OPEN
    135: 0x65,  # KEY_PASTE
    136: 0xE041,  # KEY_FIND
    137: 0xE03C,  # KEY_CUT
    138: 0xE075,  # KEY_HELP
    139: 0xE01E,  # KEY_MENU
    140: 0xE021,  # KEY_CALC
    142: 0xE05F,  # KEY_SLEEP
    143: 0xE063,  # KEY_WAKEUP
    155: 0xE06C,  # KEY_MAIL
    156: 0xE066,  # KEY_BOOKMARKS
    157: 0xE06B,  # KEY_COMPUTER
    158: 0xE06A,  # KEY_BACK
    159: 0xE069,  # KEY_FORWARD
    163: 0xE019,  # KEY_NEXTSONG
    164: 0xE022,  # KEY_PLAYPAUSE
    165: 0xE010,  # KEY_PREVIOUSSONG
    166: 0xE024,  # KEY_STOPCD
    172: 0xE032,  # KEY_HOMEPAGE
    173: 0xE067,  # KEY_REFRESH
    226: 0xE06D,  # KEY_MEDIA
}


def _rfb_keycode(set1: int) -> int:
    if set1 >> 8 == 0xE0:
        return 0x80 | (set1 & 0x7F)
    return set1


def _build_xt() -> dict[int, int]:
    table = {code: code for code in (*range(1, 84), 86, 87, 88)}
    table.update({code: _rfb_keycode(s) for code, s in _SET1_OTHER.items()})
    return table


XT_KEYCODES: dict[int, int] = _build_xt()


def xt_keycode(linux_keycode: int) -> int | None:
    """The RFB keycode (XT set 1, 0xe0-prefixed as 0x80 | code) of a Linux KEY_*."""
    return XT_KEYCODES.get(linux_keycode)


def _build_keysyms() -> dict[int, tuple[int, int]]:
    """Linux keycode -> (keysym without Shift, keysym with Shift), inverted from
    keeper.vnc.keysyms. Later keysyms win, so Super_L beats Meta_L and Alt_R beats
    ISO_Level3_Shift: what an X server sends for those keys."""
    plain: dict[int, int] = {}
    shifted: dict[int, int] = {}
    for keysym in (*range(0x20, 0x7F), *range(0xFE00, 0x10000)):
        keys = keysym_to_keys(keysym)
        if keys is not None:
            (shifted if keys[1] else plain)[keys[0]] = keysym
    return {code: (sym, shifted.get(code, sym)) for code, sym in plain.items()}


_KEYSYMS = _build_keysyms()


def keysym_for(linux_keycode: int, shift: bool) -> int | None:
    """The keysym a key types on a US layout, or None if we have none for it."""
    syms = _KEYSYMS.get(linux_keycode)
    return None if syms is None else syms[1 if shift else 0]


# --- errors --------------------------------------------------------------------------


class UpstreamError(ProtocolError):
    """The link to the server cannot go on.

    `fault`: "server" (it broke the protocol or refused us) or "us" (the caller misused
    the core). `reason`: why, in words. `events`: events parsed from the same
    `receive_data` chunk before the bad message; act on them.
    """

    def __init__(self, reason: str, *, fault: str = "server") -> None:
        super().__init__(reason, fault=fault)
        self.reason = reason
        self.events: list[Event] = []


class UpstreamRefused(UpstreamError):
    """The server turned us away in the handshake (with its reason, where RFB has one)."""


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """ServerInit arrived; our pixel format, encodings and first request went out."""

    width: int
    height: int
    name: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The first full framebuffer is in `fb`: input may flow."""


@dataclass(frozen=True, slots=True)
class Damage:
    """These areas of `fb` changed (one FramebufferUpdate's worth), as (x, y, w, h)."""

    rects: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Resized:
    """The framebuffer is now width x height and black until the full update arrives."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Bell:
    pass


@dataclass(frozen=True, slots=True)
class CutText:
    text: bytes  # ISO 8859-1, as RFB defines it


@dataclass(frozen=True, slots=True)
class Leds:
    """QEMU LED State: bit 0 Scroll Lock, bit 1 Num Lock, bit 2 Caps Lock."""

    state: int


Event = Connected | Ready | Damage | Resized | Bell | CutText | Leds


# --- state ---------------------------------------------------------------------------


class Phase(enum.Enum):
    VERSION = "version"  # waiting for the server's ProtocolVersion
    SECURITY = "security"  # 3.7/3.8: waiting for the list of security types
    SECURITY_33 = "security-3.3"  # 3.3: waiting for the security type the server chose
    SECURITY_RESULT = "security-result"  # 3.8: waiting for SecurityResult
    INIT = "init"  # ClientInit sent; waiting for ServerInit
    NORMAL = "normal"  # between server messages
    RECT = "rect"  # inside a FramebufferUpdate: waiting for a rectangle header
    RAW = "raw"  # inside a Raw rectangle: waiting for its rows
    FAILED = "failed"  # poisoned: see UpstreamState.failure


_SESSION = (Phase.NORMAL, Phase.RECT, Phase.RAW)


@dataclass(slots=True)
class UpstreamState:
    """Everything the link needs to go on mid-stream. Plain data, see keeper.serial."""

    phase: Phase = Phase.VERSION
    version_minor: int = 0  # negotiated 3.<minor>: 3, 7 or 8
    width: int = 0
    height: int = 0
    name: bytes = b""  # desktop name, as ServerInit sent it
    colour_map_ok: bool = False  # server's native format is a colour map, no update yet
    ext_keys: bool = False  # the server announced QEMU Extended Key Event
    leds: int = 0  # last QEMU LED State
    ready: bool = False  # the first full framebuffer arrived
    # requests
    outstanding: bool = False  # a request went out and no update has answered it yet
    outstanding_full: bool = False  # ... and one of them was non-incremental
    want_full: bool = False  # the next request must be non-incremental
    # the FramebufferUpdate being received
    rects_left: int = 0
    answers: bool = False  # it answers a request (see the module doc)
    resized: bool = False  # it carried a DesktopSize
    damage: list[list[int]] = field(default_factory=list)  # its pixel rectangles
    raw: list[int] = field(default_factory=list)  # Raw rectangle in progress: x, y, w, h
    raw_rows: int = 0  # rows of it received
    # input
    shift: int = 0  # Shift keys we have sent down (bit 0 left, bit 1 right)
    inbuf: bytes = b""  # received, not yet a whole message (or a whole Raw row)
    outbuf: bytes = b""  # produced, not yet taken by data_to_send()
    updates: int = 0  # FramebufferUpdates received
    failure: str = ""  # why the machine is poisoned (phase FAILED)


def dumps_state(state: UpstreamState) -> bytes:
    return serial.dumps(CHECKPOINT_KIND, state)


def loads_state(blob: bytes) -> UpstreamState:
    return serial.loads(CHECKPOINT_KIND, blob, UpstreamState)


# --- wire helpers ----------------------------------------------------------------------

_VERSION_SHAPE = b"RFB ddd.ddd\n"


def _string_end(buf: memoryview, at: int, what: str) -> int:
    """Where a U32-length-prefixed string starting at buf[at] ends."""
    if len(buf) - at < 4:
        return at + 4
    (length,) = _U32.unpack_from(buf, at)
    if length > MAX_STRING:
        raise UpstreamError(f"{what} of {length} bytes (at most {MAX_STRING})")
    return at + 4 + length


def _text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", "replace")


def _check_size(width: int, height: int, what: str) -> None:
    if width > MAX_SIZE or height > MAX_SIZE:
        raise UpstreamError(f"{what} {width}x{height} is larger than we accept "
                            f"({MAX_SIZE}x{MAX_SIZE})")


@dataclass(frozen=True, slots=True)
class _Rule:
    message: str
    size: Callable[[UpstreamClient, memoryview, int], int]  # total bytes, as far as known
    handle: Callable[[UpstreamClient, memoryview, list[Event]], None]


@dataclass(frozen=True, slots=True)
class _Encoding:
    name: str
    payload: int  # fixed bytes after the header (a Raw rectangle's rows are streamed)
    answers: bool  # a rectangle of it makes the update an answer to our request
    handle: Callable[[UpstreamClient, int, int, int, int, memoryview, list[Event]], None]


# --- the machine ----------------------------------------------------------------------


class UpstreamClient:
    """One RFB connection, client side. See the module doc for the order of calls.

    `fb` is the framebuffer: uint8, shape (height, width * 4), BGRX rows. With `state`
    given (a restored checkpoint), pass the pixels as `fb` too if they are to be kept;
    otherwise a black one of the state's size is made.
    """

    def __init__(self, *, state: UpstreamState | None = None,
                 fb: np.ndarray | None = None) -> None:
        self.state = state if state is not None else UpstreamState()
        st = self.state
        if fb is None:
            fb = np.zeros((st.height, st.width * 4), dtype=np.uint8)
        if fb.shape != (st.height, st.width * 4) or fb.dtype != np.uint8:
            raise ValueError(f"fb must be uint8 ({st.height}, {st.width * 4}), not "
                             f"{fb.dtype} {fb.shape}")
        self.fb = fb

    # -- queries

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def width(self) -> int:
        return self.state.width

    @property
    def height(self) -> int:
        return self.state.height

    @property
    def session_up(self) -> bool:
        """ServerInit arrived and the machine is not poisoned."""
        return self.state.phase in _SESSION

    @property
    def ready(self) -> bool:
        """The first full framebuffer arrived and the link is not poisoned."""
        return self.state.ready and self.state.phase in _SESSION

    @property
    def ext_keys(self) -> bool:
        return self.state.ext_keys

    def read(self, x: int, y: int, w: int, h: int) -> bytes:
        """w x h BGRX pixels from (x, y), rows top to bottom."""
        if x < 0 or y < 0 or w < 0 or h < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"area {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
        return self.fb[y:y + h, 4 * x:4 * (x + w)].tobytes()

    # -- calls

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the server; returns the events of every whole message.

        A partial message stays buffered in the state until the rest arrives; a Raw
        rectangle is written to `fb` row by row as its rows arrive.
        """
        self._alive()
        st = self.state
        # `data` may be the adapter's reusable receive buffer: whatever outlives this
        # call is copied (inbuf, cut text, names); pixels go straight into fb
        buf = memoryview(st.inbuf + bytes(data)) if st.inbuf else memoryview(data)
        pos = 0
        events: list[Event] = []
        try:
            while pos < len(buf):
                key = buf[pos] if st.phase is Phase.NORMAL else None
                rule = _RULES.get((st.phase, key))
                if rule is None:
                    raise UpstreamError(f"unknown server message type {key}")
                need = rule.size(self, buf, pos)
                if len(buf) - pos < need:
                    break
                msg = buf[pos:pos + need]
                pos += need
                rule.handle(self, msg, events)
        except UpstreamError as exc:
            st.inbuf = bytes(buf[pos:])
            exc.events = events
            self._raise(exc)
        st.inbuf = bytes(buf[pos:])
        return events

    def data_to_send(self) -> bytes:
        """Drain what is queued for the server (works after a failure too)."""
        out, self.state.outbuf = self.state.outbuf, b""
        return out

    def key(self, linux_keycode: int, down: bool) -> bool:
        """Queue a key press or release. False (nothing queued) if the key cannot be
        expressed: no XT code for it, or (without the extension) no keysym."""
        self._session("key()")
        st = self.state
        bit = _SHIFT_BITS.get(linux_keycode, 0)
        code = XT_KEYCODES.get(linux_keycode) if st.ext_keys else None
        if code is not None:
            message = struct.pack(">BBHII", 255, 0, int(down), 0, code)
        else:
            keysym = keysym_for(linux_keycode, st.shift != 0 and not bit)
            if keysym is None:
                return False
            message = struct.pack(">BBxxI", 4, int(down), keysym)
        st.shift = (st.shift | bit) if down else (st.shift & ~bit)
        self._send(message)
        return True

    def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        """Queue a PointerEvent; the position is clamped to the framebuffer."""
        self._session("pointer()")
        st = self.state
        x = min(max(x, 0), max(st.width - 1, 0))
        y = min(max(y, 0), max(st.height - 1, 0))
        self._send(struct.pack(">BBHH", 5, buttons & 0xFF, x, y))

    def refresh(self) -> None:
        """Ask for the whole framebuffer now (after reconnecting, or to resync)."""
        self._session("refresh()")
        self._request(incremental=False)

    # -- handshake handlers

    def _size_version(self, buf: memoryview, pos: int) -> int:
        got = bytes(buf[pos:pos + 12])
        for i, (have, want) in enumerate(zip(got, _VERSION_SHAPE, strict=False)):
            ok = 0x30 <= have <= 0x39 if want == ord("d") else have == want
            if not ok:  # fail at the first wrong byte: a non-RFB peer may never send 12
                raise UpstreamError(f"not an RFB ProtocolVersion: {got[:i + 1]!r}")
        return 12

    def _on_version(self, msg: memoryview, events: list[Event]) -> None:
        st = self.state
        major, minor = int(bytes(msg[4:7])), int(bytes(msg[8:11]))
        if major < 3:
            raise UpstreamRefused(f"server speaks RFB {major}.{minor}; we need 3.3 or later")
        # the highest we speak that the server does (rfbproto: 3.4-3.6 are 3.3)
        st.version_minor = 8 if major > 3 else max(m for m in CLIENT_VERSION_MINORS
                                                   if m <= max(minor, 3))
        self._send(b"RFB 003.%03d\n" % st.version_minor)
        st.phase = Phase.SECURITY_33 if st.version_minor == 3 else Phase.SECURITY

    def _size_security(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos < 1:
            return 1
        count = buf[pos]
        if count == 0:  # failure, with a reason
            return _string_end(buf, pos + 1, "security failure reason") - pos
        return 1 + count

    def _on_security(self, msg: memoryview, events: list[Event]) -> None:
        if msg[0] == 0:
            raise UpstreamRefused(f"server refused the connection: {_text(msg[5:])}")
        types = list(msg[1:])
        if SEC_NONE not in types:
            raise UpstreamRefused(f"server offers security types {types}, not None (1)")
        self._send(bytes((SEC_NONE,)))
        self._security_done()

    def _size_security_33(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos >= 4 and _U32.unpack_from(buf, pos)[0] == 0:
            return _string_end(buf, pos + 4, "security failure reason") - pos
        return 4

    def _on_security_33(self, msg: memoryview, events: list[Event]) -> None:
        (kind,) = _U32.unpack_from(msg)
        if kind == 0:
            raise UpstreamRefused(f"server refused the connection: {_text(msg[8:])}")
        if kind == SEC_VNC_AUTH:
            raise UpstreamRefused("server requires VNC Authentication; we speak None only")
        if kind != SEC_NONE:
            raise UpstreamError(f"RFB 3.3 security type {kind} does not exist")
        self._security_done()

    def _size_security_result(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos >= 4 and _U32.unpack_from(buf, pos)[0] != 0:
            return _string_end(buf, pos + 4, "security failure reason") - pos
        return 4

    def _on_security_result(self, msg: memoryview, events: list[Event]) -> None:
        (result,) = _U32.unpack_from(msg)
        if result != 0:
            raise UpstreamRefused(f"security handshake failed ({result}): {_text(msg[8:])}")
        self._client_init()

    def _security_done(self) -> None:
        if self.state.version_minor >= 8:  # None has a SecurityResult only from 3.8 on
            self.state.phase = Phase.SECURITY_RESULT
        else:
            self._client_init()

    def _client_init(self) -> None:
        self._send(b"\x01")  # shared: never push another viewer of QEMU's server off
        self.state.phase = Phase.INIT

    def _size_server_init(self, buf: memoryview, pos: int) -> int:
        return _string_end(buf, pos + 20, "desktop name") - pos

    def _on_server_init(self, msg: memoryview, events: list[Event]) -> None:
        st = self.state
        width, height = struct.unpack_from(">HH", msg)
        _check_size(width, height, "ServerInit framebuffer")
        native = PixelFormat.unpack(bytes(msg[4:4 + PIXEL_FORMAT_SIZE]))
        st.name = bytes(msg[24:])
        st.colour_map_ok = not native.true_colour  # it may send a map before our format
        self._set_size(width, height)
        self._send(b"\x00\x00\x00\x00" + CLIENT_FORMAT.pack())
        self._send(struct.pack(f">BxH{len(ENCODINGS)}i", 2, len(ENCODINGS), *ENCODINGS))
        st.phase = Phase.NORMAL
        self._request(incremental=False)
        events.append(Connected(width, height, _text(st.name)))

    # -- server message handlers

    def _size_update(self, buf: memoryview, pos: int) -> int:
        return 4

    def _on_update(self, msg: memoryview, events: list[Event]) -> None:
        st = self.state
        (st.rects_left,) = struct.unpack_from(">xxH", msg)
        st.answers = st.rects_left == 0  # an empty update answers a request
        st.resized = False
        st.damage = []
        st.colour_map_ok = False  # our SetPixelFormat has been read by now
        st.phase = Phase.RECT
        if st.rects_left == 0:
            self._end_update(events)

    def _size_colour_map(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos < 6:
            return 6
        (count,) = struct.unpack_from(">H", buf, pos + 4)
        return 6 + 6 * count

    def _on_colour_map(self, msg: memoryview, events: list[Event]) -> None:
        if not self.state.colour_map_ok:
            raise UpstreamError("SetColourMapEntries, but we asked for true colour")
        # a colour-mapped server's greeting, sent before it read our SetPixelFormat

    def _on_bell(self, msg: memoryview, events: list[Event]) -> None:
        events.append(Bell())

    def _size_cut_text(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos < 8:
            return 8
        (length,) = _U32.unpack_from(buf, pos + 4)
        if length > MAX_CUT_TEXT:
            raise UpstreamError(f"ServerCutText of {length} bytes (at most {MAX_CUT_TEXT})")
        return 8 + length

    def _on_cut_text(self, msg: memoryview, events: list[Event]) -> None:
        events.append(CutText(bytes(msg[8:])))

    # -- rectangles

    def _size_rect(self, buf: memoryview, pos: int) -> int:
        if len(buf) - pos < 12:
            return 12
        (encoding,) = struct.unpack_from(">i", buf, pos + 8)
        spec = _ENCODINGS.get(encoding)
        if spec is None:
            raise UpstreamError(f"rectangle in encoding {encoding}, which we did not ask for")
        return 12 + spec.payload

    def _on_rect(self, msg: memoryview, events: list[Event]) -> None:
        st = self.state
        x, y, w, h, encoding = _RECT.unpack_from(msg)
        spec = _ENCODINGS[encoding]
        st.answers = st.answers or spec.answers
        st.rects_left -= 1
        spec.handle(self, x, y, w, h, msg[12:], events)
        if st.phase is Phase.RECT and st.rects_left == 0:
            self._end_update(events)

    def _inside(self, what: str, x: int, y: int, w: int, h: int) -> None:
        st = self.state
        if x + w > st.width or y + h > st.height:
            raise UpstreamError(f"{what} {w}x{h}+{x}+{y} outside the {st.width}x{st.height} "
                                "framebuffer")

    def _on_raw(self, x: int, y: int, w: int, h: int, payload: memoryview,
                events: list[Event]) -> None:
        self._inside("Raw rectangle", x, y, w, h)
        if w and h:
            self.state.damage.append([x, y, w, h])
            self.state.raw = [x, y, w, h]
            self.state.raw_rows = 0
            self.state.phase = Phase.RAW

    def _size_rows(self, buf: memoryview, pos: int) -> int:
        st = self.state
        row = 4 * st.raw[2]
        rows = min(st.raw[3] - st.raw_rows, (len(buf) - pos) // row)
        return row * max(rows, 1)

    def _on_rows(self, msg: memoryview, events: list[Event]) -> None:
        st = self.state
        x, y, w, h = st.raw
        n = len(msg) // (4 * w)
        top = y + st.raw_rows
        self.fb[top:top + n, 4 * x:4 * (x + w)] = np.frombuffer(msg, np.uint8).reshape(n, 4 * w)
        st.raw_rows += n
        if st.raw_rows == h:
            st.raw = []
            st.phase = Phase.RECT
            if st.rects_left == 0:
                self._end_update(events)

    def _on_copy(self, x: int, y: int, w: int, h: int, payload: memoryview,
                 events: list[Event]) -> None:
        sx, sy = struct.unpack_from(">HH", payload)
        self._inside("CopyRect destination", x, y, w, h)
        self._inside("CopyRect source", sx, sy, w, h)
        if w and h:
            fb = self.fb
            fb[y:y + h, 4 * x:4 * (x + w)] = fb[sy:sy + h, 4 * sx:4 * (sx + w)].copy()
            self.state.damage.append([x, y, w, h])

    def _on_desktop_size(self, x: int, y: int, w: int, h: int, payload: memoryview,
                         events: list[Event]) -> None:
        st = self.state
        _check_size(w, h, "DesktopSize")
        # what came before in this update was drawn on the old framebuffer: gone
        st.damage = []
        st.resized = True
        st.want_full = True
        if (w, h) != (st.width, st.height):
            self._set_size(w, h)
            events.append(Resized(w, h))

    def _on_ext_key(self, x: int, y: int, w: int, h: int, payload: memoryview,
                    events: list[Event]) -> None:
        self.state.ext_keys = True

    def _on_leds(self, x: int, y: int, w: int, h: int, payload: memoryview,
                 events: list[Event]) -> None:
        self.state.leds = payload[0]
        events.append(Leds(payload[0]))

    def _end_update(self, events: list[Event]) -> None:
        st = self.state
        st.phase = Phase.NORMAL
        st.updates += 1
        if st.damage:
            events.append(Damage(tuple((r[0], r[1], r[2], r[3]) for r in st.damage)))
            st.damage = []
        if not st.answers:
            return
        full = st.outstanding_full and not st.resized
        st.outstanding = st.outstanding_full = False
        if full and not st.ready:
            st.ready = True
            events.append(Ready())
        self._request(incremental=not st.want_full)

    # -- plumbing

    def _request(self, *, incremental: bool) -> None:
        """Send a FramebufferUpdateRequest for the whole screen. Incremental ones only
        when none is outstanding; a full one at once (it merges with the outstanding)."""
        st = self.state
        if incremental and st.outstanding:
            return
        self._send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, st.width, st.height))
        st.outstanding = True
        if not incremental:
            st.outstanding_full = True
            st.want_full = False

    def _set_size(self, width: int, height: int) -> None:
        self.state.width, self.state.height = width, height
        self.fb = np.zeros((height, width * 4), dtype=np.uint8)

    def _send(self, data: bytes) -> None:
        self.state.outbuf += data

    def _alive(self) -> None:
        if self.state.phase is Phase.FAILED:
            raise UpstreamError(f"upstream link already failed: {self.state.failure}",
                                fault="us")

    def _session(self, call: str) -> None:
        self._alive()
        if self.state.phase not in _SESSION:
            raise UpstreamError(f"{call} before the RFB session is up "
                                f"(phase {self.state.phase.value})", fault="us")

    def _raise(self, exc: UpstreamError) -> NoReturn:
        self.state.phase = Phase.FAILED
        self.state.failure = exc.reason
        raise exc


# The transition table: (phase, message type — only in NORMAL) → rule. Anything else is
# a protocol error. FAILED has no rules at all.
_RULES: dict[tuple[Phase, int | None], _Rule] = {
    (Phase.VERSION, None): _Rule("ProtocolVersion", UpstreamClient._size_version,
                                 UpstreamClient._on_version),
    (Phase.SECURITY, None): _Rule("security types", UpstreamClient._size_security,
                                  UpstreamClient._on_security),
    (Phase.SECURITY_33, None): _Rule("security type", UpstreamClient._size_security_33,
                                     UpstreamClient._on_security_33),
    (Phase.SECURITY_RESULT, None): _Rule("SecurityResult",
                                         UpstreamClient._size_security_result,
                                         UpstreamClient._on_security_result),
    (Phase.INIT, None): _Rule("ServerInit", UpstreamClient._size_server_init,
                              UpstreamClient._on_server_init),
    (Phase.NORMAL, 0): _Rule("FramebufferUpdate", UpstreamClient._size_update,
                             UpstreamClient._on_update),
    (Phase.NORMAL, 1): _Rule("SetColourMapEntries", UpstreamClient._size_colour_map,
                             UpstreamClient._on_colour_map),
    (Phase.NORMAL, 2): _Rule("Bell", lambda self, buf, pos: 1, UpstreamClient._on_bell),
    (Phase.NORMAL, 3): _Rule("ServerCutText", UpstreamClient._size_cut_text,
                             UpstreamClient._on_cut_text),
    (Phase.RECT, None): _Rule("rectangle", UpstreamClient._size_rect, UpstreamClient._on_rect),
    (Phase.RAW, None): _Rule("Raw rows", UpstreamClient._size_rows, UpstreamClient._on_rows),
}

# Rectangle encodings inside a FramebufferUpdate: exactly those we asked for.
_ENCODINGS: dict[int, _Encoding] = {
    enc.RAW: _Encoding("Raw", 0, True, UpstreamClient._on_raw),
    enc.COPY_RECT: _Encoding("CopyRect", 4, True, UpstreamClient._on_copy),
    enc.DESKTOP_SIZE: _Encoding("DesktopSize", 0, True, UpstreamClient._on_desktop_size),
    EXT_KEY_EVENT: _Encoding("QEMU Extended Key Event", 0, False, UpstreamClient._on_ext_key),
    LED_STATE: _Encoding("QEMU LED State", 1, False, UpstreamClient._on_leds),
}
