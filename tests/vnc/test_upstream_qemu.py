"""UpstreamDisplay against a real QEMU's VNC server on a Unix socket.

No kernel is needed for the screen: SeaBIOS draws text in the VGA text mode, and the
Bochs VBE registers (written through the monitor's `o` command) switch the std VGA to
other sizes. QEMU's own `screendump` (QMP, PPM) is the reference the framebuffer must
equal, with the VM stopped so the cursor does not blink in between. QEMU's trace of
the extended key events it receives shows which key each of our XT codes became. With
the guest image (keeper.qemu.image), keys typed through `put_input` must reach a busybox
shell on tty1 with their Shift: `echo $((6*7))` shows 42.

Every QEMU started here is killed by its PID and its sockets removed, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from keeper.vnc import keysyms
from keeper.vnc.upstream import XT_KEYCODES
from keeper.vnc.upstream_link import UpstreamDisplay

QEMU = "qemu-system-x86_64"
GUEST_CACHE = Path("/var/cache/keeper/guest")

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed"),
]
qmp_lib = pytest.importorskip("qemu.qmp", reason="qemu.qmp not installed "
                              "(.venv/bin/pip install qemu.qmp==0.0.6)")


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    dir: Path
    vnc: Path
    qmp: qmp_lib.QMPClient
    log: Path

    async def hmp(self, command: str) -> str:
        out = await self.qmp.execute("human-monitor-command", {"command-line": command})
        assert isinstance(out, str)
        return out

    async def screendump(self) -> np.ndarray:
        """QEMU's own picture of the screen: (h, w, 3) RGB."""
        path = self.dir / "screen.ppm"
        await self.qmp.execute("screendump", {"filename": str(path)})
        data = path.read_bytes()
        m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
        assert m, data[:20]
        w, h = int(m[1]), int(m[2])
        return np.frombuffer(data, np.uint8, w * h * 3, m.end()).reshape(h, w, 3)

    async def vbe(self, width: int, height: int) -> None:
        """Switch the std VGA to a width x height x 32 graphics mode (Bochs VBE DISPI:
        index port 0x1ce, data 0x1cf). NOCLEARMEM keeps the old video memory, so the
        new screen shows a pattern, not black."""
        for index, value in ((4, 0), (1, width), (2, height), (3, 32), (4, 0x81)):
            await self.hmp(f"o/h 0x1ce {index}")
            await self.hmp(f"o/h 0x1cf {value}")

    async def text(self) -> list[str]:
        """The VGA text memory (32 KiB from 0xb8000) as 80-column rows. The console
        scrolls by moving the display start, so the visible screen is a window of
        these; what it shows is in them."""
        out = await self.hmp("xp /16384hx 0xb8000")
        cells = [int(v, 16) & 0xFF for v in re.findall(r"0x([0-9a-f]{4})\b", out)]
        chars = "".join(chr(c) if 32 <= c < 127 else " " for c in cells)
        return [chars[i:i + 80].rstrip() for i in range(0, len(chars), 80)]

    async def wait_text(self, pattern: str, timeout: float) -> list[str]:
        """Poll the text memory until a row matches `pattern`; returns the rows."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.text()
            if any(re.search(pattern, row) for row in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the VGA text: {rows[:30]}")
            await asyncio.sleep(0.2)


async def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def qemu(*extra: str, memory: int = 64, trace: tuple[str, ...] = ()
               ) -> AsyncIterator[Qemu]:
    run = Path(tempfile.mkdtemp(prefix="kvnc-", dir="/tmp"))  # short: sun_path is 108
    vnc, qmp_path, log = run / "vnc.sock", run / "qmp.sock", run / "qemu.log"
    args = [QEMU, "-display", "none", "-vga", "std", "-nodefaults", "-accel", "tcg",
            "-m", str(memory), "-vnc", f"unix:{vnc}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off", "-D", str(log), *extra]
    for event in trace:
        args += ["-trace", f"enable={event}"]
    with open(run / "stderr", "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    client = qmp_lib.QMPClient("keeper-test")
    try:
        await wait_for(lambda: proc.poll() is not None or (vnc.exists() and qmp_path.exists()),
                       10, "QEMU's sockets")
        assert proc.poll() is None, (run / "stderr").read_text()
        async with asyncio.timeout(10):
            await client.connect(str(qmp_path))
        yield Qemu(proc, run, vnc, client, log)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await client.disconnect()
        proc.terminate()  # ours, by PID
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(run, ignore_errors=True)  # the sockets QEMU leaves behind too


class Watcher:
    """Damage and resizes a display reports; `covered` says whether everything since
    `reset()` added up to the whole screen."""

    def __init__(self, display: UpstreamDisplay) -> None:
        self.display = display
        self.sizes: list[tuple[int, int]] = []
        self.mask = np.zeros((display.height, display.width), bool)
        display.on_damage = self._damage
        display.on_resize = self._resize

    def _damage(self, rects: list[tuple[int, int, int, int]]) -> None:
        for x, y, w, h in rects:
            self.mask[y:y + h, x:x + w] = True

    def _resize(self, w: int, h: int) -> None:
        self.sizes.append((w, h))
        self.mask = np.zeros((h, w), bool)

    def reset(self) -> None:
        self.mask[:] = False

    def covered(self) -> bool:
        return bool(self.mask.all())


def rgb(display: UpstreamDisplay) -> np.ndarray:
    bgrx = np.frombuffer(display.read(0, 0, display.width, display.height), np.uint8)
    return bgrx.reshape(display.height, display.width, 4)[..., 2::-1]


async def assert_same_as_screendump(vm: Qemu, display: UpstreamDisplay, watch: Watcher) -> None:
    """Stop the VM (nothing moves, the cursor stops blinking), ask for the whole screen,
    and compare it with QEMU's screendump."""
    await vm.qmp.execute("stop")
    try:
        watch.reset()
        display.refresh()
        await wait_for(watch.covered, 10, "a full update after refresh()")
        reference = await vm.screendump()
        assert reference.shape[:2] == (display.height, display.width)
        ours = rgb(display)
        diff = np.argwhere((ours != reference).any(axis=2))
        assert diff.size == 0, f"{len(diff)} pixels differ, first at (y, x) {diff[0]}"
    finally:
        await vm.qmp.execute("cont")


async def test_framebuffer_is_qemus_screen_and_follows_resizes() -> None:
    async with qemu() as vm:
        display = UpstreamDisplay(vm.vnc)
        try:
            await display.connect(timeout=10)
            assert display.ready.is_set() and display.connected
            assert display.core.ext_keys, "QEMU did not announce Extended Key Event"
            watch = Watcher(display)
            await vm.wait_text(r"^SeaBIOS", 20)
            assert (display.width, display.height) == (720, 400)  # VGA text mode
            await assert_same_as_screendump(vm, display, watch)

            await vm.vbe(800, 600)
            await wait_for(lambda: (800, 600) in watch.sizes, 10, "DesktopSize 800x600")
            assert (display.width, display.height) == (800, 600)
            await assert_same_as_screendump(vm, display, watch)
            assert rgb(display).any()  # the old video memory, seen as pixels

            await vm.vbe(640, 480)
            await wait_for(lambda: (640, 480) in watch.sizes, 10, "DesktopSize 640x480")
            await assert_same_as_screendump(vm, display, watch)
        finally:
            display.close()


# Linux KEY_* -> the QKeyCode names QEMU's trace shows for the XT code we send
# (qapi/ui.json); a sample of every kind: main block, keypad, 0xe0 keys, oddities.
EXPECTED_QCODES = {
    keysyms.KEY_ESC: "esc", keysyms.KEY_1: "1", keysyms.KEY_0: "0", 30: "a", 44: "z",
    keysyms.KEY_MINUS: "minus", keysyms.KEY_BACKSPACE: "backspace", keysyms.KEY_TAB: "tab",
    keysyms.KEY_ENTER: "ret", keysyms.KEY_LEFTCTRL: "ctrl", keysyms.KEY_LEFTSHIFT: "shift",
    keysyms.KEY_RIGHTSHIFT: "shift_r", keysyms.KEY_LEFTALT: "alt", keysyms.KEY_SPACE: "spc",
    keysyms.KEY_CAPSLOCK: "caps_lock", keysyms.KEY_F1: "f1", keysyms.KEY_F11: "f11",
    keysyms.KEY_F12: "f12", keysyms.KEY_NUMLOCK: "num_lock", 71: "kp_7", 83: "kp_decimal",
    keysyms.KEY_KPASTERISK: "kp_multiply", 86: "less", keysyms.KEY_KPENTER: "kp_enter",
    keysyms.KEY_RIGHTCTRL: "ctrl_r", 98: "kp_divide", keysyms.KEY_RIGHTALT: "alt_r",
    keysyms.KEY_HOME: "home", keysyms.KEY_UP: "up", keysyms.KEY_PAGEUP: "pgup",
    keysyms.KEY_LEFT: "left", keysyms.KEY_RIGHT: "right", keysyms.KEY_END: "end",
    keysyms.KEY_DOWN: "down", keysyms.KEY_PAGEDOWN: "pgdn", keysyms.KEY_INSERT: "insert",
    keysyms.KEY_DELETE: "delete", keysyms.KEY_PAUSE: "pause",
    keysyms.KEY_LEFTMETA: "meta_l", keysyms.KEY_RIGHTMETA: "meta_r",
    keysyms.KEY_COMPOSE: "compose", 113: "audiomute", 117: "kp_equals",
}
SYSRQ_NAMES = {"sysrq", "print"}  # one XT code, two names in keycodemapdb


async def put_all(display: UpstreamDisplay, groups: list[list[tuple[str, int, int]]]) -> None:
    """Hand groups over in order, as fast as the display takes them."""
    for group in groups:
        await wait_for(lambda g=group: display.put_input(g), 10, "room for input")


async def test_every_key_reaches_qemu_as_the_key_we_meant() -> None:
    async with qemu(trace=("vnc_key_event_ext", "vnc_key_sync_numlock",
                           "vnc_key_sync_capslock")) as vm:
        display = UpstreamDisplay(vm.vnc)
        try:
            await display.connect(timeout=10)
            codes = sorted(XT_KEYCODES)
            # Shift held over letters and keypad keys: what would make QEMU's lock-key
            # sync press Caps/Num Lock behind our back, were it on
            groups = [[("key", keysyms.KEY_LEFTSHIFT, 1)]]
            groups += [[("key", c, 1), ("key", c, 0)] for c in codes]
            groups += [[("key", keysyms.KEY_LEFTSHIFT, 0)]]
            await put_all(display, groups)
            await display.drain(5)
            want = 2 * len(codes) + 2
            lines: list[str] = []

            def traced() -> bool:
                lines[:] = [ln for ln in vm.log.read_text().splitlines()
                            if ln.startswith("vnc_key")]
                return len(lines) >= want

            await wait_for(traced, 10, f"{want} key events in QEMU's trace")
        finally:
            display.close()
    assert not [ln for ln in lines if "sync" in ln], "QEMU pressed lock keys itself"
    seen = [re.fullmatch(r"vnc_key_event_ext down (\d), sym 0x0, keycode 0x([0-9a-f]+) "
                         r"\[(\w+)\]", ln) for ln in lines]
    assert all(seen), lines
    by_code = {int(m[2], 16): m[3] for m in seen if m}
    assert [(int(m[1]), int(m[2], 16)) for m in seen if m][1:-1] == [
        (d, XT_KEYCODES[c]) for c in codes for d in (1, 0)]
    unmapped = [c for c in codes if by_code[XT_KEYCODES[c]] == "unmapped"]
    assert not unmapped, f"QEMU has no key for Linux codes {unmapped}"
    for code, name in EXPECTED_QCODES.items():
        assert by_code[XT_KEYCODES[code]] == name, (code, name)
    assert by_code[XT_KEYCODES[keysyms.KEY_SYSRQ]] in SYSRQ_NAMES


# --- with a guest: a busybox shell on tty1 ------------------------------------------------


def guest_boot_args() -> list[str]:
    """QEMU arguments booting keeper's guest image, or skip if it is not built."""
    meta = GUEST_CACHE / "image.json"
    try:
        info = json.loads(meta.read_text())
        kernel, initrd = GUEST_CACHE / info["kernel"], GUEST_CACHE / info["initrd"]
        cmdline = info["cmdline"]
    except (OSError, ValueError, KeyError):
        pytest.skip(f"guest image not built in {GUEST_CACHE} (python -m keeper.qemu.image)")
    if not (kernel.exists() and initrd.exists()):
        pytest.skip(f"guest image in {GUEST_CACHE} is incomplete")
    # two UARTs for the image's serial relay (ttyS0 console, ttyS1 journal)
    return ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-serial", "null", "-serial", "null"]


SHIFTED = {"$": keysyms.KEY_4, "(": keysyms.KEY_9, ")": keysyms.KEY_0, "*": keysyms.KEY_8}
PLAIN = {" ": keysyms.KEY_SPACE, "\n": keysyms.KEY_ENTER, "6": keysyms.KEY_6,
         "7": keysyms.KEY_7, "e": 18, "c": 46, "h": 35, "o": 24}


def typing(text: str) -> list[list[tuple[str, int, int]]]:
    """Key groups a US keyboard makes for `text`: Shift pressed around shifted keys."""
    groups = []
    for ch in text:
        if ch in SHIFTED:
            code = SHIFTED[ch]
            groups.append([("key", keysyms.KEY_LEFTSHIFT, 1), ("key", code, 1),
                           ("key", code, 0), ("key", keysyms.KEY_LEFTSHIFT, 0)])
        else:
            code = PLAIN[ch]
            groups.append([("key", code, 1), ("key", code, 0)])
    return groups


async def test_keys_reach_a_busybox_shell_with_their_shift() -> None:
    boot = guest_boot_args()
    async with qemu(*boot, memory=256) as vm:
        display = UpstreamDisplay(vm.vnc)
        try:
            await display.connect(timeout=20)
            watch = Watcher(display)
            await vm.wait_text(r"^keeper-guest:\S*#$", 90)  # the shell prompt
            await put_all(display, typing("echo $((6*7))\n"))  # at once, no pacing
            await display.drain(5)
            rows = await vm.wait_text(r"^42$", 30)
            command = [i for i, row in enumerate(rows) if row.endswith("# echo $((6*7))")]
            assert command, f"the command line was not typed exactly: {rows}"
            assert rows[command[-1] + 1] == "42"
            await assert_same_as_screendump(vm, display, watch)  # and we show it
        finally:
            display.close()
