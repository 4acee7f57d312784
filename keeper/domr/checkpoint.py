"""What a Domain R checkpoint holds: the devices' backend state, and each service's
part (keeper.domr.services): every session's protocol state and its TCP socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from keeper import serial
from keeper.console.service import RawConsoleCheckpoint
from keeper.domr.console import ConsoleBackendState
from keeper.domr.display import DisplayBackendState
from keeper.ssh.host import SshHostCheckpoint
from keeper.vnc.server import VncHostCheckpoint

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
    # a QEMU guest's Domain R: which guest's device sockets to open on the target
    qemu_guest: str | None = None


def encode(ckpt: DomrCheckpoint) -> bytes:
    return serial.dumps(KIND, ckpt)


def decode(blob: bytes) -> DomrCheckpoint:
    return serial.loads(KIND, blob, DomrCheckpoint)
