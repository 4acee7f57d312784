"""The real OpenSSH client logs into the guest's console through Domain R (root)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare

pytestmark = pytest.mark.root

GUEST = "guest1"
PROMPT = b"guest1:~$ "


async def ssh_typist(lab: LabSpec, tmp_path: Path, ip: str) -> tuple[Typist, SshLink]:
    link = await SshLink.start(lab.client_ns, ip, key=lab.ssh_dir / "id_ed25519",
                               known_hosts=tmp_path / "known_hosts", workdir=tmp_path)
    await link.wait_connected()
    return Typist(link, PROMPT, period=0.02), link


async def test_ssh_session_types_into_the_guest(lab: LabSpec, tmp_path: Path) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=16)
    before = (await ops.journal(lab, GUEST))["count"]
    typist, link = await ssh_typist(lab, tmp_path, doc["ip"])
    await asyncio.sleep(1.0)  # let the login settle before the first key
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(1.5)
    link.resize(120, 40)
    await asyncio.sleep(0.5)
    status = await ops.call(lab, "a", "GET", "/status")
    (sess,) = status["domrs"][0]["domr"]["ssh_sessions"]
    assert sess["size"][:2] == [120, 40]  # window-change reached Domain R
    stop.set()
    stats = await task
    assert stats.errors == [], stats.errors
    assert await link.finish() == 0  # Ctrl-] ends the session with exit status 0
    journal = (await ops.journal(lab, GUEST))["journal"][before:]
    assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert "WARNING" not in link.stderr()


async def test_wrong_key_is_refused(lab: LabSpec, tmp_path: Path) -> None:
    import asyncssh

    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=16)
    other = tmp_path / "other_key"
    other.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    other.chmod(0o600)
    link = await SshLink.start(lab.client_ns, doc["ip"], key=other,
                               known_hosts=tmp_path / "known_hosts", workdir=tmp_path)
    code = await asyncio.wait_for(link.proc.wait(), 15)
    link.close()
    assert code == 255 and "Permission denied" in link.stderr()


async def test_ssh_session_survives_co_migrations(lab: LabSpec, tmp_path: Path) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=64, dirty_rate=200)
    before = (await ops.journal(lab, GUEST))["count"]
    typist, link = await ssh_typist(lab, tmp_path, doc["ip"])
    typist.period = 0.05  # one key every 50 ms, for the whole run
    await asyncio.sleep(1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(0.5)
    where = "a"
    for _ in range(5):
        where = "b" if where == "a" else "a"
        trace = await ops.migrate(lab, GUEST, where)
        assert trace["trace_ok"]
        await asyncio.sleep(0.5)
    stop.set()
    stats = await task
    assert stats.errors == [], stats.errors
    assert await link.finish() == 0
    journal = (await ops.journal(lab, GUEST))["journal"][before:]
    assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert len(stats.sent) > 40
    err = link.stderr()
    for bad in ("WARNING", "Corrupted", "Bad packet", "Connection reset", "Broken pipe"):
        assert bad not in err, err


async def read_until(link: SshLink, end: bytes, timeout: float = 60.0) -> bytes:
    out = bytearray()

    async def loop() -> None:
        while not out.endswith(end):
            data = await link.recv()
            if not data:
                raise ConnectionError("ssh closed")
            out.extend(data)

    await asyncio.wait_for(loop(), timeout)
    return bytes(out)


async def test_megabytes_cross_a_migration_and_a_rekey_after_works(
    lab: LabSpec, tmp_path: Path
) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=64)
    link = await SshLink.start(lab.client_ns, doc["ip"], key=lab.ssh_dir / "id_ed25519",
                               known_hosts=tmp_path / "known_hosts", workdir=tmp_path,
                               extra=("-v",))
    await link.wait_connected()
    await asyncio.sleep(1.0)
    await link.send(b"\r")
    await read_until(link, PROMPT)
    last = 700_000  # about 4.7 MB of output through the console ring and SSH
    await link.send(b"seq 1 %d\r" % last)
    # Read slowly until the migration is done: the output backs up through SSH's
    # window into Domain R, which holds the guest's console (flow control), so the
    # transfer is surely in the middle when Domain R and the guest move.
    slow = bytearray()
    migration = asyncio.create_task(ops.migrate(lab, GUEST, "b"))
    while not migration.done():
        slow += await asyncio.wait_for(link.recv(), 30)
        await asyncio.sleep(0.05)
    await migration
    assert len(slow) < last * 6, "the transfer ended before the migration"
    out = bytes(slow) + await read_until(link, b"%d\r\n" % last + PROMPT, timeout=120)
    lines = out.split(b"\r\n")
    start = lines.index(b"seq 1 %d" % last)
    assert [int(x) for x in lines[start + 1:-1]] == list(range(1, last + 1))

    # A client-initiated key exchange on the moved session (OpenSSH's ~R escape).
    await link.send(b"\r~R")
    await read_until(link, PROMPT)
    for _ in range(100):
        if "rekeying" in link.stderr().lower() or "SSH2_MSG_NEWKEYS received" in link.stderr():
            break
        await asyncio.sleep(0.05)
    await link.send(b"echo after-rekey\r")
    assert b"after-rekey\r\n" in await read_until(link, b"after-rekey\r\n" + PROMPT)
    await ops.migrate(lab, GUEST, "a")  # and it still moves after the new keys
    await link.send(b"echo moved-again\r")
    assert b"moved-again" in await read_until(link, b"moved-again\r\n" + PROMPT)
    assert await link.finish() == 0
    err = link.stderr()
    assert err.count("SSH2_MSG_NEWKEYS received") >= 2, err[-2000:]  # login + ~R
    for bad in ("WARNING", "Corrupted", "Bad packet", "Connection reset", "Broken pipe"):
        assert bad not in err, err[-2000:]
