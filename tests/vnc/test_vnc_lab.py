"""VNC into the guest through Domain R with vncdotool while the guest migrates (root)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from keeper.lab import netns, ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import compare

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
    from keeper.vnc.client import VncTypist

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
