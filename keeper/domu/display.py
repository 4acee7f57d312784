"""The guest's second terminal: a text screen drawn into its framebuffer, typed at
through its virtual keyboard (Xen's vkbd and vfb frontends, io/kbdif.h, io/fbif.h).

Everything lives in guest memory, in the display region (layout.DEV_PAGES):

  +0 vkbd page    key and pointer events from Domain R (in ring)
  +1 vfb page     geometry, page directory, update events to Domain R (out ring)
  +2 directory    the framebuffer's page numbers (u64 each)
  +3 tty1 state   line buffer and line-discipline state (like the console's)
  +4 screen       100x37 characters, cursor, shift state, event-channel ports
  +5 ...          the framebuffer: 800x600, 32 bpp (BGRX), one row after another

Keys go through a US keymap (with shift) to the same line discipline and shell as
the serial console, like a real tty, and into the same input journal. Output goes
onto the screen; changed text rows are rendered (Pillow's built-in bitmap font, in
8x16 cells) into the framebuffer and announced to Domain R as update rectangles.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Protocol

import numpy as np

from keeper.domu.layout import ConsoleState, Journal, Layout
from keeper.domu.memory import PAGE, GuestMemory
from keeper.xen import events as ev


class Tty(Protocol):
    """What the screen's terminal needs of the guest OS (keeper.domu.guestos.GuestOS):
    its memory and layout, the input journal, the line discipline and the prompt."""

    mem: GuestMemory
    layout: Layout
    _journal: Journal

    def _line_discipline(self, data: bytes, st: ConsoleState | None = None) -> bytes: ...
    def _prompt(self) -> bytes: ...

WIDTH, HEIGHT, DEPTH = 800, 600, 32
CELL_W, CELL_H = 8, 16
COLS, ROWS = WIDTH // CELL_W, HEIGHT // CELL_H
LINE = WIDTH * 4
FG = (0xD0, 0xD0, 0xD0)  # BGR
# screen page offsets
SC_CHARS = 0
SC_ROW, SC_COL, SC_SHIFT, SC_CTRL, SC_KBD_PORT, SC_FB_PORT = 3712, 3716, 3720, 3724, 3728, 3732
SC_SAVER = 3736  # u32: screensaver frames drawn (0: off); SC_SAVER_ON u32
SC_SAVER_ON = 3740  # 0 off, 1 on (at most SAVER_FPS frames/s), 2 on and uncapped
SAVER_FPS = 50

KEY_LEFTSHIFT, KEY_RIGHTSHIFT, KEY_LEFTCTRL, KEY_RIGHTCTRL = 42, 54, 29, 97
# US keymap: Linux keycode -> (plain, shifted)
_ROWS = [
    (2, "1234567890-=", "!@#$%^&*()_+"),
    (16, "qwertyuiop[]", "QWERTYUIOP{}"),
    (30, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    (43, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
]
KEYMAP: dict[int, tuple[int, int]] = {}
for start, plain, shifted in _ROWS:
    for i, (a, b) in enumerate(zip(plain, shifted, strict=True)):
        KEYMAP[start + i] = (ord(a), ord(b))
KEYMAP.update({57: (32, 32), 28: (13, 13), 14: (0x7F, 0x7F), 15: (9, 9), 1: (27, 27)})


@lru_cache(maxsize=256)
def glyph(ch: int) -> bytes:
    """The 8x16 BGRX cell for character `ch` (derived data: not guest state)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (CELL_W, CELL_H), 0)
    if 32 < ch < 127:
        ImageDraw.Draw(img).text((1, 2), chr(ch), fill=255,
                                 font=ImageFont.load_default_imagefont())
    alpha = np.asarray(img, dtype=np.uint16)
    cell = np.zeros((CELL_H, CELL_W, 4), dtype=np.uint8)
    for i, c in enumerate(FG):
        cell[:, :, i] = (alpha * c // 255).astype(np.uint8)
    return cell.tobytes()


def warm_glyphs() -> None:
    """Render every printable cell now, in a guest process started on a migration's
    target. A migrated guest's font is in its memory, as a real kernel's is; this
    process's cache of it is not, and a cold cache cost the first rows drawn on the
    target ~0.2 s (PIL's import and a glyph per character): a VNC viewer saw its keys'
    echoes that much later than the console's."""
    for ch in range(32, 127):
        glyph(ch)


class Display:
    def __init__(self, gos: Tty) -> None:
        self.gos = gos
        self.mem = gos.mem
        base = gos.layout.dev_pfn
        self.kbd_pfn, self.fb_pfn, self.dir_pfn = base, base + 1, base + 2
        self.tty = ConsoleState(self.mem, base + 3)
        self.screen = (base + 4) * PAGE
        self.fb_first = base + 5
        self.fb_pages = (WIDTH * HEIGHT * 4 + PAGE - 1) // PAGE
        self.kbd = self.mem.page(self.kbd_pfn)
        self.fb = self.mem.page(self.fb_pfn)

    # -- memory-backed fields -----------------------------------------------------------

    def _get(self, off: int) -> int:
        return self.mem.u32(self.screen + off)

    def _set(self, off: int, v: int) -> None:
        self.mem.set_u32(self.screen + off, v)

    @property
    def kbd_port(self) -> int:
        return self._get(SC_KBD_PORT)

    @property
    def fb_port(self) -> int:
        return self._get(SC_FB_PORT)

    def set_ports(self, kbd: int, fb: int) -> None:
        self._set(SC_KBD_PORT, kbd)
        self._set(SC_FB_PORT, fb)

    def fb_offset(self) -> int:
        return self.fb_first * PAGE

    # -- boot ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Frontends' side of the set-up: rings, geometry, page directory, blank screen."""
        ev.init(self.kbd)
        ev.init(self.fb)
        ev.write_fb_header(self.fb, WIDTH, HEIGHT, DEPTH, [self.dir_pfn])
        pfns = list(range(self.fb_first, self.fb_first + self.fb_pages))
        self.mem.write(self.dir_pfn * PAGE, struct.pack(f"<{len(pfns)}Q", *pfns))
        self.tty.format()
        self.mem.write(self.screen, bytes(PAGE))
        self.write(self.gos._prompt())
        self.announce(0, 0, WIDTH, HEIGHT)

    # -- input -----------------------------------------------------------------------------

    def service_keyboard(self) -> bool:
        """Take the keyboard's events; typed characters go to the line discipline, its
        output to the screen. True if the backend should be notified."""
        events = ev.take(self.kbd, ev.KBD_IN, peer="Domain R")
        if not events:
            return False
        typed = bytearray()
        for raw in events:
            kind, code, pressed = ev.parse_kbd(raw)
            if kind != ev.XENKBD_TYPE_KEY:
                continue
            if code in (KEY_LEFTSHIFT, KEY_RIGHTSHIFT):
                self._set(SC_SHIFT, int(bool(pressed)))
            elif code in (KEY_LEFTCTRL, KEY_RIGHTCTRL):
                self._set(SC_CTRL, int(bool(pressed)))
            elif pressed and code in KEYMAP:
                ch = KEYMAP[code][self._get(SC_SHIFT)]
                if self._get(SC_CTRL) and 0x61 <= (ch | 0x20) <= 0x7A:
                    ch = (ch | 0x20) - 0x60  # Ctrl-letter
                typed.append(ch)
        if typed:
            self.gos._journal.append(bytes(typed))
            if self._get(SC_SAVER_ON):  # a key ends the screensaver, like any other
                self._set(SC_SAVER_ON, 0)
                self.redraw()
            self.write(self.gos._line_discipline(bytes(typed), self.tty))
        return True

    # -- the screensaver: the whole screen redrawn, frame after frame -------------------

    @property
    def saver_on(self) -> bool:
        return bool(self._get(SC_SAVER_ON))

    def start_saver(self, uncapped: bool = False) -> None:
        """Uncapped: a new frame as soon as the last is drawn (the bench's RFB load)."""
        self._set(SC_SAVER_ON, 2 if uncapped else 1)

    @property
    def saver_period(self) -> float:
        """Seconds from one screensaver frame to the next (0: no cap)."""
        return 0.0 if self._get(SC_SAVER_ON) == 2 else 1 / SAVER_FPS

    def saver_step(self) -> None:
        """One frame: every pixel changes (the paper's VNC throughput workload)."""
        n = self._get(SC_SAVER) + 1
        self._set(SC_SAVER, n)
        y = np.arange(HEIGHT, dtype=np.uint32)[:, None]
        x = np.arange(WIDTH, dtype=np.uint32)[None, :]
        frame = np.empty((HEIGHT, WIDTH, 4), dtype=np.uint8)
        frame[:, :, 0] = (x + n * 3) & 0xFF
        frame[:, :, 1] = (y + n * 5) & 0xFF
        frame[:, :, 2] = ((x ^ y) + n * 7) & 0xFF
        frame[:, :, 3] = 0
        self.mem.write(self.fb_offset(), frame.tobytes())
        self.announce(0, 0, WIDTH, HEIGHT)

    def redraw(self) -> None:
        chars = self.mem.read(self.screen + SC_CHARS, COLS * ROWS)
        self.render(chars, 0, ROWS - 1)
        self.announce(0, 0, WIDTH, HEIGHT)

    # -- the screen ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Put terminal output on the screen and render the rows it touched."""
        row, col = self._get(SC_ROW), self._get(SC_COL)
        chars = bytearray(self.mem.read(self.screen + SC_CHARS, COLS * ROWS))
        lo, hi, scrolled = row, row, False
        for b in data:
            if b == 13:
                col = 0
            elif b == 10:
                row += 1
            elif b == 8:
                col = max(0, col - 1)
            elif 32 <= b < 127:
                if col >= COLS:
                    col, row = 0, row + 1
                if row >= ROWS:
                    chars[:] = chars[COLS:] + bytes(COLS)
                    row, scrolled = ROWS - 1, True
                chars[row * COLS + col] = b
                col += 1
            if row >= ROWS:
                chars[:] = chars[COLS:] + bytes(COLS)
                row, scrolled = ROWS - 1, True
            lo, hi = min(lo, row), max(hi, row)
        self.mem.write(self.screen + SC_CHARS, bytes(chars))
        self._set(SC_ROW, row)
        self._set(SC_COL, col)
        if scrolled:
            lo, hi = 0, ROWS - 1
        self.render(chars, lo, hi)
        self.announce(0, lo * CELL_H, WIDTH, (hi - lo + 1) * CELL_H)

    def render(self, chars: bytes, lo: int, hi: int) -> None:
        base = self.fb_offset()
        for r in range(lo, hi + 1):
            cells = [np.frombuffer(glyph(c), dtype=np.uint8).reshape(CELL_H, CELL_W * 4)
                     for c in chars[r * COLS:(r + 1) * COLS]]
            band = np.concatenate(cells, axis=1)  # CELL_H rows of LINE bytes
            self.mem.write(base + r * CELL_H * LINE, band.tobytes())

    def announce(self, x: int, y: int, w: int, h: int) -> None:
        """Tell Domain R which rectangle changed (dropped if its ring is full: the
        backend then rereads everything on its next full update)."""
        ev.put(self.fb, ev.FB_OUT, [ev.update_event(x, y, w, h)], peer="Domain R")

    def pixels(self) -> bytes:
        """The whole framebuffer (tests compare it with what a VNC viewer got)."""
        return self.mem.read(self.fb_offset(), WIDTH * HEIGHT * 4)

    def text(self) -> list[str]:
        chars = self.mem.read(self.screen + SC_CHARS, COLS * ROWS)
        return [chars[r * COLS:(r + 1) * COLS].replace(b"\0", b" ").decode().rstrip()
                for r in range(ROWS)]
