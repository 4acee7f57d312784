"""The stock baseline on a real QEMU VM (root, real QEMU, the whole lab): no Domain R;
QEMU's own serial console (a chardev TCP server) and VNC server listen on the host's
management address, as libvirt and OpenStack configure them. A live migration cuts
their clients off (when the source QEMU exits); the target QEMU's consoles listen on
the target's address, where the client must reconnect."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from keeper import ports
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, TypistStats
from keeper.lab.vncclient import VncTypist
from keeper.qemu import image
from keeper.qemu.image import PROMPT, TYPIST

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(image.load() is None, reason="no guest image (./scripts/setup)"),
]

GUEST = "guest1"


async def _domain(lab: LabSpec) -> dict[str, object]:
    (dom,) = [d for d in (await ops.status(lab))["domains"] if d["name"] == GUEST]
    return dom


async def _journal_grows_to(lab: LabSpec, want: bytes, before: int) -> bytes:
    journal = b""
    for _ in range(100):
        journal = (await ops.journal(lab, GUEST))["journal"][before:]
        if want in journal:
            break
        await asyncio.sleep(0.1)
    return journal


async def _quiet(typist: Typist, quiet: float = 0.7) -> bytes:
    """What the console says before the first key of a new connection: the guest may
    still be echoing what the previous client typed (a TCG guest lags), and that goes
    to whoever is connected now. Read until it has been quiet for `quiet` s."""
    stale = b""
    while True:
        try:
            stale += await asyncio.wait_for(typist.link.recv(), quiet)
        except TimeoutError:
            return stale


async def _cut_off(typist: Typist | VncTypist, lab: LabSpec, to: str) -> tuple[
        TypistStats, dict[str, object]]:
    """Type while the guest migrates to `to`; the session must end on its own."""
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop, settle=3.0))
    await asyncio.sleep(0.5)
    trace = await ops.migrate(lab, GUEST, to)
    try:
        stats = await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        typist.close()
    return stats, trace


async def test_status_lists_the_baseline_guest_on_the_host_address(lab: LabSpec) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu", mode="baseline")
    a = lab.host("a").mgmt_ip
    assert (doc["ip"], doc["mode"]) == (a, "baseline")
    dom = await _domain(lab)
    assert (dom["ip"], dom["host"], dom["kind"], dom["mode"]) == (a, "a", "qemu", "baseline")
    assert dom["services"] == {"console": ports.CONSOLE, "vnc": ports.VNC}
    assert dom["guest"] is True and dom["state"] == "running"
    status = await ops.status(lab)
    assert all(h["domrs"] == [] for h in status["hosts"])  # no Domain R anywhere


async def test_console_client_is_cut_off_and_reconnects_to_the_new_host(lab: LabSpec) -> None:
    await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu", mode="baseline")
    where = "a"
    for to in ("b", "a"):
        ip = lab.host(where).mgmt_ip
        assert (await _domain(lab))["ip"] == ip
        typist = await Typist.over_tcp(lab.client_ns, (ip, ports.CONSOLE), PROMPT,
                                       period=0.03, **TYPIST)
        stats, trace = await _cut_off(typist, lab, to)
        assert stats.errors, "the baseline's console session survived a migration"
        assert len(stats.sent) > 0
        assert trace["mode"] == "baseline" and trace["trace_ok"]
        assert trace["guest"]["kind"] == "qemu"  # type: ignore[index]
        assert trace["consoles"]["target"] == lab.host(to).mgmt_ip  # type: ignore[index]
        assert trace["qemu_downtime_ms"] is not None
        where = to
        dom = await _domain(lab)
        assert (dom["host"], dom["ip"]) == (to, lab.host(to).mgmt_ip)
        # the old host's console is gone with its QEMU; the new host's answers
        with pytest.raises(OSError):
            await Typist.over_tcp(lab.client_ns, (ip, ports.CONSOLE), PROMPT)
        before = (await ops.journal(lab, GUEST))["count"]
        again = await Typist.over_tcp(lab.client_ns, (lab.host(to).mgmt_ip, ports.CONSOLE),
                                      PROMPT, period=0.03, **TYPIST)
        await _quiet(again)
        stop = asyncio.Event()
        task = asyncio.create_task(again.run(stop))
        await asyncio.sleep(1.5)
        stop.set()
        more = await task
        again.close()
        assert more.errors == [] and len(more.sent) > 0
        journal = await _journal_grows_to(lab, bytes(more.sent), before)
        assert journal.endswith(bytes(more.sent))  # every key after the reconnect arrived


async def test_vnc_client_is_cut_off_and_reconnects_to_the_new_host(lab: LabSpec) -> None:
    await ops.create_guest(lab, GUEST, "a", mem_mb=128, guest="qemu", mode="baseline")
    where = "a"
    for i, to in enumerate(("b", "a")):
        ip = lab.host(where).mgmt_ip
        viewer = await VncTypist.connect(lab.client_ns, (ip, ports.VNC), period=0.05)
        assert viewer.width >= 640  # QEMU's own VNC server: the VM's VGA screen
        stats, trace = await _cut_off(viewer, lab, to)
        assert stats.errors, "the baseline's VNC session survived a migration"
        assert stats.updates > 0 and trace["trace_ok"]
        where = to
        with pytest.raises(OSError):
            await VncTypist.connect(lab.client_ns, (ip, ports.VNC), timeout=3)
        # a viewer of the new host's VNC server types again (lower case: no Shift)
        before = (await ops.journal(lab, GUEST))["count"]
        again = await VncTypist.connect(lab.client_ns, (lab.host(to).mgmt_ip, ports.VNC))
        text = f"echo again{'xyz'[i]}\r".encode()
        for ch in text:
            await again._key(ch)
            await asyncio.sleep(0.05)
        journal = await _journal_grows_to(lab, text, before)
        again.close()
        assert text in journal
