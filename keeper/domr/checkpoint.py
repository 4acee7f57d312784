"""What a Domain R checkpoint holds: the devices' backend state, and each service's
part (keeper.domr.services): every session's protocol state and its TCP socket."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from keeper import serial
from keeper.console.service import RawConsoleCheckpoint
from keeper.domr.console import ConsoleBackendState
from keeper.domr.display import DisplayBackendState
from keeper.errors import CheckpointError
from keeper.net.tcprepair import TcpRepairRecord
from keeper.ssh.host import SshHostCheckpoint
from keeper.vnc.server import VncHostCheckpoint
from keeper.web.service import WebHostCheckpoint

# the shape changed with the per-service parts: an older checkpoint is refused by name
KIND = "domr-checkpoint/2"


@dataclass(slots=True)
class DomrCheckpoint:
    name: str
    ip: str
    mac: str
    console: RawConsoleCheckpoint  # the raw console service (always there)
    # sessions that could not be moved, with the reason (they end on the source)
    left_behind: list[str] = field(default_factory=list)
    # the guest console backend (None: the stand-alone echo service)
    device: ConsoleBackendState | None = None
    # the SSH service: its configuration, host key included, and its connections
    # (None: no SSH)
    ssh: SshHostCheckpoint | None = None
    # the keyboard/framebuffer backends and the VNC sessions on them (None: no display)
    display: DisplayBackendState | None = None
    vnc: VncHostCheckpoint | None = None
    # the web console's HTTP connections and browser sessions (None: no display)
    web: WebHostCheckpoint | None = None
    # a QEMU guest's Domain R: which guest's device sockets to open on the target
    qemu_guest: str | None = None


def encode(ckpt: DomrCheckpoint) -> bytes:
    return serial.dumps(KIND, ckpt)


def prepare() -> None:
    """When a Domain R starts: its first `encode` or `decode`, in a move's pause, then
    costs no more than the next (keeper.serial.prepare: hints, converters, layout)."""
    serial.prepare(DomrCheckpoint)


def decode(blob: bytes) -> DomrCheckpoint:
    """The checkpoint in `blob`, checked whole before anything of it is restored: its
    size, its shape and types (keeper.serial), and what restoring it would do with
    the network (`check`). A truncated, oversized or forged record is a
    CheckpointError that says what is wrong; the migration then rolls back."""
    ckpt = serial.loads(KIND, blob, DomrCheckpoint, max_bytes=MAX_BYTES)
    check(ckpt)
    return ckpt


# Bigger than any checkpoint keeper makes (a session's own buffers are capped at a few
# MB, the kernel's queues at its buffer sizes) and small enough to hold in memory.
MAX_BYTES = 512 << 20
MAX_QUEUE = 64 << 20  # one socket's queued bytes, either way
MAX_SESSIONS = 100_000
_SEQ = 1 << 32


def check(ckpt: DomrCheckpoint) -> None:
    """What types cannot say: every socket is one of this Domain R's (its address, a
    real peer), its TCP state is within the protocol's ranges, no connection twice."""
    seen: set[tuple[str, int, int]] = set()
    records = [(f"console.sessions[{i}]", s.tcp) for i, s in enumerate(ckpt.console.sessions)]
    if ckpt.ssh is not None:
        records += [(f"ssh.sessions[{i}]", s.tcp) for i, s in enumerate(ckpt.ssh.sessions)]
    if ckpt.vnc is not None:
        records += [(f"vnc.sessions[{i}]", s.tcp) for i, s in enumerate(ckpt.vnc.sessions)]
    if ckpt.web is not None:
        records += [(f"web.http[{i}]", h.tcp) for i, h in enumerate(ckpt.web.http)]
        records += [(f"web.sessions[{i}]", s.tcp) for i, s in enumerate(ckpt.web.sessions)]
    if len(records) > MAX_SESSIONS:
        raise CheckpointError(f"{len(records)} sessions, more than {MAX_SESSIONS}")
    peers: dict[str, str | None] = {}  # a client's address, checked once (1,000 of
    # a Domain R's sockets often share a handful)
    for where, rec in records:
        if rec.peer_addr not in peers:
            peers[rec.peer_addr] = _peer_problem(rec.peer_addr, ckpt.ip)
        why = peers[rec.peer_addr] or _tcp_problem(rec, ckpt.ip)
        if why is not None:
            raise CheckpointError(f"{where}.tcp ({rec.describe()}): {why}")
        key = (rec.peer_addr, rec.peer_port, rec.local_port)
        if key in seen:
            raise CheckpointError(f"{where}.tcp: the connection {rec.describe()} is there twice")
        seen.add(key)


def _peer_problem(addr: str, ip: str) -> str | None:
    try:
        peer = ipaddress.IPv4Address(addr)
    except ValueError:
        return f"peer address {addr!r} is not an IPv4 address"
    if peer.is_unspecified or peer.is_multicast or str(peer) == ip:
        return f"peer address {peer} cannot be a TCP peer"
    return None


def _tcp_problem(rec: TcpRepairRecord, ip: str) -> str | None:
    """What `_peer_problem` does not check (the caller does, once an address)."""
    if rec.family != socket.AF_INET:
        return f"address family {rec.family}, not IPv4"
    if rec.local_addr != ip:
        return f"local address {rec.local_addr} is not this Domain R's ({ip})"
    for name in ("local_port", "peer_port"):
        if not 0 < getattr(rec, name) < 65536:
            return f"{name} {getattr(rec, name)} is not a port"
    for name in ("inq_seq", "outq_seq", "timestamp", "snd_wl1", "rcv_wup"):
        if not 0 <= getattr(rec, name) < _SEQ:
            return f"{name} {getattr(rec, name)} is not a 32-bit value"
    for name in ("snd_wnd", "max_window", "rcv_wnd", "sndbuf", "rcvbuf"):
        if not 0 <= getattr(rec, name) < _SEQ:
            return f"{name} {getattr(rec, name)} is out of range"
    if not 0 < rec.mss < 65536:
        return f"mss {rec.mss} is out of range"
    for name in ("snd_wscale", "rcv_wscale"):
        if not 0 <= getattr(rec, name) <= 14:  # RFC 7323
            return f"{name} {getattr(rec, name)} is more than 14"
    if len(rec.inq) > MAX_QUEUE or len(rec.outq) > MAX_QUEUE:
        return f"queues of {len(rec.inq)} and {len(rec.outq)} bytes (at most {MAX_QUEUE})"
    if not 0 <= rec.unsent_len <= len(rec.outq):
        return f"unsent_len {rec.unsent_len} for a send queue of {len(rec.outq)} bytes"
    return None
