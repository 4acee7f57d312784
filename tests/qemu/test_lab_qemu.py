"""keeper in front of a real QEMU VM (root, real QEMU under TCG, the whole lab, real
clients): sessions survive QEMU live migrations, and the guest kernel's own journal
says nothing typed was lost."""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper.errors import KeeperError
from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.net import netns
from keeper.qemu import image
from keeper.qemu.image import PROMPT, TYPIST

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(image.load() is None, reason="no guest image (./scripts/setup)"),
]

GUEST = "guest1"
HERE = Path(__file__).parent


def _pixels(ppm: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ppm)).convert("RGB"), dtype=np.int16)


async def wait_journal(lab: LabSpec, want: int, before: int = 0) -> bytes:
    journal = b""
    for _ in range(100):
        journal = (await ops.journal(lab, GUEST))["journal"][before:]
        if len(journal) >= want:
            break
        await asyncio.sleep(0.1)
    return journal


async def test_openssh_types_through_qemu_migrations(lab: LabSpec, tmp_path: Path) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu")
    status = await ops.status(lab)
    (dom,) = [d for d in status["domains"] if d["name"] == GUEST]
    assert (dom["kind"], dom["accel"]) == ("qemu", doc["accel"])
    assert dom["kernel"].endswith("-cloud-amd64")
    before = (await ops.journal(lab, GUEST))["count"]
    link = await SshLink.start(lab.client_ns, doc["ip"], key=lab.ssh_dir / "id_ed25519",
                               known_hosts=tmp_path / "known_hosts", workdir=tmp_path)
    await link.wait_connected()
    await asyncio.sleep(1.0)
    typist = Typist(link, PROMPT, period=0.05, **TYPIST)  # a key every 50 ms
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(0.5)
    traces = []
    for target in ("b", "a", "b"):
        traces.append(await ops.migrate(lab, GUEST, target))
        await asyncio.sleep(0.5)
    stop.set()
    stats = await task
    assert stats.errors == [], stats.errors
    assert all(t["trace_ok"] for t in traces)
    assert [t["guest"]["kind"] for t in traces] == ["qemu"] * 3
    journal = await wait_journal(lab, len(stats.sent), before)
    assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert journal == bytes(stats.sent)
    # the guest's busybox shell still runs what is typed after the last migration
    await link.send(b"echo $((6*7))\r")
    seen = b""
    while b"\r\n42\r\n" not in seen:
        seen += await asyncio.wait_for(link.recv(), 10)
    assert await link.finish() == 0
    assert "WARNING" not in link.stderr()  # the same host key all along


async def test_vncdotool_types_through_qemu_migrations(lab: LabSpec, tmp_path: Path) -> None:
    pytest.importorskip("vncdotool")
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu")
    before = (await ops.journal(lab, GUEST))["count"]
    blank = _pixels(await ops.screen(lab, GUEST))
    text = "echo vnc" + "".join(chr(97 + i % 26) for i in range(60)) + "\r"
    shot = tmp_path / "screen.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE.parent / "vnc" / "vncdo_typist.py"), f"{doc['ip']}::5900",
        text, str(shot), "0.03", "60", str(tmp_path / "gate"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: netns.enter(lab.client_ns))
    await asyncio.sleep(0.5)
    traces = [await ops.migrate(lab, GUEST, h) for h in ("b", "a", "b")]
    journal = await wait_journal(lab, len(text), before)
    await asyncio.sleep(0.5)  # the shell's echo of the last key is on the screen
    (tmp_path / "gate").touch()  # now the viewer captures what it sees
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert all(t["trace_ok"] for t in traces)
    assert compare(text.encode(), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert journal[: len(text)] == text.encode()
    # what the viewer captured at the end is what QEMU drew (its own screendump),
    # but for the blinking text cursor: at most one 9x16 character cell differs
    seen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    qemu = _pixels(await ops.screen(lab, GUEST))
    assert seen.shape == qemu.shape and seen.shape[1] >= 640
    ys, xs = np.nonzero(np.any(seen != qemu, axis=2))
    assert len(ys) == 0 or (np.ptp(ys) < 16 and np.ptp(xs) < 9), (len(ys), ys[:5], xs[:5])
    # and the typed line is on that screen: it differs from the screen before typing
    assert not np.array_equal(qemu, blank)


@pytest.mark.parametrize(("point", "action"), [
    ("incoming", "crash"), ("prepare", "crash"), ("associate", "crash"), ("evtchns", "crash"),
    ("restore", "crash"), ("guest_resume", "crash"),
    ("associate", "kill_guest"), ("evtchns", "kill_guest"), ("guest_resume", "kill_guest"),
    # the window (docs/design.md): the VM already runs on b, b's Domain R never served
    ("guest_resumed", "crash"), ("link_up", "crash"), ("link_up", "kill_domr")])
async def test_target_agent_or_qemu_dies_and_the_vm_goes_on_at_the_source(
    lab: LabSpec, point: str, action: str
) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu")
    before = (await ops.journal(lab, GUEST))["count"]
    typist = await Typist.over_tcp(lab.client_ns, (doc["ip"], 2323), PROMPT, period=0.03,
                                   **TYPIST)
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(0.5)
    await ops.call(lab, "b", "POST", "/debug/fault", json={"point": point, "action": action})
    with pytest.raises(KeeperError, match="stays on a"):
        await ops.migrate(lab, GUEST, "b")
    await asyncio.sleep(1.0)  # typing goes on, on host a
    assert await ops.where(lab, GUEST) == "a"
    stop.set()
    stats = await task
    typist.close()
    assert stats.errors == [], stats.errors
    journal = await wait_journal(lab, len(stats.sent), before)
    assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
