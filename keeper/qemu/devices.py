"""Domain R's links to its QEMU guest: the agent hands it its own guest's device
sockets, nothing else.

What the grant table is for a simulated guest, this channel is for a QEMU one
(DESIGN.md §8): Domain R may reach the guest's serial console (QEMU's chardev) and
its screen and keyboard (QEMU's VNC server), both Unix sockets in the guest's run
directory, 0600, root's. Never QMP, which can stop, kill or reconfigure the VM.

One Unix SEQPACKET socket per Domain R, at a path only root can reach: which socket
a request came through says which Domain R asks. A request is msgpack
{"op": "whoami"} or {"op": "open", "guest": name, "device": "serial"|"vnc"}; the
answer {"ok": ...} or {"error": why}, an open one with the connected socket's file
descriptor attached (SCM_RIGHTS). The agent connects, Domain R gets the fd: it never
learns the paths, and a request for another guest's device is refused.

The association (which guest this Domain R serves) is set when the Domain R is made
for a guest, and on a migration target at S1 (`associate`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from keeper.errors import KeeperError
from keeper.net.seqpacket import SeqpacketServer

log = logging.getLogger("keeper.qemu.devices")
MAX_MSG = 4096  # our requests are small
DEVICES = ("serial", "vnc")
Resolve = Callable[[str], dict[str, Path]]  # guest name -> {device: socket path}


class DeviceRefused(KeeperError):
    """A Domain R asked for a device it may not have (another guest's, or none)."""


class DeviceServer:
    """The agent's end for one Domain R."""

    def __init__(self, path: Path, resolve: Resolve, *, guest: str | None = None) -> None:
        self.path, self.resolve, self.guest = path, resolve, guest
        self._server = SeqpacketServer(path, self._dispatch, name=f"devices-{path.name}")

    def associate(self, guest: str) -> None:
        self.guest = guest

    def _dispatch(self, req: dict[str, Any]) -> tuple[Any, list[int], bool]:
        op = req.get("op")
        if op == "whoami":
            return {"guest": self.guest}, [], False
        if op != "open":
            raise DeviceRefused(f"unknown request {op!r}")
        guest, device = req.get("guest"), req.get("device")
        if device not in DEVICES:
            raise DeviceRefused(f"no device {device!r} (devices: {', '.join(DEVICES)})")
        if self.guest is None or guest != self.guest:
            raise DeviceRefused(f"refused: this Domain R serves "
                                f"{self.guest or 'no guest'}, not {guest!r}")
        path = self.resolve(guest).get(device)
        if path is None:
            raise DeviceRefused(f"guest {guest} has no {device} socket here")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(str(path))
            return {"device": device}, [os.dup(s.fileno())], True  # Domain R gets its own
        finally:
            s.close()

    def close(self) -> None:
        """Idempotent: stop accepting, drop connections, remove the socket file."""
        self._server.close()


class DeviceClient:
    """Domain R's end (blocking calls: set-up and restore only)."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))

    def _call(self, req: dict[str, Any]) -> tuple[Any, list[int]]:
        self._sock.send(msgpack.packb(req))
        data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_MSG, 4)
        if not data:
            raise KeeperError("the host agent closed the device channel")
        reply = msgpack.unpackb(data, raw=False)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise DeviceRefused(reply["error"])
        return reply["ok"], fds

    def guest(self) -> str | None:
        result, _ = self._call({"op": "whoami"})
        return result["guest"]

    def open(self, device: str, guest: str) -> socket.socket:
        """A connected stream socket to `guest`'s `device` (non-blocking)."""
        _, fds = self._call({"op": "open", "device": device, "guest": guest})
        if len(fds) != 1:
            raise KeeperError(f"expected one fd for {device}, got {len(fds)}")
        s = socket.socket(fileno=fds[0])
        s.setblocking(False)
        return s

    def close(self) -> None:
        self._sock.close()
