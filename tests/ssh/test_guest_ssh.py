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
