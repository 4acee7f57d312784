"""VNC into the guest through Domain R with vncdotool while the guest migrates (root)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import compare
from keeper.net import netns

pytestmark = pytest.mark.root
pytest.importorskip("vncdotool")
from PIL import Image  # noqa: E402

GUEST = "guest1"
HERE = Path(__file__).parent


async def test_vncdotool_types_through_migrations_and_sees_the_guests_screen(
    lab: LabSpec, tmp_path: Path
) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=64)
    before = (await ops.journal(lab, GUEST))["count"]
    text = "echo " + "".join(chr(97 + i % 26) for i in range(70)) + "\r"
    shot = tmp_path / "screen.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "vncdo_typist.py"), f"{doc['ip']}::5900", text, str(shot),
        "0.05", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: netns.enter(lab.client_ns))
    await asyncio.sleep(1.5)  # vncdotool is typing
    traces = [await ops.migrate(lab, GUEST, h) for h in ("b", "a", "b")]
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert all(t["trace_ok"] for t in traces)
    # every key reached the guest once, in order, with no reconnect of the viewer
    journal = (await ops.journal(lab, GUEST))["journal"][before:]
    assert compare(text.encode(), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    # what the viewer received is exactly what the guest drew in its framebuffer
    guest = np.frombuffer(await ops.screen(lab, GUEST), dtype=np.uint8).reshape(600, 800, 4)
    seen = np.asarray(Image.open(shot).convert("RGB"))
    assert np.array_equal(seen, guest[:, :, 2::-1])
    status = await ops.status(lab)
    assert [d["host"] for d in status["domains"]] == ["b"]


async def test_a_malformed_viewer_is_closed_and_others_go_on(lab: LabSpec) -> None:
    from keeper.lab.vncclient import VncTypist

    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=16)
    good = await VncTypist.connect(lab.client_ns, (doc["ip"], 5900), period=0.02)
    stop = asyncio.Event()
    typing = asyncio.create_task(good.run(stop))
    with netns.entered(lab.client_ns):
        import socket

        bad = socket.create_connection((doc["ip"], 5900), timeout=5)
    assert bad.recv(12).startswith(b"RFB 003.")
    bad.sendall(b"RFB 003.008\n")
    bad.recv(64)
    bad.sendall(b"\x01")  # None
    bad.recv(4)
    bad.sendall(b"\x01")  # ClientInit
    bad.recv(1024)
    bad.sendall(b"\xee" * 16)  # no such client message type
    bad.settimeout(5)
    assert bad.recv(1024) == b""  # closed: this viewer only
    bad.close()
    await asyncio.sleep(1.0)
    stop.set()
    stats = await typing
    good.close()
    assert stats.errors == [] and len(stats.sent) > 10
    journal = (await ops.journal(lab, GUEST))["journal"]
    assert journal.endswith(bytes(stats.sent))


async def test_a_fast_paste_into_a_slow_guest_loses_nothing_across_migrations(
    lab: LabSpec, tmp_path: Path
) -> None:
    """vncdotool types 5,000 characters as fast as it can into a guest that handles
    each event 200 ms late (its 51-slot keyboard ring fills at once): keys wait in
    Domain R's session state, the viewer is held back by TCP flow control, and
    nothing is lost, duplicated or reordered across three co-migrations."""
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=32, event_delay_ms=200)
    before = (await ops.journal(lab, GUEST))["count"]
    chars = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-=!@#%+"
    lines, n = [], 0
    while n < 5000:
        body = "".join(chars[(n + i * 7) % len(chars)] for i in range(59))
        line = ("echo " + body)[: 5000 - n - 1] + "\r"
        lines.append(line)
        n += len(line)
    text = "".join(lines)
    assert len(text) == 5000
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "vncdo_typist.py"), f"{doc['ip']}::5900", text,
        str(tmp_path / "screen.png"), "0", "240",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: netns.enter(lab.client_ns))
    await asyncio.sleep(3)  # the ring is full and keys are held in Domain R
    held = [s for h in (await ops.status(lab))["hosts"] for d in h["domrs"]
            for s in d.get("domr", {}).get("vnc_sessions", [])]
    traces = []
    for h in ("b", "a", "b"):
        traces.append(await ops.migrate(lab, GUEST, h))
        await asyncio.sleep(2)
    _, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert all(t["trace_ok"] for t in traces)
    assert held and held[0]["pending_input"] > 0  # flow control was really exercised
    journal = b""
    for _ in range(100):  # the last keys may still be in the ring, 200 ms per batch
        journal = (await ops.journal(lab, GUEST))["journal"][before:]
        if len(journal) >= len(text):
            break
        await asyncio.sleep(0.5)
    assert compare(text.encode(), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert journal == text.encode()
