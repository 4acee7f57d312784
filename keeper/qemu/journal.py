"""The guest's input journal: what the guest kernel received, in order (its truth).

`keeper-guest` (guest/keeper-guest.c) writes one line per record to ttyS1, which QEMU
writes to a file in the machine's run directory:

    B <kernel release>\\n     the journal is live (once per boot): input from here on
                             is recorded; serial input that came earlier was
                             discarded, never passed on (send only after B)
    S <hex>\\n                bytes the serial console ttyS0 delivered (lower-case hex)
    K <code> <value>\\n       a key event: Linux keycode, value 1 press, 0 release,
                             2 autorepeat
    D\\n                      the guest kernel dropped key events here (its evdev
                             buffer overflowed before keeper-guest read it)

After a migration the journal is the concatenation of each QEMU process's file in
migration order; a record may be split across two files (the guest was stopped
mid-write), so files are joined before they are parsed. The last line may be cut
short (the guest may be mid-write): it is ignored. Any other malformed line raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from keeper.errors import KeeperError


class JournalError(KeeperError):
    """A complete journal line that is not a record: the guest or the file is broken."""


@dataclasses.dataclass(frozen=True)
class Boot:
    release: str


@dataclasses.dataclass(frozen=True)
class SerialIn:
    data: bytes


@dataclasses.dataclass(frozen=True)
class Key:
    code: int  # Linux input keycode (KEY_A = 30)
    value: int  # 1 press, 0 release, 2 autorepeat

    @property
    def down(self) -> bool:
        return self.value in (1, 2)


@dataclasses.dataclass(frozen=True)
class Dropped:
    """Key events the guest kernel dropped: which keys are held is unknown from here."""


Record = Boot | SerialIn | Key | Dropped


def parse(data: bytes) -> list[Record]:
    """Records of a whole journal (files already joined); drops an unfinished last line."""
    lines = data.split(b"\n")
    records: list[Record] = []
    for number, line in enumerate(lines[:-1], start=1):
        records.append(_record(line, number))
    return records


def _record(line: bytes, number: int) -> Record:
    kind, _, rest = line.partition(b" ")
    try:
        if kind == b"S":
            return SerialIn(bytes.fromhex(rest.decode("ascii")))
        if kind == b"K":
            code, value = rest.split(b" ")
            return Key(int(code), int(value))
        if kind == b"B" and rest:
            return Boot(rest.decode("ascii"))
        if kind == b"D" and not rest:
            return Dropped()
    except (ValueError, UnicodeDecodeError):
        pass
    raise JournalError(f"journal line {number}: not a record: {line[:80]!r}")


def read(*paths: Path | str) -> list[Record]:
    """The records of one journal file, or of several in migration order."""
    return parse(b"".join(Path(p).read_bytes() if Path(p).exists() else b"" for p in paths))


def serial_bytes(records: Iterable[Record]) -> bytes:
    """Every byte the serial console delivered, in order."""
    return b"".join(r.data for r in records if isinstance(r, SerialIn))


def key_events(records: Iterable[Record]) -> list[Key]:
    return [r for r in records if isinstance(r, Key)]


def kernel_release(records: Iterable[Record]) -> str | None:
    """The release the guest reported at its last boot (None: not booted yet)."""
    release = None
    for r in records:
        if isinstance(r, Boot):
            release = r.release
    return release


# ---- US keyboard layout ------------------------------------------------------------

KEY_LEFTSHIFT, KEY_RIGHTSHIFT = 42, 54
KEY_LEFTCTRL, KEY_RIGHTCTRL = 29, 97
SHIFTS = {KEY_LEFTSHIFT, KEY_RIGHTSHIFT}
CTRLS = {KEY_LEFTCTRL, KEY_RIGHTCTRL}


@dataclasses.dataclass(frozen=True)
class KeyCap:
    code: int  # Linux keycode
    qcode: str  # QEMU's name for it (QMP send-key)
    plain: str
    shifted: str


def _caps() -> tuple[KeyCap, ...]:
    rows = [
        # code, qcode, plain, shifted
        (2, "1", "1", "!"), (3, "2", "2", "@"), (4, "3", "3", "#"), (5, "4", "4", "$"),
        (6, "5", "5", "%"), (7, "6", "6", "^"), (8, "7", "7", "&"), (9, "8", "8", "*"),
        (10, "9", "9", "("), (11, "0", "0", ")"), (12, "minus", "-", "_"),
        (13, "equal", "=", "+"), (14, "backspace", "\x7f", "\x7f"), (15, "tab", "\t", "\t"),
        (26, "bracket_left", "[", "{"), (27, "bracket_right", "]", "}"),
        (28, "ret", "\n", "\n"), (1, "esc", "\x1b", "\x1b"),
        (39, "semicolon", ";", ":"), (40, "apostrophe", "'", '"'),
        (41, "grave_accent", "`", "~"), (43, "backslash", "\\", "|"),
        (51, "comma", ",", "<"), (52, "dot", ".", ">"), (53, "slash", "/", "?"),
        (57, "spc", " ", " "),
    ]
    letters = {16: "qwertyuiop", 30: "asdfghjkl", 44: "zxcvbnm"}
    for first, row in letters.items():
        rows += [(first + i, ch, ch, ch.upper()) for i, ch in enumerate(row)]
    return tuple(KeyCap(*r) for r in rows)


KEYMAP_US: dict[int, KeyCap] = {cap.code: cap for cap in _caps()}
_BY_CHAR: dict[str, tuple[KeyCap, bool]] = {}
for _cap in KEYMAP_US.values():
    _BY_CHAR.setdefault(_cap.shifted, (_cap, True))
    _BY_CHAR[_cap.plain] = (_cap, False)


def typed_text(records: Iterable[Record]) -> str:
    """The text the key presses type on a US layout, as the guest's console saw it.

    Shift is whether a shift key is held; Ctrl+letter gives the control character;
    Enter is "\\n"; autorepeat types again. Keys without a character are skipped;
    after a `Dropped` record no key counts as held.
    """
    return "".join(ch for ch in _typed(records) if isinstance(ch, str))


def input_stream(records: Iterable[Record], *, enter: str = "\r") -> bytes:
    """Everything the guest received, in order, as bytes: the serial console's bytes
    as they came, and the keyboard's keys as the characters they type (Enter as
    `enter`, a terminal's carriage return by default) — the same shape as the
    simulated guest's journal, so one comparison serves both."""
    out = bytearray()
    for item in _typed(records, serial=True):
        if isinstance(item, bytes):
            out += item
        else:
            out += (enter if item == "\n" else item).encode("latin-1")
    return bytes(out)


def _typed(records: Iterable[Record], *, serial: bool = False) -> Iterable[str | bytes]:
    held: set[int] = set()
    for ev in records:
        if isinstance(ev, SerialIn):
            if serial:
                yield ev.data
            continue
        if isinstance(ev, Dropped):
            held.clear()  # a release may be among the lost events
            continue
        if not isinstance(ev, Key):
            continue
        if ev.value == 0:
            held.discard(ev.code)
            continue
        held.add(ev.code)
        cap = KEYMAP_US.get(ev.code)
        if cap is None:
            continue
        ch = cap.shifted if held & SHIFTS else cap.plain
        if held & CTRLS and ch.isalpha():
            ch = chr(ord(ch.lower()) & 0x1F)
        yield ch


def qcodes_for(text: str) -> list[tuple[str, ...]]:
    """QMP send-key chords that type `text` on a US layout (the inverse of typed_text)."""
    chords: list[tuple[str, ...]] = []
    for ch in text:
        try:
            cap, shift = _BY_CHAR[ch]
        except KeyError:
            raise ValueError(f"no US key types {ch!r}") from None
        chords.append(("shift", cap.qcode) if shift else (cap.qcode,))
    return chords


def format_records(records: Sequence[Record]) -> bytes:
    """The journal text for `records` (what keeper-guest writes), for tests and tools."""
    out = bytearray()
    for r in records:
        if isinstance(r, Boot):
            out += f"B {r.release}\n".encode()
        elif isinstance(r, SerialIn):
            out += b"S " + r.data.hex().encode() + b"\n"
        elif isinstance(r, Dropped):
            out += b"D\n"
        else:
            out += f"K {r.code} {r.value}\n".encode()
    return bytes(out)
