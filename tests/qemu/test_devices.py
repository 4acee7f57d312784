"""The device channel: a Domain R gets its own guest's device sockets and nothing else
(real Unix sockets; no QEMU needed: stand-in listeners play its chardev and VNC)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from keeper.qemu.devices import DeviceClient, DeviceRefused, DeviceServer


@pytest.fixture
def guests(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two guests' device sockets, as two QEMUs would listen on them."""
    listeners, table = [], {}
    for g in ("guest1", "guest2"):
        table[g] = {}
        for dev in ("serial", "vnc"):
            path = tmp_path / f"{g}-{dev}.sock"
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.listen(4)
            listeners.append(s)
            table[g][dev] = path
    yield table, listeners
    for s in listeners:
        s.close()


def test_a_domain_r_opens_its_own_guests_devices(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    table, listeners = guests
    server = DeviceServer(tmp_path / "dev.sock", lambda g: table[g], guest="guest1")
    client = DeviceClient(server.path)
    try:
        assert client.guest() == "guest1"
        s = client.open("serial", "guest1")
        peer, _ = listeners[0].accept()  # guest1's serial listener got the connection
        s.setblocking(True)
        s.sendall(b"typed")
        assert peer.recv(16) == b"typed"
        peer.close()
        s.close()
        assert server.path.stat().st_mode & 0o077 == 0  # root's alone
    finally:
        client.close()
        server.close()


def test_another_guests_device_is_refused(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    table, listeners = guests
    server = DeviceServer(tmp_path / "dev.sock", lambda g: table[g], guest="guest1")
    client = DeviceClient(server.path)
    try:
        for dev in ("serial", "vnc"):
            with pytest.raises(DeviceRefused, match="serves guest1, not 'guest2'"):
                client.open(dev, "guest2")
        with pytest.raises(DeviceRefused, match="no device 'qmp'"):
            client.open("qmp", "guest1")  # QMP is never handed out
        for s in listeners[2:]:  # guest2's listeners never saw a connection
            s.settimeout(0.1)
            with pytest.raises(TimeoutError):
                s.accept()
    finally:
        client.close()
        server.close()


def test_a_twin_gets_nothing_until_it_is_associated(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    table, _ = guests
    server = DeviceServer(tmp_path / "dev.sock", lambda g: table[g])
    client = DeviceClient(server.path)
    try:
        assert client.guest() is None
        with pytest.raises(DeviceRefused, match="serves no guest"):
            client.open("serial", "guest1")
        server.associate("guest1")  # S1 on the migration target
        client.open("vnc", "guest1").close()
    finally:
        client.close()
        server.close()
    assert not server.path.exists()
