"""Sans-I/O WebSocket (RFC 6455) server core, after the handshake: bytes in, events out,
bytes to send.

`WsServer` never touches a socket, and its whole state is `WsState`: plain data that
round-trips through `keeper.serial`, so a connection can be checkpointed between any
two calls — with half a frame header buffered, in the middle of a frame's payload (the
mask and the offset into it are state), inside a fragmented message, with a Close sent
and the peer's awaited — and go on with `WsServer(state=restored)` on another host,
on the same TCP connection. (wsproto keeps its parser in objects we cannot serialise,
and aiohttp's WebSocket hides its buffers; hence this small core. The tests use
wsproto as the peer.)

Binary payloads are streamed: a frame's payload is handed out as it arrives
(`BinaryData`), never buffered whole, so only a frame header (at most 14 bytes) and a
control frame's payload (at most 125) are ever held. Text messages are buffered (UTF-8
is checked on the whole message) up to `max_text`.

Order of calls (the adapter's side):

1. For every chunk read: `events = receive_data(chunk)`; act on them. A Ping is
   answered by the core itself; on `CloseReceived` the core has queued its reply
   (when it had not sent a Close already): write it out, then close the TCP
   connection (the server closes first, RFC 6455 §7.1.1).
2. `send_binary(data)` frames data for the peer; `close(code, reason)` starts the
   closing handshake (idempotent).
3. After any call, write out `data_to_send()`.
4. On `WsError`: write out `data_to_send()` (the Close frame with the error's status
   code, 1002 protocol error, 1007 bad UTF-8, 1009 too big), then close the TCP
   connection. The machine is poisoned: every call but `data_to_send()` raises.

What a client sends is checked as RFC 6455 asks of a server: every frame masked, no
RSV bit (no extension is negotiated), known opcodes only, control frames final and at
most 125 bytes, lengths in their shortest form, continuation frames only inside a
fragmented message and no new message inside one, Close codes that may be sent on the
wire, UTF-8 in text and in Close reasons. Frame acceptance is one table, `_RULES`,
keyed by (phase, opcode).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from keeper import serial
from keeper.errors import ProtocolError

__all__ = [
    "CHECKPOINT_KIND", "BinaryData", "CloseReceived", "Event", "Phase", "Ping", "Pong",
    "TextMessage", "WsError", "WsServer", "WsState", "dumps_state", "frame", "loads_state",
]

CHECKPOINT_KIND = "web.ws"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# status codes (RFC 6455 §7.4.1)
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005  # never on the wire: "the Close frame had no code"
INVALID_DATA = 1007
POLICY = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011

MAX_CONTROL = 125
MAX_TEXT = 1 << 20


def _valid_code(code: int) -> bool:
    """May this code be sent in a Close frame? (1004-1006 and 1015 are reserved or
    local-only, 1016-2999 reserved for the protocol.)"""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


# --- errors and events ------------------------------------------------------------------


class WsError(ProtocolError):
    """The WebSocket connection cannot go on. `code`: the status code of the Close frame
    that went out for it (already queued: `data_to_send()` has it). `events`: what the
    same `receive_data` chunk gave before the bad frame; act on them."""

    def __init__(self, reason: str, *, code: int = PROTOCOL_ERROR,
                 fault: str = "client") -> None:
        super().__init__(reason, fault=fault)
        self.reason = reason
        self.code = code
        self.events: list[Event] = []


@dataclass(frozen=True, slots=True)
class BinaryData:
    """Payload of a binary message, as it arrived; `message_finished` on its last part."""

    data: bytes
    message_finished: bool


@dataclass(frozen=True, slots=True)
class TextMessage:
    text: str


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes  # already answered with a Pong


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    code: int  # NO_STATUS (1005) if the frame had none
    reason: str


Event = BinaryData | TextMessage | Ping | Pong | CloseReceived


# --- state -----------------------------------------------------------------------------


class Phase(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # we sent a Close, the peer's has not come yet
    CLOSED = "closed"  # the peer's Close came (and ours went): close the TCP connection
    FAILED = "failed"  # poisoned: see WsState.failure


@dataclass(slots=True)
class WsState:
    """Everything a connection needs to resume mid-stream. Plain data, see keeper.serial."""

    phase: Phase = Phase.OPEN
    header: bytes = b""  # the next frame's header, while incomplete (at most 14 bytes)
    # the frame being received: its header is parsed, `frame_left` payload bytes to come
    frame_opcode: int = -1  # -1: between frames
    frame_fin: bool = False
    frame_mask: bytes = b""
    frame_left: int = 0
    frame_pos: int = 0  # payload bytes of the frame taken so far (the mask's offset)
    control: bytes = b""  # a control frame's payload so far
    message: int = 0  # the data message in progress (TEXT or BINARY), 0 if none
    text: bytes = b""  # a text message's payload so far (checked as UTF-8 at its end)
    max_text: int = MAX_TEXT
    close_sent: bool = False
    close_code: int = 0  # what the peer's Close said, once it came
    close_reason: str = ""
    outbuf: bytes = b""  # produced, not yet taken by data_to_send()
    frames_in: int = 0
    frames_out: int = 0
    failure: str = ""


def dumps_state(state: WsState) -> bytes:
    return serial.dumps(CHECKPOINT_KIND, state)


def loads_state(blob: bytes) -> WsState:
    return serial.loads(CHECKPOINT_KIND, blob, WsState)


# --- frames ------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame on the wire. A server sends unmasked frames; `mask` (4 bytes) is for
    a client's (the tests' hand-made frames)."""
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 1 << 16:
        head += struct.pack(">BH", bit | 126, n)
    else:
        head += struct.pack(">BQ", bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + _unmask(payload, mask, 0)


def _unmask(data: bytes, mask: bytes, pos: int) -> bytes:
    """XOR with the mask, starting at offset `pos` of the payload (same both ways)."""
    if not data:
        return b""
    k = pos % 4
    key = (mask[k:] + mask[:k]) * (len(data) // 4 + 1)
    n = len(data)
    value = int.from_bytes(data, "little") ^ int.from_bytes(key[:n], "little")
    return value.to_bytes(n, "little")


def _header_size(buf: bytes) -> int:
    """How many bytes the frame header at the start of `buf` takes (at least 2)."""
    if len(buf) < 2:
        return 2
    size = 2 + (4 if buf[1] & 0x80 else 0)
    length = buf[1] & 0x7F
    return size + (2 if length == 126 else 8 if length == 127 else 0)


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str  # "data", "continuation" or "control"
    finish: Callable[[WsServer], Event | None]  # when the frame's payload is complete


# --- the machine -----------------------------------------------------------------------


class WsServer:
    """The server side of one WebSocket connection after the opening handshake (see
    keeper.web.http for that). See the module doc for the order of calls."""

    def __init__(self, *, state: WsState | None = None) -> None:
        self.state = state if state is not None else WsState()

    @property
    def phase(self) -> Phase:
        return self.state.phase

    # -- calls

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the peer; returns the events they complete."""
        self._alive()
        st = self.state
        events: list[Event] = []
        buf, pos = st.header + data, 0
        st.header = b""
        try:
            while pos < len(buf):
                if st.phase is Phase.CLOSED:
                    raise WsError("data after the Close frame")
                if st.frame_opcode < 0:
                    need = _header_size(buf[pos:pos + 2])
                    if len(buf) - pos < need:
                        st.header = buf[pos:]
                        break
                    self._start_frame(buf[pos:pos + need])
                    pos += need
                else:
                    take = min(st.frame_left, len(buf) - pos)
                    chunk = _unmask(buf[pos:pos + take], st.frame_mask, st.frame_pos)
                    pos += take
                    st.frame_left -= take
                    st.frame_pos += take
                    event = self._payload(chunk)
                    if event is not None:
                        events.append(event)
                if st.frame_opcode >= 0 and st.frame_left == 0:
                    event = self._end_frame()
                    if event is not None:
                        events.append(event)
        except WsError as exc:
            exc.events = events
            self._raise(exc)
        return events

    def data_to_send(self) -> bytes:
        """Drain what is queued for the peer (also after a failure: the Close is in it)."""
        out, self.state.outbuf = self.state.outbuf, b""
        return out

    def send_binary(self, data: bytes) -> None:
        """One binary message (nothing for b""). Not after a Close went out."""
        self._alive()
        if self.state.close_sent:  # our mistake: it poisons nothing
            raise WsError("send_binary() after close()", fault="us", code=INTERNAL_ERROR)
        if data:
            self._send(BINARY, data)

    def send_ping(self, payload: bytes = b"") -> None:
        self._alive()
        if len(payload) > MAX_CONTROL:
            raise ValueError(f"a ping payload has at most {MAX_CONTROL} bytes")
        if not self.state.close_sent:
            self._send(PING, payload)

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the closing handshake (or finish it, if the peer's Close came first).
        Idempotent; also fine on a failed machine (nothing more is sent)."""
        st = self.state
        if st.close_sent or st.phase is Phase.FAILED:
            return
        if not _valid_code(code):
            raise ValueError(f"close code {code} may not be sent")
        self._send_close(code, reason)
        if st.phase is Phase.OPEN:
            st.phase = Phase.CLOSING

    # -- frames in

    def _start_frame(self, head: bytes) -> None:
        st = self.state
        b0, b1 = head[0], head[1]
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        rule = _RULES.get((st.phase, opcode))
        if rule is None:
            raise WsError(f"unknown opcode {opcode:#x}")
        if b0 & 0x70:
            raise WsError(f"RSV bits {(b0 >> 4) & 7:#o} set, no extension was negotiated")
        if not b1 & 0x80:
            raise WsError("unmasked frame from the client (RFC 6455 §5.1)")
        length, rest = b1 & 0x7F, head[2:]
        if length == 126:
            (length,) = struct.unpack_from(">H", rest)
            rest = rest[2:]
            if length < 126:
                raise WsError(f"length {length} not in its shortest form")
        elif length == 127:
            (length,) = struct.unpack_from(">Q", rest)
            rest = rest[8:]
            if length >> 63:
                raise WsError("64-bit length with its most significant bit set")
            if length < 1 << 16:
                raise WsError(f"length {length} not in its shortest form")
        if rule.kind == "control":
            if not fin:
                raise WsError(f"fragmented control frame (opcode {opcode:#x})")
            if length > MAX_CONTROL:
                raise WsError(f"control frame of {length} bytes (at most {MAX_CONTROL})")
        elif rule.kind == "continuation":
            if not st.message:
                raise WsError("continuation frame outside a fragmented message")
        elif st.message:
            raise WsError(f"new data frame (opcode {opcode:#x}) inside a fragmented message")
        else:
            st.message = opcode
        if st.message == TEXT and rule.kind != "control" and (
                len(st.text) + length > st.max_text):
            raise WsError(f"text message over {st.max_text} bytes", code=TOO_BIG)
        st.frame_opcode, st.frame_fin, st.frame_mask = opcode, fin, bytes(rest[:4])
        st.frame_left, st.frame_pos = length, 0
        st.frames_in += 1

    def _payload(self, chunk: bytes) -> Event | None:
        st = self.state
        if st.frame_opcode >= CLOSE:
            st.control += chunk
        elif st.message == TEXT:
            st.text += chunk
        elif chunk:
            return BinaryData(chunk, st.frame_fin and st.frame_left == 0)
        return None

    def _end_frame(self) -> Event | None:
        st = self.state
        rule = _RULES[(st.phase, st.frame_opcode)]
        event = rule.finish(self)
        if rule.kind != "control" and st.frame_fin:
            st.message = 0
        st.frame_opcode, st.frame_fin, st.frame_mask = -1, False, b""
        st.frame_left = st.frame_pos = 0
        return event

    def _finish_data(self) -> Event | None:
        st = self.state
        if st.message == TEXT:
            if not st.frame_fin:
                return None
            raw, st.text = st.text, b""
            try:
                return TextMessage(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise WsError(f"text message is not UTF-8: {exc}", code=INVALID_DATA) from exc
        if st.frame_pos == 0 and st.frame_fin:  # an empty last frame ends the message
            return BinaryData(b"", True)
        return None

    def _finish_ping(self) -> Event:
        payload, self.state.control = self.state.control, b""
        if not self.state.close_sent:
            self._send(PONG, payload)
        return Ping(payload)

    def _finish_pong(self) -> Event:
        payload, self.state.control = self.state.control, b""
        return Pong(payload)

    def _finish_close(self) -> Event:
        st = self.state
        payload, st.control = st.control, b""
        if len(payload) == 1:
            raise WsError("Close frame with a 1-byte payload")
        code, reason = NO_STATUS, ""
        if payload:
            (code,) = struct.unpack_from(">H", payload)
            if not _valid_code(code):
                raise WsError(f"close code {code} may not be sent on the wire")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WsError(f"close reason is not UTF-8: {exc}",
                              code=INVALID_DATA) from exc
        st.close_code, st.close_reason = code, reason
        if not st.close_sent:  # echo the code, as endpoints typically do (§5.5.1)
            self._send_close(None if code == NO_STATUS else code, "")
        st.phase = Phase.CLOSED
        return CloseReceived(code, reason)

    # -- plumbing

    def _send(self, opcode: int, payload: bytes) -> None:
        self.state.outbuf += frame(opcode, payload)
        self.state.frames_out += 1

    def _send_close(self, code: int | None, reason: str) -> None:
        payload = b"" if code is None else struct.pack(">H", code) + reason.encode()[:123]
        self._send(CLOSE, payload)
        self.state.close_sent = True

    def _alive(self) -> None:
        if self.state.phase is Phase.FAILED:
            raise WsError(f"WebSocket already failed: {self.state.failure}", fault="us")

    def _raise(self, exc: WsError) -> NoReturn:
        st = self.state
        if not st.close_sent and st.phase is not Phase.CLOSED:
            self._send_close(exc.code, exc.reason[:120])
        st.phase = Phase.FAILED
        st.failure = exc.reason
        raise exc


_DATA = _Rule("data", WsServer._finish_data)
_CONT = _Rule("continuation", WsServer._finish_data)
_PING = _Rule("control", WsServer._finish_ping)
_PONG = _Rule("control", WsServer._finish_pong)
_CLOSE = _Rule("control", WsServer._finish_close)

# Which frames each phase accepts, by opcode. After our Close the peer may still send
# data until its own Close (§5.5.1); after the peer's Close nothing more may come.
_RULES: dict[tuple[Phase, int], _Rule] = {
    (phase, opcode): rule
    for phase in (Phase.OPEN, Phase.CLOSING)
    for opcode, rule in ((CONTINUATION, _CONT), (TEXT, _DATA), (BINARY, _DATA),
                         (CLOSE, _CLOSE), (PING, _PING), (PONG, _PONG))
}
