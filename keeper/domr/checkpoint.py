"""What a Domain R checkpoint holds: every session's protocol state and its TCP socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from keeper import serial
from keeper.console.raw import RawSession
from keeper.domr.console import ConsoleBackendState
from keeper.domr.display import DisplayBackendState
from keeper.net.tcprepair import TcpRepairRecord
from keeper.ssh.host import SshCheckpoint, SshConfig
from keeper.vnc.server import VncCheckpoint

KIND = "domr-checkpoint"


@dataclass(slots=True)
class SessionCheckpoint:
    service: str  # "console"
    session: RawSession
    tcp: TcpRepairRecord


@dataclass(slots=True)
class DomrCheckpoint:
    name: str
    ip: str
    mac: str
    next_session_id: int
    sessions: list[SessionCheckpoint] = field(default_factory=list)
    # sessions that could not be moved, with the reason (they end on the source)
    left_behind: list[str] = field(default_factory=list)
    # the guest console backend (None: the stand-alone echo service)
    device: ConsoleBackendState | None = None
    # the SSH service's configuration, host key included (None: no SSH)
    ssh: SshConfig | None = None
    ssh_sessions: list[SshCheckpoint] = field(default_factory=list)
    # the keyboard/framebuffer backends and the VNC sessions on them
    display: DisplayBackendState | None = None
    vnc_sessions: list[VncCheckpoint] = field(default_factory=list)


def encode(ckpt: DomrCheckpoint) -> bytes:
    return serial.dumps(KIND, ckpt)


def decode(blob: bytes) -> DomrCheckpoint:
    return serial.loads(KIND, blob, DomrCheckpoint)
