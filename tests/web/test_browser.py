"""noVNC in headless Chromium, in the lab's client namespace, on Domain R's web console
while the guest co-migrates three times (root).

Chromium and its WebDriver run in the client namespace (the WebDriver is started from a
thread that entered it, and so is every WebDriver call), so the page, its modules and
the WebSocket go over the lab's network to Domain R's address like any client's
traffic. The client namespace has no route but the lab's 198.18.0.0/24.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keeper import ports
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import compare
from keeper.net import netns

pytestmark = pytest.mark.root
pytest.importorskip("selenium")
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
GUEST = "guest1"

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("chromium and chromedriver are not installed (scripts/setup)",
                allow_module_level=True)


class Browser:
    """One headless Chromium, driven from one thread that lives in the client ns."""

    def __init__(self, ns: str, profile: Path) -> None:
        self.pool = ThreadPoolExecutor(1, initializer=netns.enter, initargs=(ns,))
        self.profile = profile
        self.driver: Any = None
        self.pids: list[int] = []

    def _start(self) -> None:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1100,800", "--no-first-run",
                    "--no-default-browser-check", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-default-apps",
                    "--disable-extensions", "--metrics-recording-only",
                    f"--user-data-dir={self.profile}"):
            opts.add_argument(arg)
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
        self.driver = webdriver.Chrome(options=opts, service=service)
        self.pids.append(service.process.pid)

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def start(self) -> None:
        await self.run(self._start)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, script, *args)

    def _quit(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.quit()

    async def close(self) -> None:
        """Quit Chromium; if that failed, end the WebDriver we started and its children."""
        try:
            await asyncio.wait_for(self.run(self._quit), 30)
        finally:
            for pid in self.pids:
                for child in _children(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.pool.shutdown(wait=False, cancel_futures=True)


def _children(pid: int) -> Iterator[int]:
    """Descendants of `pid` (Chromium's processes under the WebDriver we started)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for kid in map(int, kids):
        yield from _children(kid)
        yield kid


def typist(browser: Browser, stop: threading.Event, typed: list[str]) -> None:
    """Type lines of `echo ...` into the focused noVNC canvas until `stop` (the line in
    progress is finished), one key every 30 ms. Runs in the browser's thread."""
    n = 0
    while not stop.is_set() or n == 0:
        line = f"echo {n:02d} " + "".join(chr(97 + (n * 7 + i) % 26) for i in range(24))
        for ch in line:
            ActionChains(browser.driver).send_keys(ch).perform()
            typed.append(ch)
            time.sleep(0.03)
        ActionChains(browser.driver).send_keys(Keys.ENTER).perform()
        typed.append("\r")
        n += 1


def lifecycle(events: list[dict[str, Any]]) -> list[str]:
    """The RFB object's connection events, in order (desktopname, bell: not those)."""
    return [e["type"] for e in events if e["type"] in (
        "connect", "disconnect", "credentialsrequired", "securityfailure")]


CANVAS_PNG = """
const c = document.querySelector('#screen canvas');
return c ? [c.width, c.height, c.toDataURL('image/png')] : null;
"""


async def canvas(browser: Browser) -> np.ndarray | None:
    got = await browser.js(CANVAS_PNG)
    if not got:
        return None
    png = base64.b64decode(got[2].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


async def web_sessions(lab: LabSpec) -> list[tuple[str, int]]:
    return [(h["host"], s["id"]) for h in (await ops.status(lab))["hosts"]
            for d in h["domrs"] for s in d.get("domr", {}).get("web_sessions", [])
            if s["kind"] == "websocket"]


def has_qemu() -> bool:
    from keeper.qemu import image

    return shutil.which("qemu-system-x86_64") is not None and image.load() is not None


async def guest_screen(lab: LabSpec, kind: str) -> np.ndarray:
    """What the guest shows, RGB: the simulated guest's framebuffer (BGRX in its
    memory), or QEMU's own screendump (PPM) of a QEMU VM's display."""
    raw = await ops.screen(lab, GUEST)
    if kind == "qemu":
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return np.frombuffer(raw, dtype=np.uint8).reshape(600, 800, 4)[:, :, 2::-1]


def differs(seen: np.ndarray, guest: np.ndarray, kind: str) -> int:
    """Pixels that differ; on a QEMU VM's text console, but for its blinking cursor
    (at most one 9x16 character cell may differ)."""
    ys, xs = np.nonzero(np.any(seen != guest, axis=2))
    if kind == "qemu" and len(ys) and np.ptp(ys) < 16 and np.ptp(xs) < 9:
        return 0
    return len(ys)


@pytest.mark.parametrize("kind", [
    "sim", pytest.param("qemu", marks=pytest.mark.skipif(
        not has_qemu(), reason="no QEMU or no guest image (./scripts/setup)"))])
async def test_novnc_in_chromium_through_three_co_migrations(lab: LabSpec, tmp_path: Path,
                                                             kind: str) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=128 if kind == "qemu" else 64,
                                 guest=kind)
    url = f"http://{doc['ip']}:{ports.WEB}/"
    before = (await ops.journal(lab, GUEST))["count"]
    browser = Browser(lab.client_ns, tmp_path / "profile")
    try:
        await browser.start()
        await browser.run(browser.driver.get, url)
        for _ in range(200):  # noVNC loads its modules, opens the WebSocket, RFB handshake
            events = await browser.js("return window.keeper ? window.keeper.events : []")
            if any(e["type"] == "connect" for e in events):
                break
            await asyncio.sleep(0.1)
        assert lifecycle(events) == ["connect"], events
        connect_ms = await browser.js(  # from navigation to noVNC's connect event
            "return window.keeper.events.find(e => e.type === 'connect').time"
            " - performance.timeOrigin")
        moving = await web_sessions(lab)
        assert [h for h, _ in moving] == ["a"]

        stop, typed = threading.Event(), []
        typing = asyncio.ensure_future(browser.run(typist, browser, stop, typed))
        await asyncio.sleep(1.5)
        traces, during = [], []
        for host in ("b", "a", "b"):
            n = len(typed)
            traces.append(await ops.migrate(lab, GUEST, host))
            during.append(len(typed) - n)
            await asyncio.sleep(1.0)  # keys go on between migrations
        stop.set()
        await asyncio.wait_for(typing, 120)
        assert all(t["trace_ok"] for t in traces)
        assert all(during), during  # the browser was typing while each migration ran

        # noVNC never saw its connection go: no disconnect, same session, now on b
        events = await browser.js("return window.keeper.events")
        assert lifecycle(events) == ["connect"], events
        assert await web_sessions(lab) == [("b", moving[0][1])]

        # the guest got every key, once, in order
        text = "".join(typed).encode()
        journal, last, still = b"", -1, 0
        while len(journal) < len(text) and still < 40:  # until it stops growing for 8 s
            await asyncio.sleep(0.2)
            journal = (await ops.journal(lab, GUEST))["journal"][before:]
            still = still + 1 if len(journal) == last else 0
            last = len(journal)
        (tmp_path / "typed.txt").write_bytes(text)
        (tmp_path / "journal.txt").write_bytes(journal)
        assert compare(text, journal) == {"lost": 0, "duplicated": 0, "reordered": 0}, (
            f"typed and journal in {tmp_path}")
        assert journal == text
        print(f"{kind}: page to connect {connect_ms:.0f} ms; browser typed {len(text)} "
              f"keys, {during} during the 3 migrations; web session {moving[0][1]} "
              "a->b->a->b")

        # the canvas shows exactly the guest's framebuffer (updates may still be coming)
        seen = guest = None
        for _ in range(60):
            guest = await guest_screen(lab, kind)
            seen = await canvas(browser)
            if seen is not None and seen.shape == guest.shape and not differs(seen, guest, kind):
                break
            await asyncio.sleep(0.25)
        assert seen is not None and guest is not None
        Image.fromarray(seen).save(tmp_path / "canvas.png")
        assert seen.shape == guest.shape
        assert differs(seen, guest, kind) == 0
        assert len(np.unique(guest.reshape(-1, 3), axis=0)) > 1  # not a blank screen
    finally:
        await browser.close()
