"""Move a live asyncssh server connection to another process on the same TCP session.

The one module that knows asyncssh's internals, pinned to exactly `ASYNCSSH_VERSION`:
refuse to move under any other version, and rerun tests/ssh on every upgrade.

A session can move when its whole transport state is keys and counters: the
ciphers in `MOVABLE_CIPHERS` (chacha20-poly1305: nonce = sequence number; AES-GCM:
the IV carries the invocation counter), no compression, no time-based rekeying, no
line editor, and only session channels served by explicit `SSHServerSession`
callbacks (a suspended coroutine cannot be serialised). AES-CTR/CBC keep their
counter inside an OpenSSL context that cannot be read out.

Call order in the old process (a connection goes LIVE -> FROZEN -> RELEASED):

1. `await quiesce(conn, timeout)` - keeps application output in the channel
   buffers (it moves with them); waits, reading, until no key exchange, request or
   channel change is in flight; stops reading at a packet boundary; waits until
   asyncio's write buffer is empty; stops the keepalive and login timers; fences
   every send. On NotMovable the connection carries on where it is.
2. `state = export(conn)` - plain data (`SshSessionState`) that round-trips through
   keeper.serial. It holds live session keys: never store it readable by others,
   delete it after use, encrypt and authenticate it between hosts.
3. `sock = dup_socket(conn)` - the TCP socket to hand over (fd passing, TCP repair).
4. Either `release(conn)` once the new process has adopted the session: the old
   object is dropped without sending a byte (the same key and sequence number
   would reuse keystream) and only this process's fd is closed; or
   `resume_in_place(conn)` if the move is abandoned before the new process sent
   anything.

In the new process: `conn = await import_(state, sock, server_factory=...,
session_factory=..., options=server_options(...))`; it continues on that socket.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.channel import SSHServerChannel
from asyncssh.connection import (
    SSHConnection,
    SSHServerConnection,
    SSHServerConnectionOptions,
)
from asyncssh.encryption import ChachaEncryption, Encryption, GCMEncryption, get_encryption
from asyncssh.stream import SSHServerStreamSession

from keeper.errors import NotMovable

ASYNCSSH_VERSION = "2.24.1"
MOVABLE_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
)
# Server-initiated rekeying by volume stays possible but rare; the client rekeys on
# its own limits anyway and quiesce waits such an exchange out.
REKEY_BYTES = 1 << 40
# Unsent channel output beyond this makes the snapshot (and the freeze) too big.
MAX_BUFFERED_OUTPUT = 4 * 1024 * 1024
_POLL_SECONDS = 0.005

log = logging.getLogger(__name__)


# -- the exported state ---------------------------------------------------------


@dataclass
class CipherState:
    """One direction's packet cipher: just a key and, for GCM, the current nonce."""

    alg: str
    key: bytes  # chacha: the 64-byte key as negotiated (main key, then header key)
    iv: bytes = b""  # GCM: 4-byte fixed part + 8-byte invocation counter, current


@dataclass
class DataChunk:
    data: bytes
    datatype: int | None = None  # None: ordinary data; else an extended data type


@dataclass
class ChannelState:
    """An SSHServerChannel (a session channel) and its application session's state."""

    recv_chan: int  # our channel number
    send_chan: int | None  # the client's (None once we sent CLOSE)
    send_state: str  # open | eof_pending | eof | close_pending | closed
    recv_state: str  # open | eof_pending | eof
    send_window: int
    send_pktsize: int
    send_paused: bool
    send_buf: list[DataChunk]
    send_high_water: int
    send_low_water: int
    init_recv_window: int
    recv_window: int
    recv_pktsize: int
    recv_paused: bool
    recv_starting: bool  # no shell/exec yet: asyncssh holds input until it starts
    recv_buf: list[DataChunk]
    encoding: str | None
    errors: str
    decoder_pending: bytes  # an incomplete multi-byte character, if any
    decoder_flag: int
    env: dict[bytes, bytes]
    command: str | None
    subsystem: str | None
    allow_pty: bool
    session_started: bool
    term_type: str | None
    term_size: list[int]  # width, height, pixel width, pixel height
    term_modes: dict[int, int]
    extra: dict[str, Any]
    app: dict[str, Any]  # the application session's own state, opaque here


@dataclass
class SshSessionState:
    """Everything that makes up an established asyncssh server connection."""

    asyncssh_version: str
    client_version: bytes
    server_version: bytes
    client_kexinit: bytes
    server_kexinit: bytes
    session_id: bytes
    strict_kex: bool
    enc_alg_cs: str
    enc_alg_sc: str
    mac_alg_cs: str
    mac_alg_sc: str
    cmp_alg_cs: str
    cmp_alg_sc: str
    send: CipherState
    recv: CipherState
    send_seq: int
    recv_seq: int
    send_enchdrlen: int
    send_blocksize: int
    recv_blocksize: int
    recv_macsize: int
    inpbuf: bytes  # read but not yet processed: at most one partial packet, raw
    rekey_bytes_sent: int
    rekey_ms_left: int | None
    keepalive_count: int
    keepalive_ms_left: int | None
    keepalive_replies_pending: int  # our keepalive requests the client has yet to answer
    max_recv_pktlen: int
    next_recv_chan: int
    username: str
    auth_was_trivial: bool
    can_recv_ext_info: bool
    extensions_to_send: list[list[bytes]]
    key_options: dict[str, Any]
    cert_options: dict[str, Any] | None
    peer_host: str
    extra: dict[str, Any]
    channels: list[ChannelState] = field(default_factory=list)


# -- the application side ---------------------------------------------------------


class MovableSession(asyncssh.SSHServerSession):
    """An SSHServerSession whose state is plain data, so it can move with the connection.

    The new process builds it with `session_factory(app_state)` and then calls
    `connection_made(chan)` and `session_restored()`; pty_requested, shell_requested
    and session_started are not called again (the channel already knows).
    """

    def export_state(self) -> dict[str, Any]:
        """This session's state as plain data (what `session_factory` gets back)."""
        raise NotImplementedError

    def session_restored(self) -> None:
        """Called in the new process once the channel is live again."""

    def session_released(self) -> None:
        """Called in the old process by release(): the channel is gone, stop producing."""


SessionFactory = Callable[[dict[str, Any]], asyncssh.SSHServerSession]


def server_options(**kw: Any) -> dict[str, Any]:
    """Keyword arguments for asyncssh.create_server / SSHServerConnectionOptions that
    keep sessions movable; `kw` adds or overrides (host keys, auth, keepalive...)."""
    opts: dict[str, Any] = {
        "encryption_algs": list(MOVABLE_CIPHERS),
        "compression_algs": ["none"],
        "rekey_seconds": 0,
        "rekey_bytes": REKEY_BYTES,
        "line_editor": False,
    }
    opts.update(kw)
    bad = [a for a in opts["encryption_algs"] if _name(a) not in MOVABLE_CIPHERS]
    if bad:
        raise NotMovable(f"encryption_algs {bad} cannot move")
    if [_name(a) for a in opts["compression_algs"]] != ["none"]:
        raise NotMovable("compression must be 'none' (zlib state cannot be exported)")
    if opts["rekey_seconds"]:
        raise NotMovable("time-based rekeying must be off (rekey_seconds=0)")
    if opts["line_editor"]:
        raise NotMovable("asyncssh's line editor keeps unexportable state")
    for name in ("process_factory", "session_factory", "sftp_factory"):
        if opts.get(name):
            raise NotMovable(f"{name}: coroutine-based handlers cannot move")
    return opts


def _name(alg: str | bytes) -> str:
    return alg.decode("ascii") if isinstance(alg, bytes) else alg


# -- the move state machine -----------------------------------------------------


class MoveState(enum.Enum):
    LIVE = "live"
    FROZEN = "frozen"
    RELEASED = "released"


# (operation, state) -> next state; anything else is refused.
_TRANSITIONS: dict[tuple[str, MoveState], MoveState] = {
    ("quiesce", MoveState.LIVE): MoveState.FROZEN,
    ("quiesce", MoveState.FROZEN): MoveState.FROZEN,
    ("export", MoveState.FROZEN): MoveState.FROZEN,
    ("resume", MoveState.FROZEN): MoveState.LIVE,
    ("resume", MoveState.LIVE): MoveState.LIVE,
    ("release", MoveState.FROZEN): MoveState.RELEASED,
    ("release", MoveState.RELEASED): MoveState.RELEASED,
}


@dataclass
class _Move:
    state: MoveState = MoveState.LIVE
    keepalive_left: float | None = None  # seconds, captured at freeze


_moves: weakref.WeakKeyDictionary[SSHConnection, _Move] = weakref.WeakKeyDictionary()


def move_state(conn: SSHServerConnection) -> MoveState:
    return _moves.get(conn, _Move()).state


def _step(conn: SSHServerConnection, op: str) -> tuple[_Move, MoveState]:
    rec = _moves.setdefault(conn, _Move())
    nxt = _TRANSITIONS.get((op, rec.state))
    if nxt is None:
        raise NotMovable(f"{op}: not allowed on a {rec.state.value} connection")
    return rec, nxt


# -- checks ---------------------------------------------------------------------


def _static_reasons(conn: SSHServerConnection) -> list[str]:
    """Why this connection can never move (waiting will not help)."""
    if asyncssh.__version__ != ASYNCSSH_VERSION:
        return [f"asyncssh {asyncssh.__version__} is not the pinned {ASYNCSSH_VERSION}"]
    if not isinstance(conn, SSHServerConnection):
        return [f"{type(conn).__name__} is not an asyncssh server connection"]
    reasons = []
    if conn._transport is None:
        reasons.append("the connection is closed")
    if conn._auth_complete:
        for alg in {conn._enc_alg_cs, conn._enc_alg_sc}:
            if _name(alg) not in MOVABLE_CIPHERS:
                reasons.append(f"cipher {_name(alg)} keeps its counter inside OpenSSL")
        for alg in {conn._cmp_alg_cs, conn._cmp_alg_sc}:
            if alg != b"none":
                reasons.append(f"compression {_name(alg)} has unexportable state")
    if conn._gss is not None:
        reasons.append("GSS-API contexts cannot be exported")
    if conn._local_listeners or conn._agent_listener or conn._x11_listener:
        reasons.append("port, agent or X11 forwarding listeners cannot move")
    if conn._tunnel is not None:
        reasons.append("tunneled connections cannot move")
    buffered = sum(chan._send_buf_len for chan in conn._channels.values())
    if buffered > MAX_BUFFERED_OUTPUT:
        reasons.append(f"{buffered} bytes of unsent channel output (limit "
                       f"{MAX_BUFFERED_OUTPUT}): the application ignores pause_writing")
    reasons += [f"connection extra info {k!r} is not plain data"
                for k, v in conn._extra.items() if not _plain(v)]
    for num, chan in conn._channels.items():
        if type(chan) is not SSHServerChannel:
            reasons.append(f"channel {num}: {type(chan).__name__} cannot move")
            continue
        if chan._line_editor:
            reasons.append(f"channel {num}: asyncssh's line editor cannot move")
        if chan._x11_display:
            reasons.append(f"channel {num}: X11 forwarding cannot move")
        if isinstance(chan._session, SSHServerStreamSession):
            reasons.append(f"channel {num}: a coroutine-based handler cannot move")
        reasons += [f"channel {num}: extra info {k!r} is not plain data"
                    for k, v in chan._extra.items() if k != "connection" and not _plain(v)]
    return reasons


def _input_reasons(conn: SSHServerConnection) -> list[str]:
    """Why not now, for things that settle only while we keep reading."""
    reasons = []
    if not conn._auth_complete or conn._auth is not None:
        reasons.append("authentication in progress")
    if (conn._kex is not None or conn._kexinit_sent or not conn._kex_complete
            or conn._next_recv_encryption is not None):
        reasons.append("key exchange in progress")
    if conn._deferred_packets:
        reasons.append("packets deferred by a key exchange")
    if conn._recv_handler not in (conn._recv_pkthdr, conn._recv_packet):
        reasons.append("a received packet is still being processed")
    if conn._global_request_queue:
        reasons.append("a global request is being processed")
    keepalive = SSHConnection._make_keepalive_request.__code__
    for task in conn._tasks:
        coro = task.get_coro()
        if not task.done() and getattr(coro, "cr_code", None) is not keepalive:
            reasons.append(f"task in progress: {getattr(coro, '__qualname__', task)}")
    for num, chan in conn._channels.items():
        if chan._session is None or chan._open_waiter is not None:
            reasons.append(f"channel {num}: being opened")
        if chan._request_queue or chan._request_waiters:
            reasons.append(f"channel {num}: a channel request is in progress")
        if chan._recv_state not in ("open", "eof_pending", "eof") or chan._close_event.is_set():
            reasons.append(f"channel {num}: closing")
    return reasons


def _output_reasons(conn: SSHServerConnection) -> list[str]:
    """Why not now, for things that settle with reading stopped."""
    transport = conn._transport
    if transport is not None and transport.get_write_buffer_size():
        return [f"{transport.get_write_buffer_size()} bytes not yet written to the socket"]
    return []


def check_movable(conn: SSHServerConnection) -> None:
    """Raise NotMovable with the reasons if `conn` cannot be exported right now."""
    if move_state(conn) is MoveState.RELEASED:
        raise NotMovable("the connection has been released")
    reasons = _static_reasons(conn)
    if not reasons:
        reasons = _input_reasons(conn) + _output_reasons(conn)
    if reasons:
        raise NotMovable("; ".join(reasons))


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | bytes | int) and _plain(v) for k, v in value.items())
    return False


# -- quiesce / resume -------------------------------------------------------------


async def quiesce(conn: SSHServerConnection, timeout: float) -> None:
    """Freeze `conn` at a packet boundary, or raise NotMovable and leave it running.

    First holds channel output: what the application writes stays in the channel
    buffers (it moves with them), so the connection's own traffic settles even in
    the middle of a flood. Then waits, reading, while a key exchange, a request or a
    channel change is in flight; stops reading between two packets; waits for
    asyncio's write buffer to drain. Frozen: nothing is read or sent, the keepalive
    and login timers are stopped.
    """
    rec, _ = _step(conn, "quiesce")
    if rec.state is MoveState.FROZEN:
        return
    reasons = _static_reasons(conn)
    if reasons:
        raise NotMovable("; ".join(reasons))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    transport = conn._transport
    try:
        while True:
            if conn._transport is None:
                raise NotMovable("the connection closed while quiescing")
            _hold_output(conn)
            reasons = _input_reasons(conn)
            if reasons:
                if not transport.is_reading():
                    transport.resume_reading()
            else:
                # Between packets: everything received so far has been processed,
                # the rest waits in the kernel (or as a partial packet in _inpbuf).
                transport.pause_reading()
                reasons = _output_reasons(conn)
                if not reasons:
                    _freeze(conn, rec)
                    return
            if loop.time() >= deadline:
                raise NotMovable(f"not movable within {timeout}s: {'; '.join(reasons)}")
            await asyncio.sleep(_POLL_SECONDS)
    finally:
        if rec.state is not MoveState.FROZEN:
            _release_output(conn)
            if conn._transport is not None and not transport.is_reading():
                transport.resume_reading()


def _hold_output(conn: SSHServerConnection) -> None:
    """Channels keep what the application writes instead of sending it. The session
    still gets pause_writing()/resume_writing() at the buffer's water marks."""
    for chan in conn._channels.values():
        if "_flush_send_buf" not in vars(chan) and chan._session is not None:
            chan._flush_send_buf = chan._pause_resume_writing


def _release_output(conn: SSHServerConnection) -> None:
    for chan in list(conn._channels.values()):
        if "_flush_send_buf" in vars(chan):
            del chan._flush_send_buf
            chan._flush_send_buf()


def _freeze(conn: SSHServerConnection, rec: _Move) -> None:
    loop = conn._loop
    timer = conn._keepalive_timer
    rec.keepalive_left = max(0.0, timer.when() - loop.time()) if timer else None
    conn._cancel_keepalive_timer()
    conn._cancel_login_timer()
    # Anything that tries to send while frozen fails loudly: after export the same
    # key and sequence number belong to another process.
    conn.send_packet = _fenced
    rec.state = MoveState.FROZEN


def _fenced(*_args: Any, **_kw: Any) -> None:
    raise NotMovable("SSH connection is frozen for a move: sending now would reuse keystream")


def resume_in_place(conn: SSHServerConnection) -> None:
    """Undo quiesce: the connection carries on in this process. Only valid if no
    other process has sent anything with the exported state. Idempotent."""
    rec, nxt = _step(conn, "resume")
    if rec.state is MoveState.LIVE:
        return
    del conn.send_packet  # the instance fence; the class method shows through again
    rec.state = nxt
    if rec.keepalive_left is not None and conn._keepalive_interval:
        conn._keepalive_timer = conn._loop.call_later(
            rec.keepalive_left, conn._keepalive_timer_callback)
    _release_output(conn)
    if conn._transport is not None and not conn._transport.is_reading():
        conn._transport.resume_reading()


# -- export -------------------------------------------------------------------------


def channel_number(chan: SSHServerChannel) -> int:
    """The key of this channel's entry in export's `sessions_state`."""
    return chan._recv_chan


def dup_socket(conn: SSHServerConnection) -> socket.socket:
    """A new fd (owned by the caller) for the connection's TCP socket."""
    if conn._transport is None:
        raise NotMovable("the connection is closed")
    return socket.socket(fileno=os.dup(conn._transport.get_extra_info("socket").fileno()))


def export(conn: SSHServerConnection,
           sessions_state: Mapping[int, Mapping[str, Any]] | None = None) -> SshSessionState:
    """The frozen connection as plain data. `sessions_state` maps channel_number(chan)
    to the application's state for it; channels missing there are asked through
    MovableSession.export_state()."""
    rec, _ = _step(conn, "export")
    check_movable(conn)
    sessions_state = sessions_state or {}
    channels = []
    for num, chan in sorted(conn._channels.items()):
        if num in sessions_state:
            app = dict(sessions_state[num])
        elif isinstance(chan._session, MovableSession):
            app = chan._session.export_state()
        else:
            raise NotMovable(f"channel {num}: no application state for "
                             f"{type(chan._session).__name__}")
        channels.append(_export_channel(chan, app))
    if conn._recv_handler == conn._recv_packet:
        # The header was decrypted but the body is incomplete. Chacha and GCM leave
        # the first block as ciphertext and decrypting a header changes no state,
        # so the new process parses the packet again from its first byte.
        inpbuf = conn._packet + conn._inpbuf
    else:
        inpbuf = conn._inpbuf
    rekey_left = None
    if conn._rekey_seconds:
        rekey_left = max(0, round((conn._rekey_time - time.monotonic()) * 1000))
    keepalive_left = (None if rec.keepalive_left is None
                      else round(rec.keepalive_left * 1000))
    return SshSessionState(
        asyncssh_version=asyncssh.__version__,
        client_version=conn._client_version,
        server_version=conn._server_version,
        client_kexinit=conn._client_kexinit,
        server_kexinit=conn._server_kexinit,
        session_id=conn._session_id,
        strict_kex=conn._strict_kex,
        enc_alg_cs=_name(conn._enc_alg_cs),
        enc_alg_sc=_name(conn._enc_alg_sc),
        mac_alg_cs=_name(conn._mac_alg_cs),
        mac_alg_sc=_name(conn._mac_alg_sc),
        cmp_alg_cs=_name(conn._cmp_alg_cs),
        cmp_alg_sc=_name(conn._cmp_alg_sc),
        send=export_cipher(conn._enc_alg_sc, conn._send_encryption),
        recv=export_cipher(conn._enc_alg_cs, conn._recv_encryption),
        send_seq=conn._send_seq,
        recv_seq=conn._recv_seq,
        send_enchdrlen=conn._send_enchdrlen,
        send_blocksize=conn._send_blocksize,
        recv_blocksize=conn._recv_blocksize,
        recv_macsize=conn._recv_macsize,
        inpbuf=bytes(inpbuf),
        rekey_bytes_sent=conn._rekey_bytes_sent,
        rekey_ms_left=rekey_left,
        keepalive_count=conn._keepalive_count,
        keepalive_ms_left=keepalive_left,
        keepalive_replies_pending=len(conn._global_request_waiters),
        max_recv_pktlen=conn._max_recv_pktlen,
        next_recv_chan=conn._next_recv_chan,
        username=conn._username,
        auth_was_trivial=conn._auth_was_trivial,
        can_recv_ext_info=conn._can_recv_ext_info,
        extensions_to_send=[[k, v] for k, v in conn._extensions_to_send.items()],
        key_options=_export_options(conn._key_options),
        cert_options=(None if conn._cert_options is None
                      else _export_options(conn._cert_options)),
        peer_host=conn._peer_host,
        extra=dict(conn._extra),
        channels=channels,
    )


def export_cipher(alg: bytes, enc: Encryption | None) -> CipherState:
    """The key material (and current nonce) of one direction's packet cipher."""
    cipher = getattr(enc, "_cipher", None)
    if isinstance(enc, ChachaEncryption):
        return CipherState(_name(alg), cipher._key + cipher._adkey)
    if isinstance(enc, GCMEncryption):
        return CipherState(_name(alg), cipher._key, cipher._iv)
    raise NotMovable(f"cipher {_name(alg)}: state cannot be exported")


def import_cipher(st: CipherState) -> Encryption:
    if st.alg not in MOVABLE_CIPHERS:
        raise NotMovable(f"cipher {st.alg} cannot be imported")
    return get_encryption(st.alg.encode("ascii"), st.key, st.iv)


# Options only consulted during authentication hold pattern objects; drop them.
_AUTH_ONLY_OPTIONS = ("from", "principals", "subject", "source-address")


def _export_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in _AUTH_ONLY_OPTIONS:
            continue
        if name == "permitopen":
            value = sorted([host, -1 if port is None else port] for host, port in value)
        if not _plain(value):
            raise NotMovable(f"authorized_keys option {name!r} is not plain data")
        out[name] = value
    return out


def _import_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if "permitopen" in out:
        out["permitopen"] = {(host, None if port == -1 else port)
                             for host, port in out["permitopen"]}
    return out


def _export_channel(chan: SSHServerChannel, app: dict[str, Any]) -> ChannelState:
    pending, flag = chan._decoder.getstate() if chan._decoder else (b"", 0)
    return ChannelState(
        recv_chan=chan._recv_chan,
        send_chan=chan._send_chan,
        send_state=chan._send_state,
        recv_state=chan._recv_state,
        send_window=chan._send_window,
        send_pktsize=chan._send_pktsize,
        send_paused=chan._send_paused,
        send_buf=[DataChunk(bytes(buf), dt) for buf, dt in chan._send_buf],
        send_high_water=chan._send_high_water,
        send_low_water=chan._send_low_water,
        init_recv_window=chan._init_recv_window,
        recv_window=chan._recv_window,
        recv_pktsize=chan._recv_pktsize,
        recv_paused=chan._recv_paused is True,
        recv_starting=chan._recv_paused == "starting",
        recv_buf=[DataChunk(bytes(buf), dt) for buf, dt in chan._recv_buf],
        encoding=chan._encoding,
        errors=chan._errors,
        decoder_pending=bytes(pending),
        decoder_flag=flag,
        env=dict(chan._env),
        command=chan._command,
        subsystem=chan._subsystem,
        allow_pty=chan._allow_pty,
        session_started=chan._session_started,
        term_type=chan._term_type,
        term_size=list(chan._term_size),
        term_modes=dict(chan._term_modes),
        extra={k: v for k, v in chan._extra.items() if k != "connection"},
        app=app,
    )


# -- release ------------------------------------------------------------------------


class _Inert(asyncio.Protocol):
    """Takes over a released transport so nothing reaches the old connection again."""


def release(conn: SSHServerConnection) -> None:
    """Drop a frozen connection without sending anything. Closes this process's fd of
    the socket (no FIN while another fd refers to it, none at all in repair mode), so
    call it after dup_socket() or after the socket went into repair mode. Idempotent."""
    rec, nxt = _step(conn, "release")
    if rec.state is MoveState.RELEASED:
        return
    rec.state = nxt
    transport, conn._transport = conn._transport, None
    if transport is not None:
        transport.set_protocol(_Inert())
        transport.abort()  # closes the fd only: no shutdown(), no data
    for task in list(conn._tasks):
        task.cancel()
    for chan in list(conn._channels.values()):
        chan._send_state = chan._recv_state = "closed"  # writes now raise BrokenPipeError
        session, chan._session = chan._session, None
        chan._conn = None
        if isinstance(session, MovableSession):
            try:
                session.session_released()
            except Exception:
                log.exception("session_released failed")
        chan._close_event.set()
    conn._channels.clear()
    conn._global_request_waiters.clear()
    conn._owner = None
    conn._inpbuf = b""
    conn._close_event.set()


# -- import -------------------------------------------------------------------------


class _NotAttached:
    """Stands in for the transport while channels are rebuilt; nothing may write yet."""

    def write(self, _data: bytes) -> None:
        raise NotMovable("import: write before the socket was attached")

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default


class _Adopter(asyncio.Protocol):
    """First protocol on the adopted socket: hands it to the rebuilt connection
    before asyncio starts reading."""

    def __init__(self, attach: Callable[[asyncio.Transport], None]) -> None:
        self._attach = attach

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)  # type: ignore[arg-type]


async def prepare_options(options: Mapping[str, Any]) -> SSHServerConnectionOptions:
    """The server's options worked out once for many `import_`s (as asyncssh's own
    listener shares one options object among its connections): constructing them
    costs ~0.7 ms of CPU (host keys, algorithm lists), once per connection otherwise,
    and a Domain R resuming 200 SSH connections does it in the pause."""
    return await SSHServerConnectionOptions.construct(
        None, server_factory=asyncssh.SSHServer, **server_options(**options))


def check_importable(state: SshSessionState) -> None:
    """What `import_` would refuse about `state` before it touches the socket:
    raises NotMovable, so a Domain R can ask while the socket is still silent."""
    if asyncssh.__version__ != ASYNCSSH_VERSION or state.asyncssh_version != ASYNCSSH_VERSION:
        raise NotMovable(f"state from asyncssh {state.asyncssh_version}, running "
                         f"{asyncssh.__version__}, pinned {ASYNCSSH_VERSION}")
    for alg in (state.enc_alg_cs, state.enc_alg_sc, state.send.alg, state.recv.alg):
        if alg not in MOVABLE_CIPHERS:
            raise NotMovable(f"cipher {alg} cannot be imported")
    if (state.cmp_alg_cs, state.cmp_alg_sc) != ("none", "none"):
        raise NotMovable("compressed sessions cannot be imported")


async def import_(state: SshSessionState, sock: socket.socket, *,
                  server_factory: Callable[[], asyncssh.SSHServer],
                  session_factory: SessionFactory,
                  options: Mapping[str, Any],
                  prepared: SSHServerConnectionOptions | None = None,
                  loop: asyncio.AbstractEventLoop | None = None) -> SSHServerConnection:
    """Rebuild a live server connection from `state` on the connected socket `sock`
    (which it takes over) and carry on: read, answer, rekey, keepalive.

    `options` are the server's keyword options, as for server_options() (without
    server_factory): the host keys above all (the client checks them again at its
    next key exchange), then authorized keys, keepalive...; `prepared`, if given,
    is those options already constructed (`prepare_options(options)`), shared with
    other imports; only its server factory is this connection's. Each channel's session is
    `session_factory(app)`; it gets connection_made(chan) and, if a MovableSession,
    session_restored().
    Raises NotMovable before touching the socket if the state cannot be imported;
    if the adoption itself fails, the connection is closed and NotMovable raised.
    """
    check_importable(state)
    loop = loop or asyncio.get_running_loop()
    if prepared is not None:
        opts = copy.copy(prepared)  # shallow: the parsed keys and lists are shared
        opts.protocol_factory = server_factory  # what server_factory= sets (asyncssh)
    else:
        opts = await SSHServerConnectionOptions.construct(
            None, server_factory=server_factory, **server_options(**options))
    conn = SSHServerConnection(loop, opts)
    conn._cancel_login_timer()
    _restore_connection(conn, state)
    conn._transport = _NotAttached()  # add_channel wants a transport
    sessions = [_restore_channel(conn, loop, st, session_factory) for st in state.channels]
    conn._next_recv_chan = state.next_recv_chan
    conn._transport = None
    failed: list[BaseException] = []

    def attach(transport: asyncio.Transport) -> None:
        transport.set_protocol(conn)
        try:
            _attach(conn, transport, state, sessions)
        except Exception as exc:
            failed.append(exc)
            conn.internal_error(sys.exc_info())  # closes it, as asyncssh does

    await loop.connect_accepted_socket(lambda: _Adopter(attach), sock)
    if failed:
        raise NotMovable(f"adopting the connection failed: {failed[0]!r}") from failed[0]
    return conn


def _restore_connection(conn: SSHServerConnection, st: SshSessionState) -> None:
    """`st` passed check_importable."""
    conn._client_version = st.client_version
    conn._server_version = st.server_version
    conn._client_kexinit = st.client_kexinit
    conn._server_kexinit = st.server_kexinit
    conn._session_id = st.session_id
    conn._strict_kex = st.strict_kex
    conn._enc_alg_cs = st.enc_alg_cs.encode("ascii")
    conn._enc_alg_sc = st.enc_alg_sc.encode("ascii")
    conn._mac_alg_cs = st.mac_alg_cs.encode("ascii")
    conn._mac_alg_sc = st.mac_alg_sc.encode("ascii")
    conn._cmp_alg_cs = st.cmp_alg_cs.encode("ascii")
    conn._cmp_alg_sc = st.cmp_alg_sc.encode("ascii")
    conn._send_encryption = import_cipher(st.send)
    conn._recv_encryption = import_cipher(st.recv)
    conn._send_seq = st.send_seq
    conn._recv_seq = st.recv_seq
    conn._send_enchdrlen = st.send_enchdrlen
    conn._send_blocksize = st.send_blocksize
    conn._recv_blocksize = st.recv_blocksize
    conn._recv_macsize = st.recv_macsize
    conn._compressor = conn._decompressor = None
    conn._inpbuf = st.inpbuf
    conn._packet = b""
    conn._pktlen = 0
    conn._recv_handler = conn._recv_pkthdr
    conn._kexinit_sent = False
    conn._kex_complete = True
    conn._rekey_bytes_sent = st.rekey_bytes_sent
    if conn._rekey_seconds:
        left = conn._rekey_seconds if st.rekey_ms_left is None else st.rekey_ms_left / 1000
        conn._rekey_time = time.monotonic() + left
    conn._keepalive_count = st.keepalive_count
    conn._max_recv_pktlen = st.max_recv_pktlen
    conn._username = st.username
    conn._auth_in_progress = False
    conn._auth_complete = True
    conn._auth_final = True
    conn._auth_was_trivial = st.auth_was_trivial
    conn._can_send_ext_info = False
    conn._can_recv_ext_info = st.can_recv_ext_info
    conn._extensions_to_send.clear()
    conn._extensions_to_send.update((k, v) for k, v in st.extensions_to_send)
    conn._key_options = _import_options(st.key_options)
    conn._cert_options = None if st.cert_options is None else _import_options(st.cert_options)
    conn._peer_host = st.peer_host
    conn._next_service = None
    conn._extra.update(st.extra)


def _restore_channel(conn: SSHServerConnection, loop: asyncio.AbstractEventLoop,
                     st: ChannelState, session_factory: SessionFactory,
                     ) -> tuple[SSHServerChannel, asyncssh.SSHServerSession]:
    if st.recv_chan in conn._channels:
        raise NotMovable(f"channel {st.recv_chan} restored twice")
    conn._next_recv_chan = st.recv_chan  # add_channel hands out this number
    chan = SSHServerChannel(conn, loop, st.allow_pty, False, conn._line_echo,
                            conn._line_history, conn._max_line_length,
                            st.encoding, st.errors, st.init_recv_window, st.recv_pktsize)
    assert chan._recv_chan == st.recv_chan
    chan._send_chan = st.send_chan
    chan._send_state = st.send_state
    chan._recv_state = st.recv_state
    chan._send_window = st.send_window
    chan._send_pktsize = st.send_pktsize
    chan._send_paused = st.send_paused
    chan._send_buf = [(bytearray(c.data), c.datatype) for c in st.send_buf]
    chan._send_buf_len = sum(len(c.data) for c in st.send_buf)
    chan._send_high_water = st.send_high_water
    chan._send_low_water = st.send_low_water
    chan._init_recv_window = st.init_recv_window
    chan._recv_window = st.recv_window
    chan._recv_pktsize = st.recv_pktsize
    chan._recv_paused = "starting" if st.recv_starting else st.recv_paused
    chan._recv_buf = [(c.data, c.datatype) for c in st.recv_buf]
    if chan._decoder is not None:
        chan._decoder.setstate((st.decoder_pending, st.decoder_flag))
    chan._env = dict(st.env)
    chan._str_env = None
    chan._command = st.command
    chan._subsystem = st.subsystem
    chan._session_started = st.session_started
    chan._term_type = st.term_type
    chan._term_size = tuple(st.term_size)
    chan._term_modes = dict(st.term_modes)
    chan._extra.update(st.extra)
    session = session_factory(st.app)
    chan._session = session
    return chan, session


def _attach(conn: SSHServerConnection, transport: asyncio.Transport, st: SshSessionState,
            sessions: list[tuple[SSHServerChannel, asyncssh.SSHServerSession]]) -> None:
    """What connection_made does for a fresh connection, minus the handshake."""
    loop = conn._loop
    conn._transport = transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if conn._tcp_keepalive else 0)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sockname = transport.get_extra_info("sockname")
    if sockname:
        conn._local_addr, conn._local_port = sockname[:2]
    peername = transport.get_extra_info("peername")
    if peername:
        conn._peer_addr, conn._peer_port = peername[:2]
    conn.logger.info("Adopted a moved SSH connection from %s", (conn._peer_addr, conn._peer_port))
    _moves[conn] = _Move()
    conn._owner = conn._protocol_factory()
    conn._owner.connection_made(conn)
    if conn._keepalive_interval:
        left = (conn._keepalive_interval if st.keepalive_ms_left is None
                else st.keepalive_ms_left / 1000)
        conn._keepalive_timer = loop.call_later(left, conn._keepalive_timer_callback)
    for _ in range(st.keepalive_replies_pending):  # requests the old process sent
        waiter = loop.create_future()
        conn._global_request_waiters.append(waiter)
        conn.create_task(_keepalive_reply(conn, waiter))
    for chan, session in sessions:
        session.connection_made(chan)
        if isinstance(session, MovableSession):
            session.session_restored()
    for chan, _ in sessions:
        chan._flush_send_buf()  # output the application wrote while frozen


def probe(conn: SSHServerConnection) -> None:
    """Send one keepalive request now, as asyncssh's keepalive timer does (the reply
    resets its count; a move meanwhile carries it as a reply still owed)."""
    conn.create_task(conn._make_keepalive_request())


async def _keepalive_reply(conn: SSHServerConnection, waiter: asyncio.Future) -> None:
    """The rest of a keepalive request the old process sent (_make_keepalive_request)."""
    await waiter
    conn._keepalive_count = 0
