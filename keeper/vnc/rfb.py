"""Sans-I/O RFB (VNC) server core: bytes in, events out, bytes to send.

`RfbServer` never touches a socket. Its whole protocol state is `RfbState`, plain data
that round-trips through `keeper.serial` (`dumps_state` / `loads_state`), so a session
can be checkpointed between any two calls — mid-handshake, with half a client message
buffered, with an update request pending, in the middle of a ZRLE stream — and resumed
by `RfbServer(..., state=restored)` on another host, on the same TCP connection.

Order of calls (the adapter's side):

1. `connection_made()` once: queues the server's ProtocolVersion.
2. For every chunk read from the client: `events = receive_data(chunk)`; act on the
   events (KeyEvent, PointerEvent, CutText, UpdateRequested, Ready, ...).
3. After any call, write out `data_to_send()`.
4. When `wants_update()` and the display has something for the client (or at once if
   `pending_request.incremental` is false): `send_update(fb, rects, copies)`.
5. On `RfbError`: write out `data_to_send()` (it holds the RFB failure message where
   the protocol has one, e.g. SecurityResult + reason), then close the connection.
   The machine is poisoned: every call but `data_to_send()` raises from then on.

Transitions are one table, `_RULES`, keyed by (phase, message type); anything not in it
is a protocol error that names the side at fault.

Versions: the server offers 3.8; a client may answer 3.3, 3.7 or 3.8. Any other 3.x
(3.5, 3.889 from Apple, ...) is served as 3.3, as rfbproto says. Another major version
fails, with the failure message of the security handshake (3.3 form below 3.x, list form
above); a greeting that is not "RFB xxx.yyy\\n" at all fails at its first wrong byte
with nothing sent: the peer is not an RFB client.

Security: exactly one type is offered — VNC Authentication if a password is set, else
None (offering None beside a password would make the password optional).
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from keeper import serial
from keeper.errors import ProtocolError
from keeper.vnc import encodings as enc
from keeper.vnc.encodings import ZlibState, ZlibStream
from keeper.vnc.framebuffer import Framebuffer, MemoryFramebuffer
from keeper.vnc.pixels import SERVER_FORMAT, PixelFormat, native_to_values

try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # cryptography < 43
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

__all__ = [
    "CHECKPOINT_KIND", "MAX_CUT_TEXT", "MAX_RECTS", "SEC_NONE", "SEC_VNC_AUTH",
    "SERVER_VERSION", "AuthenticationFailed", "CopyRect", "CutText", "EncodingsChanged",
    "Event", "Framebuffer", "KeyEvent", "MemoryFramebuffer", "Phase", "PixelFormatChanged",
    "PointerEvent", "Ready", "Rect", "ResizeUnsupported", "RfbError", "RfbServer",
    "RfbState", "UpdateRequest", "UpdateRequested", "dumps_state", "loads_state",
    "vnc_auth_response",
]

SERVER_VERSION = b"RFB 003.008\n"
SEC_NONE = 1
SEC_VNC_AUTH = 2
MAX_CUT_TEXT = 1 << 20  # a clipboard bigger than this is refused, not buffered
MAX_RECTS = 0xFFFF  # number-of-rectangles is a U16
CHECKPOINT_KIND = "vnc.rfb"

_U32 = struct.Struct(">I")


# --- errors --------------------------------------------------------------------------


class RfbError(ProtocolError):
    """An RFB session cannot go on.

    `fault`: "client" (it broke the protocol or failed to authenticate) or "us" (the
    caller misused the core). `reason`: why, in words. `wire`: the RFB failure message
    that went out for it (SecurityResult / security-types 0 with a reason string), b""
    where RFB has none; it is already queued — `data_to_send()` returns it, do not send
    it twice. `events`: events parsed from the same `receive_data` chunk before the bad
    message; act on them (a key typed just before a protocol error still counts).
    """

    def __init__(self, reason: str, *, fault: str = "client", wire: bytes = b"") -> None:
        super().__init__(reason, fault=fault)
        self.reason = reason
        self.wire = wire
        self.events: list[Event] = []


class AuthenticationFailed(RfbError):
    """VNC Authentication failed: wrong password (SecurityResult "failed" was sent)."""


class ResizeUnsupported(RfbError):
    """The desktop changed size and the client did not declare DesktopSize (-223)."""


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """ClientInit arrived and ServerInit went out: the session is up."""

    shared: bool


@dataclass(frozen=True, slots=True)
class KeyEvent:
    keysym: int
    down: bool


@dataclass(frozen=True, slots=True)
class PointerEvent:
    buttons: int  # bit 0 left, 1 middle, 2 right, 3/4 wheel up/down, ...
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class CutText:
    text: bytes  # ISO 8859-1, as RFB defines it; decoding is the consumer's choice


@dataclass(frozen=True, slots=True)
class UpdateRequested:
    """A FramebufferUpdateRequest, cropped to the framebuffer (see `RfbServer.pending_request`
    for what is owed in total)."""

    incremental: bool
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, slots=True)
class PixelFormatChanged:
    pixel_format: PixelFormat


@dataclass(frozen=True, slots=True)
class EncodingsChanged:
    encodings: tuple[int, ...]  # in the client's order of preference


Event = (Ready | KeyEvent | PointerEvent | CutText | UpdateRequested | PixelFormatChanged
         | EncodingsChanged)


# --- geometry for send_update -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, slots=True)
class CopyRect:
    """The client should copy its own (src_x, src_y, w, h) to (x, y): a move or scroll."""

    src_x: int
    src_y: int
    x: int
    y: int
    w: int
    h: int


# --- state ---------------------------------------------------------------------------


class Phase(enum.Enum):
    NEW = "new"  # connection_made() not called yet
    VERSION = "version"  # our ProtocolVersion sent; waiting for the client's
    SECURITY = "security"  # 3.7/3.8: security types listed; waiting for the choice
    VNC_AUTH = "vnc-auth"  # challenge sent; waiting for the 16-byte response
    INIT = "init"  # security done; waiting for ClientInit
    NORMAL = "normal"  # ServerInit sent; client messages
    FAILED = "failed"  # poisoned: see RfbState.failure


@dataclass(slots=True)
class UpdateRequest:
    """What the client is owed: the union of its requests since the last update."""

    incremental: bool
    x: int
    y: int
    w: int
    h: int


@dataclass(slots=True)
class RfbState:
    """Everything a session needs to resume mid-stream. Plain data, see keeper.serial."""

    width: int  # the framebuffer's size now
    height: int
    name: str  # desktop name (ServerInit)
    phase: Phase = Phase.NEW
    version_minor: int = 0  # negotiated 3.<minor>: 3, 7 or 8
    security_type: int = 0  # the one type offered (SEC_NONE or SEC_VNC_AUTH)
    challenge: bytes = b""  # VNC Authentication challenge awaiting its response
    shared: bool = False  # ClientInit's shared-flag
    pixel_format: PixelFormat = SERVER_FORMAT  # the client's format
    encodings: list[int] = field(default_factory=list)  # from SetEncodings, client's order
    pending: UpdateRequest | None = None  # requests not answered yet, merged
    client_width: int = 0  # the size the client was last told (ServerInit/DesktopSize)
    client_height: int = 0
    full_refresh: bool = False  # a DesktopSize went out: serve the next request whole
    zlib: ZlibState = field(default_factory=ZlibState)  # the ZRLE stream
    inbuf: bytes = b""  # received, not yet a whole message
    outbuf: bytes = b""  # produced, not yet taken by data_to_send()
    updates_sent: int = 0
    failure: str = ""  # why the machine is poisoned (phase FAILED)


def dumps_state(state: RfbState) -> bytes:
    """The state as a keeper checkpoint record."""
    return serial.dumps(CHECKPOINT_KIND, state)


def loads_state(blob: bytes) -> RfbState:
    return serial.loads(CHECKPOINT_KIND, blob, RfbState)


# --- VNC Authentication ----------------------------------------------------------------

_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """DES-ECB of the challenge keyed by the password, VNC style (rfbproto "VNC
    Authentication"): first 8 bytes of the password, zero-padded, each byte's bits
    reversed (VNC takes the lowest bit first). Single DES is 3DES with K1 = K2 = K3."""
    key = password[:8].ljust(8, b"\0").translate(_BIT_REVERSED)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


# --- wire helpers ----------------------------------------------------------------------


def _reason(reason: str) -> bytes:
    data = reason.encode("utf-8", "replace")
    return _U32.pack(len(data)) + data


def _crop(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = min(x, width), min(y, height)
    return x0, y0, min(x + w, width) - x0, min(y + h, height) - y0


# Size functions: how many bytes the message starting at buf[pos] needs in total, as far
# as can be told from what is there; they raise on input that can never become valid.

_VERSION_SHAPE = b"RFB ddd.ddd\n"


def _size_version(buf: bytes, pos: int) -> int:
    got = buf[pos:pos + 12]
    for have, want in zip(got, _VERSION_SHAPE, strict=False):
        ok = 0x30 <= have <= 0x39 if want == ord("d") else have == want
        if not ok:  # fail at the first wrong byte: a non-RFB peer may never send 12
            raise RfbError(f"not an RFB ProtocolVersion: {got!r}")
    return 12


def _fixed(n: int) -> Callable[[bytes, int], int]:
    return lambda buf, pos: n


def _size_set_encodings(buf: bytes, pos: int) -> int:
    if len(buf) - pos < 4:
        return 4
    (count,) = struct.unpack_from(">H", buf, pos + 2)
    return 4 + 4 * count


def _size_cut_text(buf: bytes, pos: int) -> int:
    if len(buf) - pos < 8:
        return 8
    (length,) = _U32.unpack_from(buf, pos + 4)
    if length > MAX_CUT_TEXT:
        raise RfbError(f"ClientCutText of {length} bytes (at most {MAX_CUT_TEXT})")
    return 8 + length


@dataclass(frozen=True, slots=True)
class _Rule:
    message: str
    size: Callable[[bytes, int], int]
    handle: Callable[[RfbServer, bytes], Event | None]


# --- the machine ----------------------------------------------------------------------


class RfbServer:
    """One RFB connection, server side. See the module doc for the order of calls.

    With `state` given (a restored checkpoint), `width`, `height` and `name` are taken
    from the state and the arguments are ignored; `password` and `random` are never part
    of the state (no secret goes into a checkpoint) and must be passed again.
    `random(n)` supplies the 16-byte VNC Authentication challenge.
    """

    def __init__(
        self,
        *,
        width: int,
        height: int,
        name: str,
        password: bytes | None = None,
        random: Callable[[int], bytes] = os.urandom,
        state: RfbState | None = None,
    ) -> None:
        if state is None:
            _check_size(width, height)
            state = RfbState(width=width, height=height, name=name)
        self.state = state
        self._password = password
        self._random = random
        self._zlib = ZlibStream(state.zlib)  # the live compressor is a cache, not state

    # -- queries

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def pending_request(self) -> UpdateRequest | None:
        """The area the client is owed an update for (None: nothing owed). If not
        `incremental`, all of it must be sent, not just what changed."""
        return self.state.pending

    def wants_update(self) -> bool:
        return self.state.phase is Phase.NORMAL and self.state.pending is not None

    def accepts(self, encoding: int) -> bool:
        """Did the client list this (pseudo-)encoding? Raw is always accepted."""
        return encoding == enc.RAW or encoding in self.state.encodings

    # -- calls

    def connection_made(self) -> None:
        """Queue the server's ProtocolVersion; call once, first."""
        self._alive()
        if self.state.phase is not Phase.NEW:
            self._raise(RfbError("connection_made() called twice", fault="us"))
        self._send(SERVER_VERSION)
        self.state.phase = Phase.VERSION

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; returns the events of every whole message.

        A partial message stays buffered in the state until the rest arrives.
        """
        self._alive()
        st = self.state
        buf = st.inbuf + data
        pos = 0
        events: list[Event] = []
        try:
            while pos < len(buf):
                key = buf[pos] if st.phase is Phase.NORMAL else None
                rule = _RULES.get((st.phase, key))
                if rule is None:
                    raise self._unexpected(key)
                need = rule.size(buf, pos)
                if len(buf) - pos < need:
                    break
                msg = buf[pos:pos + need]
                pos += need
                event = rule.handle(self, msg)
                if event is not None:
                    events.append(event)
        except RfbError as exc:
            st.inbuf = buf[pos:]
            exc.events = events
            self._raise(exc)
        st.inbuf = buf[pos:]
        return events

    def data_to_send(self) -> bytes:
        """Drain what is queued for the client. Also works after a failure (the RFB
        failure message is in it)."""
        out, self.state.outbuf = self.state.outbuf, b""
        return out

    def send_update(
        self, fb: Framebuffer, rects: Sequence[Rect], copies: Sequence[CopyRect] = ()
    ) -> None:
        """Answer the pending request with one FramebufferUpdate and clear it.

        `copies` go first, in order, as CopyRect when the client accepts it and the
        request is incremental (rfbproto: a non-incremental area is never CopyRect'd);
        otherwise their destinations are sent as pixels. Then `rects`, clipped to the
        framebuffer, in the client's pixel format with the best encoding it accepts
        (ZRLE > Hextile > Raw). Empty `rects` is a valid (empty) update.

        If the desktop was resized since the client last heard (see `resize`), the update
        is only the DesktopSize pseudo-rectangle — rfbproto asks for no pixel data beside
        it, the client may drop its contents — and the next request the client makes is
        turned into a full, non-incremental one (`pending_request` says so).
        """
        self._alive()
        st = self.state
        if st.phase is not Phase.NORMAL or st.pending is None:
            self._raise(RfbError("send_update() without a pending "
                                 "FramebufferUpdateRequest", fault="us"))
        if (fb.width, fb.height) != (st.width, st.height):
            self._raise(RfbError(f"framebuffer is {fb.width}x{fb.height} but the session is "
                                 f"{st.width}x{st.height}: call resize() first", fault="us"))
        if (st.width, st.height) != (st.client_width, st.client_height):
            if not self.accepts(enc.DESKTOP_SIZE):
                self._raise(self._resize_unsupported())
            parts = [enc.desktop_size(st.width, st.height)]
            st.client_width, st.client_height = st.width, st.height
            st.full_refresh = True
        else:
            parts = self._encode_rects(fb, rects, copies)
        st.pending = None
        st.updates_sent += 1
        self._send(struct.pack(">BxH", 0, len(parts)) + b"".join(parts))

    def resize(self, width: int, height: int) -> None:
        """The desktop is now width x height.

        Before ServerInit this just changes what ServerInit will say. Afterwards, the next
        `send_update` carries a DesktopSize pseudo-rectangle — if the client accepted
        DesktopSize (-223). If it did not, it cannot follow, and `ResizeUnsupported`
        (fault "us", nothing on the wire: RFB has no message for this) poisons the
        machine: close the connection, the viewer reconnects and gets the new size.
        Resizing back to the size the client knows before it was told cancels the change.
        A size that does not fit RFB's U16s is a ValueError (the machine stays usable).
        """
        self._alive()
        _check_size(width, height)
        st = self.state
        st.width, st.height = width, height
        if st.pending is not None:
            p = st.pending
            p.x, p.y, p.w, p.h = _crop(p.x, p.y, p.w, p.h, width, height)
        if (st.phase is Phase.NORMAL and (width, height) != (st.client_width, st.client_height)
                and not self.accepts(enc.DESKTOP_SIZE)):
            self._raise(self._resize_unsupported())

    def close_reason(self, reason: str) -> bytes:
        """End the session on our side (shutting down, refusing a client) with the RFB
        failure message the current phase allows, and poison the machine.

        Returns the bytes it queued (also in `data_to_send()`): SecurityResult "failed"
        (plus the reason string for 3.8) while the client waits for an authentication
        result, b"" everywhere else — RFB has no way to say why there. Idempotent.
        """
        st = self.state
        if st.phase is Phase.FAILED:
            return b""
        wire = b""
        if st.phase is Phase.VNC_AUTH:
            wire = _U32.pack(1) + (_reason(reason) if st.version_minor >= 8 else b"")
        self._poison(RfbError(reason, fault="us", wire=wire))
        return wire

    # -- handshake handlers

    def _on_version(self, msg: bytes) -> None:
        st = self.state
        major, minor = int(msg[4:7]), int(msg[8:11])
        if major != 3:
            reason = f"unsupported RFB version {major}.{minor}; this server speaks 3.3-3.8"
            # the failure form of the version the client claims: 3.3's below 3.x, else 3.7's
            wire = (_U32.pack(0) if major < 3 else b"\x00") + _reason(reason)
            raise RfbError(reason, wire=wire)
        st.version_minor = minor if minor in (7, 8) else 3  # rfbproto: others mean 3.3
        offered = SEC_VNC_AUTH if self._password is not None else SEC_NONE
        st.security_type = offered
        if st.version_minor == 3:  # the server decides, one word
            self._send(_U32.pack(offered))
            self._start_security()
        else:
            self._send(bytes((1, offered)))
            st.phase = Phase.SECURITY

    def _on_security(self, msg: bytes) -> None:
        st = self.state
        if msg[0] != st.security_type:
            reason = f"security type {msg[0]} was not offered (offered {st.security_type})"
            # only 3.8 has a SecurityResult after a refused choice; 3.7 just closes
            wire = _U32.pack(1) + _reason(reason) if st.version_minor >= 8 else b""
            raise RfbError(reason, wire=wire)
        self._start_security()

    def _start_security(self) -> None:
        st = self.state
        if st.security_type == SEC_VNC_AUTH:
            challenge = self._random(16)
            if len(challenge) != 16:
                raise RfbError(f"random() gave {len(challenge)} bytes, not 16", fault="us")
            st.challenge = bytes(challenge)
            self._send(st.challenge)
            st.phase = Phase.VNC_AUTH
        else:
            if st.version_minor >= 8:  # None has a SecurityResult only from 3.8 on
                self._send(_U32.pack(0))
            st.phase = Phase.INIT

    def _on_vnc_auth(self, msg: bytes) -> None:
        st = self.state
        if self._password is None:
            raise RfbError("VNC Authentication in progress but no password given "
                           "(restored without it?)", fault="us")
        expected = vnc_auth_response(self._password, st.challenge)
        st.challenge = b""
        if not hmac.compare_digest(msg, expected):
            reason = "authentication failed"
            wire = _U32.pack(1) + (_reason(reason) if st.version_minor >= 8 else b"")
            raise AuthenticationFailed(reason, wire=wire)
        self._send(_U32.pack(0))
        st.phase = Phase.INIT

    def _on_client_init(self, msg: bytes) -> Event:
        st = self.state
        st.shared = msg[0] != 0
        name = st.name.encode("utf-8")
        self._send(struct.pack(">HH", st.width, st.height) + SERVER_FORMAT.pack()
                   + _U32.pack(len(name)) + name)
        st.client_width, st.client_height = st.width, st.height
        st.pixel_format = SERVER_FORMAT
        st.phase = Phase.NORMAL
        return Ready(shared=st.shared)

    # -- client message handlers

    def _on_set_pixel_format(self, msg: bytes) -> Event:
        fmt = PixelFormat.unpack(msg[4:20])
        problem = fmt.problem()
        if problem is not None:
            raise RfbError(f"SetPixelFormat: {problem}")
        self.state.pixel_format = fmt
        return PixelFormatChanged(fmt)

    def _on_set_encodings(self, msg: bytes) -> Event:
        codes = struct.unpack(f">{(len(msg) - 4) // 4}i", msg[4:])
        self.state.encodings = list(codes)
        return EncodingsChanged(codes)

    def _on_update_request(self, msg: bytes) -> Event:
        st = self.state
        incremental, x, y, w, h = struct.unpack(">xBHHHH", msg)
        x, y, w, h = _crop(x, y, w, h, st.width, st.height)
        inc = incremental != 0
        if st.full_refresh:  # first request after a DesktopSize: the client has nothing
            inc, x, y, w, h = False, 0, 0, st.width, st.height
            st.full_refresh = False
        p = st.pending
        if p is None:
            st.pending = UpdateRequest(inc, x, y, w, h)
        elif w and h:
            if p.w and p.h:
                x0, y0 = min(p.x, x), min(p.y, y)
                x1, y1 = max(p.x + p.w, x + w), max(p.y + p.h, y + h)
            else:
                x0, y0, x1, y1 = x, y, x + w, y + h
            st.pending = UpdateRequest(p.incremental and inc, x0, y0, x1 - x0, y1 - y0)
        else:
            p.incremental = p.incremental and inc
        return UpdateRequested(inc, x, y, w, h)

    def _on_key(self, msg: bytes) -> Event:
        down, keysym = struct.unpack(">xBxxI", msg)
        return KeyEvent(keysym=keysym, down=down != 0)

    def _on_pointer(self, msg: bytes) -> Event:
        buttons, x, y = struct.unpack(">xBHH", msg)
        return PointerEvent(buttons=buttons, x=x, y=y)

    def _on_cut_text(self, msg: bytes) -> Event:
        return CutText(text=msg[8:])

    # -- updates

    def _pixel_encoding(self) -> int:
        for code in (enc.ZRLE, enc.HEXTILE):
            if code in self.state.encodings:
                return code
        return enc.RAW

    def _encode_rects(
        self, fb: Framebuffer, rects: Sequence[Rect], copies: Sequence[CopyRect]
    ) -> list[bytes]:
        st = self.state
        assert st.pending is not None
        use_copy = self.accepts(enc.COPY_RECT) and st.pending.incremental
        parts: list[bytes] = []
        pixel_rects: list[tuple[int, int, int, int]] = []
        for c in copies:
            inside = (min(c.src_x, c.src_y, c.x, c.y) >= 0
                      and max(c.src_x, c.x) + c.w <= st.width
                      and max(c.src_y, c.y) + c.h <= st.height)
            if not inside or c.w < 0 or c.h < 0:
                self._raise(RfbError(f"{c} outside the {st.width}x{st.height} framebuffer",
                                     fault="us"))
            if c.w == 0 or c.h == 0:
                continue
            if use_copy:
                parts.append(enc.rect_header(c.x, c.y, c.w, c.h, enc.COPY_RECT)
                             + enc.encode_copyrect(c.src_x, c.src_y))
            else:
                pixel_rects.append((c.x, c.y, c.w, c.h))
        for r in rects:
            x0, y0 = max(r.x, 0), max(r.y, 0)
            x, y, w, h = _crop(x0, y0, r.x + r.w - x0, r.y + r.h - y0, st.width, st.height)
            if w > 0 and h > 0:
                pixel_rects.append((x, y, w, h))
        if len(parts) + len(pixel_rects) > MAX_RECTS:
            # too many to count in a U16: one bounding box says the same, in more pixels
            # (CopyRects included: their destinations are in the framebuffer already)
            boxes = pixel_rects + [(c.x, c.y, c.w, c.h) for c in copies if c.w and c.h]
            x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
            x1 = max(b[0] + b[2] for b in boxes)
            y1 = max(b[1] + b[3] for b in boxes)
            parts, pixel_rects = [], [(x0, y0, x1 - x0, y1 - y0)]
        encoding = self._pixel_encoding()
        fmt = st.pixel_format
        for x, y, w, h in pixel_rects:
            values = native_to_values(fb.read(x, y, w, h), w, h, fmt)
            parts.append(enc.rect_header(x, y, w, h, encoding)
                         + self._encode(encoding, values, fmt))
        return parts

    def _encode(self, encoding: int, values: np.ndarray, fmt: PixelFormat) -> bytes:
        if encoding == enc.ZRLE:
            return enc.encode_zrle(values, fmt, self._zlib)
        if encoding == enc.HEXTILE:
            return enc.encode_hextile(values, fmt)
        return enc.encode_raw(values, fmt)

    # -- plumbing

    def _send(self, data: bytes) -> None:
        self.state.outbuf += data

    def _alive(self) -> None:
        if self.state.phase is Phase.FAILED:
            raise RfbError(f"RFB session already failed: {self.state.failure}", fault="us")

    def _poison(self, exc: RfbError) -> None:
        self.state.phase = Phase.FAILED
        self.state.failure = exc.reason
        self._send(exc.wire)

    def _raise(self, exc: RfbError) -> NoReturn:
        self._poison(exc)
        raise exc

    def _unexpected(self, key: int | None) -> RfbError:
        if self.state.phase is Phase.NEW:
            return RfbError("data received before connection_made()", fault="us")
        return RfbError(f"unknown client message type {key}")

    def _resize_unsupported(self) -> RfbError:
        st = self.state
        return ResizeUnsupported(
            f"desktop resized to {st.width}x{st.height} and the client did not accept "
            f"DesktopSize ({enc.DESKTOP_SIZE})", fault="us")


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        raise ValueError(f"framebuffer size {width}x{height} does not fit RFB's U16s")


# The transition table: (phase, message type — only in NORMAL) → rule. Anything else is
# a protocol error. Handlers move the phase on; FAILED has no rules at all.
_RULES: dict[tuple[Phase, int | None], _Rule] = {
    (Phase.VERSION, None): _Rule("ProtocolVersion", _size_version, RfbServer._on_version),
    (Phase.SECURITY, None): _Rule("security-type", _fixed(1), RfbServer._on_security),
    (Phase.VNC_AUTH, None): _Rule("VNC auth response", _fixed(16), RfbServer._on_vnc_auth),
    (Phase.INIT, None): _Rule("ClientInit", _fixed(1), RfbServer._on_client_init),
    (Phase.NORMAL, 0): _Rule("SetPixelFormat", _fixed(20), RfbServer._on_set_pixel_format),
    (Phase.NORMAL, 2): _Rule("SetEncodings", _size_set_encodings, RfbServer._on_set_encodings),
    (Phase.NORMAL, 3): _Rule("FramebufferUpdateRequest", _fixed(10),
                             RfbServer._on_update_request),
    (Phase.NORMAL, 4): _Rule("KeyEvent", _fixed(8), RfbServer._on_key),
    (Phase.NORMAL, 5): _Rule("PointerEvent", _fixed(6), RfbServer._on_pointer),
    (Phase.NORMAL, 6): _Rule("ClientCutText", _size_cut_text, RfbServer._on_cut_text),
}
