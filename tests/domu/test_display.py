"""The guest's framebuffer terminal: keymap, screen, update events, screensaver."""

from __future__ import annotations

import mmap

from keeper.domu.display import COLS, HEIGHT, WIDTH
from keeper.domu.guestos import GuestOS
from keeper.domu.memory import GuestMemory
from keeper.xen import events as ev
from keeper.xen.console import RawPage

KEY = {"e": 18, "c": 46, "h": 35, "o": 24, " ": 57, "1": 2, "\r": 28}


def boot() -> tuple[mmap.mmap, GuestOS]:
    m = mmap.mmap(-1, 8 << 20)
    return m, GuestOS.boot(GuestMemory(m, mmap.mmap(-1, 2048)))


def press(m: mmap.mmap, g: GuestOS, text: str, shift: bool = False) -> None:
    assert g.display is not None
    kbd = RawPage(m, g.display.kbd_pfn * 4096)
    events = []
    for ch in text:
        if shift:
            events.append(ev.key_event(42, True))
        events += [ev.key_event(KEY[ch], True), ev.key_event(KEY[ch], False)]
        if shift:
            events.append(ev.key_event(42, False))
    assert ev.put(kbd, ev.KBD_IN, events, peer="t") == len(events)
    g.display.service_keyboard()


def test_keys_reach_the_shell_and_the_screen_and_the_journal() -> None:
    m, g = boot()
    assert g.display is not None
    fb = RawPage(m, g.display.fb_pfn * 4096)
    ev.take(fb, ev.FB_OUT, peer="t")  # the boot screen
    press(m, g, "echo ")
    press(m, g, "1", shift=True)  # shift+1 is "!"
    press(m, g, "\r")
    text = g.display.text()
    assert text[0] == "guest1:~$ echo !" and text[1] == "!" and text[2] == "guest1:~$"
    assert g.journal().endswith(b"echo !\r")
    updates = [ev.parse_update(e) for e in ev.take(fb, ev.FB_OUT, peer="t")]
    assert updates and all(u is not None and u[2] == WIDTH for u in updates)
    # the prompt row holds drawn pixels, the bottom row is still black
    pixels = g.display.pixels()
    assert any(pixels[: WIDTH * 4 * 16])
    assert not any(pixels[-WIDTH * 4 * 16:])


def test_the_screen_survives_a_memory_copy() -> None:
    m, g = boot()
    press(m, g, "echo ")
    copy = mmap.mmap(-1, len(m))
    copy[:] = m[:]
    g2 = GuestOS.attach(GuestMemory(copy, mmap.mmap(-1, 2048)))
    press(copy, g2, "1", shift=True)
    assert g2.display is not None and g2.display.text()[0] == "guest1:~$ echo !"


def test_screensaver_redraws_everything_until_a_key() -> None:
    m, g = boot()
    assert g.display is not None
    for ch in "screensaver\r":
        key = {"s": 31, "c": 46, "r": 19, "e": 18, "n": 49, "a": 30, "v": 47, "\r": 28}[ch]
        kbd = RawPage(m, g.display.kbd_pfn * 4096)
        ev.put(kbd, ev.KBD_IN, [ev.key_event(key, True), ev.key_event(key, False)], peer="t")
        g.display.service_keyboard()
    assert g.display.saver_on
    before = g.display.pixels()
    g.display.saver_step()
    after = g.display.pixels()
    assert before != after and len(after) == WIDTH * HEIGHT * 4
    press(m, g, " ")
    assert not g.display.saver_on
    assert len(g.display.text()[0]) <= COLS


def test_a_target_guest_process_warms_every_printable_glyph() -> None:
    """keeper domu run --resume renders the font's cells while it waits for `go`, so
    its first rows on the target cost no more than later ones."""
    from keeper.domu import display

    display.glyph.cache_clear()
    display.warm_glyphs()
    assert display.glyph.cache_info().currsize == 127 - 32
    before = display.glyph.cache_info().misses
    for ch in b"guest1:~$ echo hello":
        display.glyph(ch)
    assert display.glyph.cache_info().misses == before  # nothing left to render
