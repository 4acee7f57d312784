"""The console OS of a simulated Domain U: console frontend, line discipline, shell.

Its whole state lives in guest memory (`keeper.domu.layout`): the superblock, the
console ring, the console state page (line buffer, line-discipline state, pending
output), the input journal and the vCPU record. A `GuestOS` object holds nothing
but the memory and the region map, so `GuestOS.attach` on a copy of the memory -
which is what live migration delivers - continues exactly where the original
stopped, mid-line included. The guest is paused only between calls (each call is
one "instruction" of the vCPU); inside a call it may keep locals.

Driving it (the guest process's event loop, no I/O here):

1. first start: `GuestOS.boot(mem)`; after a move: `GuestOS.attach(mem)`;
2. bind the console event channel, then `set_console_port(port)`;
3. on each console upcall: `if os.service_console(): notify Domain R`;
4. between upcalls, optionally `dirty_workload(n)` to play a memory-writing workload.

Flow control: input is consumed only while the pending-output queue is empty, at
most `CHUNK` bytes and never past one line end per step. So a step's output is
bounded and fits in the pending queue even if `out` is full, and a Domain R that
stops reading `out` stalls the guest's input (it stays in `in`, then in Domain R)
instead of losing output.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Callable

from keeper.domu.display import Display
from keeper.domu.layout import (
    DEFAULT_JOURNAL_PAGES,
    LINE_CAP,
    PENDING_CAP,
    ConsoleState,
    Journal,
    Layout,
    Superblock,
    format_fs,
    read_fs,
)
from keeper.domu.memory import PAGE, GuestMemory
from keeper.errors import CheckpointError
from keeper.xen.console import (
    PageIO,
    frontend_peek_input,
    frontend_put_output,
    frontend_take_input,
    init_ring,
)

OS_NAME = "Keeper"
OS_RELEASE = "1.0-keeper"
OS_BUILD = "#1 keeper-domu"
MACHINE = "x86_64"
HOME = "/root"
CHUNK = 256  # max input bytes handled per step (bounds the output of a step)
JOURNAL_TAIL = 200  # bytes the `journal` command shows
JOB_CHUNK = 1800  # output of one job step: well inside the pending queue

_LINE_END = re.compile(rb"[\r\n\x03]")


class Ldisc(enum.IntEnum):
    """Line-discipline state, stored in the console state page."""

    NORMAL = 0
    AFTER_CR = 1  # a LF now is the second half of CRLF


class Byte(enum.Enum):
    PRINT = "print"
    ERASE = "erase"  # DEL or BS
    INTR = "intr"  # Ctrl-C
    CR = "cr"
    LF = "lf"
    CTRL = "ctrl"  # any other control byte: journaled, ignored


class Act(enum.Enum):
    APPEND = "append"
    ERASE = "erase"
    INTR = "intr"
    EOL = "eol"
    IGNORE = "ignore"


def _classify(b: int) -> Byte:
    if b in (0x7F, 0x08):
        return Byte.ERASE
    if b == 0x03:
        return Byte.INTR
    if b == 0x0D:
        return Byte.CR
    if b == 0x0A:
        return Byte.LF
    if b < 0x20:
        return Byte.CTRL
    return Byte.PRINT  # 0x20..0x7e and 0x80..0xff (UTF-8 text passes through)


_CLASS: list[Byte] = [_classify(b) for b in range(256)]

_NORMAL_ROW: dict[Byte, tuple[Act, Ldisc]] = {
    Byte.PRINT: (Act.APPEND, Ldisc.NORMAL),
    Byte.ERASE: (Act.ERASE, Ldisc.NORMAL),
    Byte.INTR: (Act.INTR, Ldisc.NORMAL),
    Byte.CR: (Act.EOL, Ldisc.AFTER_CR),
    Byte.LF: (Act.EOL, Ldisc.NORMAL),
    Byte.CTRL: (Act.IGNORE, Ldisc.NORMAL),
}
# The whole line discipline: (state, byte class) -> (action, next state).
TRANSITIONS: dict[tuple[Ldisc, Byte], tuple[Act, Ldisc]] = {
    **{(Ldisc.NORMAL, c): t for c, t in _NORMAL_ROW.items()},
    **{(Ldisc.AFTER_CR, c): t for c, t in _NORMAL_ROW.items()},
    (Ldisc.AFTER_CR, Byte.LF): (Act.IGNORE, Ldisc.NORMAL),  # CRLF is one line end
}


def default_files(hostname: str) -> dict[str, bytes]:
    """The read-only file system a fresh guest boots with."""
    return {
        "/etc/hostname": f"{hostname}\n".encode(),
        "/etc/motd": (
            f"Welcome to {hostname}, a keeper Domain U.\n"
            "It has no network: this console, served by its Domain R, is the way in.\n"
        ).encode(),
        "/etc/os-release": (
            f'NAME="{OS_NAME} guest OS"\nVERSION="{OS_RELEASE}"\nID=keeper\n'
        ).encode(),
        "/proc/version": f"{OS_NAME} version {OS_RELEASE} (keeper@domu) {OS_BUILD}\n".encode(),
        f"{HOME}/README": (
            b"This guest is a simulated Xen Domain U. Everything it is lives in its\n"
            b"physical memory: the console ring shared with Domain R, the line you are\n"
            b"typing, output not yet delivered, and an input journal of every byte the\n"
            b"console received, in order. Live migration copies that memory to another\n"
            b"host and the guest carries on mid-line; Domain R, which serves this\n"
            b"console to you, moves with it, so your connection stays up.\n"
            b"\n"
            b"Try: help, ls /, cat /etc/motd, uname -a, journal.\n"
        ),
    }


class GuestOS:
    """The guest kernel + shell over one `GuestMemory`; all state is in that memory."""

    def __init__(self, mem: GuestMemory, layout: Layout) -> None:
        """Use `boot` or `attach`; this only binds views."""
        self.mem = mem
        self.layout = layout
        self._sb = Superblock(mem)
        self._state = ConsoleState(mem, layout.state_pfn)
        self._journal = Journal(mem, layout.journal_pfn, layout.journal_pages)
        self._ring = mem.page(layout.ring_pfn)
        self._cur = self._state  # the terminal whose line is being run
        self.display = Display(self) if layout.dev_pages else None

    # -- life cycle ----------------------------------------------------------------

    @classmethod
    def boot(
        cls, mem: GuestMemory, *, hostname: str = "guest1", journal_pages: int | None = None
    ) -> GuestOS:
        """Format the metadata regions, initialise the console ring, print the banner.

        Writes only pages below the workload region. Booting memory that already holds
        a keeper guest is a reboot: boot_count and ring_init_count go up by one.
        """
        prev_boots = prev_inits = 0
        try:
            old = Layout.load(mem)
        except CheckpointError:
            old = None
        if old is not None:
            sb = Superblock(mem)
            prev_boots, prev_inits = sb.boot_count, sb.ring_init_count
            if journal_pages is None:
                journal_pages = old.journal_pages
        if journal_pages is None:
            journal_pages = DEFAULT_JOURNAL_PAGES
        layout = Layout.plan(mem.pages, journal_pages)
        self = cls(mem, layout)
        self._sb.hostname = hostname  # validates before anything else is written
        layout.store(mem)
        sb = self._sb
        sb.console_port = 0
        sb.boot_count = prev_boots + 1
        sb.workload_cursor = 0
        sb.ticks = 0
        sb.console_events = 0
        self._state.format()
        self._journal.format()
        format_fs(mem, layout.fs_pfn, layout.fs_pages, default_files(hostname))
        init_ring(self._ring)
        sb.ring_init_count = prev_inits + 1
        if self.display is not None:
            self.display.boot()
        motd = self._files().get("/etc/motd", b"")
        self._emit(_crlf(b"\n" + motd + b"\n") + self._prompt())
        return self

    @classmethod
    def attach(cls, mem: GuestMemory) -> GuestOS:
        """Resume a guest from its memory (after a move): validate, write nothing."""
        layout = Layout.load(mem)
        self = cls(mem, layout)
        self._state.validate()
        return self

    # -- console -------------------------------------------------------------------

    def console(self) -> PageIO:
        """The console ring page, as the guest sees it (its writes are logged dirty)."""
        return self._ring

    @property
    def console_pfn(self) -> int:
        """The ring page's pfn: what the frontend publishes as console/ring-ref."""
        return self.layout.ring_pfn

    @property
    def console_port(self) -> int:
        return self._sb.console_port

    def set_console_port(self, port: int) -> None:
        if not 0 <= port < 1 << 32:
            raise ValueError(f"event-channel port out of range: {port}")
        self._sb.console_port = port

    def service_console(self, limit: int | None = None) -> bool:
        """Handle one console upcall; True if anything moved (then notify Domain R).

        Order: retry the pending output first; then, while it stays empty, take a step
        of input (<= CHUNK bytes, up to and including the first line end), journal it,
        run it through the line discipline and the shell, and queue its output.
        """
        progress = self._emit(b"")
        budget = limit
        while budget is None or budget > 0:
            if self._state.pending_len:
                break  # Domain R must drain `out` first
            if self._state.job:
                if self._interrupt_job():
                    progress = True
                    continue
                self._emit(self._job_step())
                progress = True
                continue
            want = CHUNK if budget is None else min(CHUNK, budget)
            peek = frontend_peek_input(self._ring, want)
            if not peek:
                break
            end = _LINE_END.search(peek)
            data = frontend_take_input(self._ring, end.end() if end else len(peek))
            self._journal.append(data)
            self._emit(self._line_discipline(data))
            progress = True
            if budget is not None:
                budget -= len(data)
        self._sb.console_events += 1
        return progress

    def _emit(self, data: bytes) -> bool:
        """Queue output behind the pending queue; True if any byte entered `out`."""
        pending = self._state.pending
        if not data and not pending:
            return False
        data = pending + data
        n = frontend_put_output(self._ring, data)
        rest = data[n:]
        if len(rest) > PENDING_CAP:  # drop the oldest output, never input
            self._state.dropped += len(rest) - PENDING_CAP
            rest = rest[-PENDING_CAP:]
        if rest != pending:
            self._state.pending = rest
        return n > 0

    def _line_discipline(self, data: bytes, st: ConsoleState | None = None) -> bytes:
        """Run `data` through a terminal's line discipline (the console's unless `st`
        names another terminal's state); return what to print."""
        st = st or self._state
        self._cur = st
        before = st.line
        line = bytearray(before)
        state = Ldisc(st.ldisc)
        out = bytearray()
        for b in data:
            act, state = TRANSITIONS[state, _CLASS[b]]
            if act is Act.APPEND:
                if len(line) < LINE_CAP:  # past the cap: journaled, not echoed
                    line.append(b)
                    out.append(b)
            elif act is Act.ERASE:
                if line:
                    _erase_char(line)
                    out += b"\b \b"
            elif act is Act.INTR:
                line.clear()
                out += b"^C\r\n" + self._prompt()
            elif act is Act.EOL:
                out += b"\r\n" + _crlf(self.run_command(bytes(line)))
                if not st.job:  # a job prints the prompt when it ends
                    out += self._prompt()
                line.clear()
        if line != before:
            st.line_len = 0  # the new bytes are stored before the length grows
            st.line_append(bytes(line))
        if state != st.ldisc:
            st.ldisc = state
        return bytes(out)

    def _job_step(self) -> bytes:
        """The next piece of a running job's output (bounded, fits the pending queue)."""
        st = self._state
        n, last = st.job_next, st.job_last
        out = bytearray()
        while n <= last and len(out) < JOB_CHUNK:
            out += b"%d\r\n" % n
            n += 1
        st.job_next = n
        if n > last:
            st.job = 0
            out += self._prompt()
        return bytes(out)

    def _interrupt_job(self) -> bool:
        """Ctrl-C stops a running job; other input waits until it ends."""
        peek = frontend_peek_input(self._ring, CHUNK)
        cut = peek.find(b"\x03")
        if cut < 0:
            return False
        data = frontend_take_input(self._ring, cut + 1)
        self._journal.append(data)
        self._state.job = 0
        self._emit(b"^C\r\n" + self._prompt())
        return True

    def _cmd_screensaver(self, args: list[bytes]) -> bytes:
        if self.display is None or self._cur is not self.display.tty:
            return b"screensaver: only on the framebuffer terminal\n"
        self.display.start_saver(uncapped=args[:1] == [b"uncapped"])
        return b""

    def _cmd_seq(self, args: list[bytes]) -> bytes:
        if self._cur is not self._state:
            return b"seq: only on the serial console\n"
        try:
            nums = [int(a) for a in args]
        except ValueError:
            return b"seq: not a number\n"
        if len(nums) == 1:
            first, last = 1, nums[0]
        elif len(nums) == 2:
            first, last = nums
        else:
            return b"usage: seq [FIRST] LAST\n"
        if not 0 <= first <= last < 1 << 62:
            return b""
        st = self._state
        st.job_next, st.job_last = first, last
        st.job = 1
        return b""

    def _prompt(self) -> bytes:
        return f"{self._sb.hostname}:~$ ".encode()

    # -- the shell -----------------------------------------------------------------

    def run_command(self, line: bytes) -> bytes:
        """Run one shell line; return its output with "\\n" line ends."""
        argv = line.split()
        if not argv or argv[0].startswith(b"#"):  # a comment: nothing to do
            return b""
        name, args = argv[0], argv[1:]
        handler = _COMMANDS.get(name)
        if handler is None:
            return name + b": command not found\n"
        return handler(self, args)

    def _files(self) -> dict[str, bytes]:
        return read_fs(self.mem, self.layout.fs_pfn, self.layout.fs_pages)

    def _cmd_help(self, args: list[bytes]) -> bytes:
        rows = [f"  {name.decode():<9}{text}" for name, (_, text) in _COMMAND_TABLE.items()]
        return ("commands:\n" + "\n".join(rows) + "\n").encode()

    def _cmd_echo(self, args: list[bytes]) -> bytes:
        return b" ".join(args) + b"\n"

    def _cmd_cat(self, args: list[bytes]) -> bytes:
        if not args:
            return b"cat: missing file operand\n"
        files, out = self._files(), bytearray()
        for arg in args:
            path = _resolve(arg)
            if path in files:
                out += files[path]
            elif _children(files, path):
                out += b"cat: " + arg + b": Is a directory\n"
            else:
                out += b"cat: " + arg + b": No such file or directory\n"
        return bytes(out)

    def _cmd_ls(self, args: list[bytes]) -> bytes:
        files, out = self._files(), bytearray()
        for arg in args or [b"."]:
            path = _resolve(arg)
            if path in files:
                out += arg + b"\n"
            elif (names := _children(files, path)) or path == "/":
                out += "  ".join(names).encode() + b"\n"
            else:
                out += b"ls: cannot access '" + arg + b"': No such file or directory\n"
        return bytes(out)

    def _cmd_uname(self, args: list[bytes]) -> bytes:
        fields = {
            "s": OS_NAME,
            "n": self._sb.hostname,
            "r": OS_RELEASE,
            "v": OS_BUILD,
            "m": MACHINE,
        }
        wanted: list[str] = []
        for arg in args:
            if not arg.startswith(b"-") or len(arg) < 2:
                return b"uname: extra operand '" + arg + b"'\n"
            for flag in arg[1:].decode("latin-1"):
                if flag == "a":
                    wanted += list(fields)
                elif flag in fields:
                    wanted.append(flag)
                else:
                    return f"uname: invalid option -- '{flag}'\n".encode()
        chosen = [k for k in fields if k in wanted] or ["s"]
        return (" ".join(fields[k] for k in chosen) + "\n").encode()

    def _cmd_journal(self, args: list[bytes]) -> bytes:
        j = self._journal
        count, kept = j.count, j.kept()
        head = f"journal: {count} bytes received"
        if j.overflow:
            head += f", the first {kept} kept (journal full)"
        tail = j.read(max(kept - JOURNAL_TAIL, 0), kept)
        return f"{head}\nlast {len(tail)}: {_escape(tail)}\n".encode()

    def _cmd_hostname(self, args: list[bytes]) -> bytes:
        return f"{self._sb.hostname}\n".encode()

    def _cmd_clear(self, args: list[bytes]) -> bytes:
        return b"\x1b[H\x1b[2J"

    # -- journal, workload, introspection ------------------------------------------

    def journal(self) -> bytes:
        """Every input byte the console received, in order (the kept prefix if full)."""
        return self._journal.read()

    def journal_count(self) -> int:
        """How many input bytes the console received in total."""
        return self._journal.count

    def dirty_workload(self, pages: int) -> None:
        """One workload step: write the tick number into the next `pages` workload pages.

        Pages are taken cyclically from the workload region, from a cursor kept in the
        vCPU record, so successive steps sweep the region like a memory-bound program.
        """
        if pages < 0:
            raise ValueError("pages must be >= 0")
        lay, sb = self.layout, self._sb
        cursor, tick = sb.workload_cursor, sb.ticks + 1
        stamp = tick.to_bytes(8, "little")
        for i in range(pages):
            pfn = lay.workload_pfn + (cursor + i) % lay.workload_pages
            self.mem.write(pfn * PAGE, stamp + pfn.to_bytes(8, "little"))
        sb.workload_cursor = (cursor + pages) % lay.workload_pages
        sb.ticks = tick

    def info(self) -> dict[str, object]:
        """A plain-data snapshot for status output and tests."""
        sb, st, j = self._sb, self._state, self._journal
        return {
            "hostname": sb.hostname,
            "pages": self.layout.total_pages,
            "ring_pfn": self.layout.ring_pfn,
            "console_port": sb.console_port,
            "ring_init_count": sb.ring_init_count,
            "boot_count": sb.boot_count,
            "journal_count": j.count,
            "journal_overflow": bool(j.overflow),
            "pending_output": st.pending_len,
            "dropped_output": st.dropped,
            "line_len": st.line_len,
            "workload_cursor": sb.workload_cursor,
            "ticks": sb.ticks,
            "console_events": sb.console_events,
        }


_Command = Callable[[GuestOS, list[bytes]], bytes]
_COMMAND_TABLE: dict[bytes, tuple[_Command, str]] = {
    b"help": (GuestOS._cmd_help, "this list"),
    b"echo": (GuestOS._cmd_echo, "print the arguments"),
    b"cat": (GuestOS._cmd_cat, "print files"),
    b"ls": (GuestOS._cmd_ls, "list a directory"),
    b"uname": (GuestOS._cmd_uname, "system name [-a -s -n -r -v -m]"),
    b"hostname": (GuestOS._cmd_hostname, "this guest's name"),
    b"journal": (GuestOS._cmd_journal, "bytes the console received, and the last few"),
    b"clear": (GuestOS._cmd_clear, "clear the screen"),
    b"seq": (GuestOS._cmd_seq, "print numbers FIRST..LAST, one a line (Ctrl-C stops)"),
    b"screensaver": (GuestOS._cmd_screensaver,
                       "redraw the whole screen until a key (50/s; `uncapped`: no cap)"),
}
_COMMANDS: dict[bytes, _Command] = {name: fn for name, (fn, _) in _COMMAND_TABLE.items()}


def _crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


def _escape(data: bytes) -> str:
    """repr-style escapes without the b'' around them."""
    return repr(data)[2:-1]


def _erase_char(line: bytearray) -> None:
    """Remove the last character, all of it if it is a UTF-8 multi-byte one."""
    while len(line) > 1 and 0x80 <= line[-1] < 0xC0 and line[-2] >= 0x80:
        line.pop()
    line.pop()


def _resolve(arg: bytes) -> str:
    path = arg.decode("utf-8", "surrogateescape")
    if path == "~" or path.startswith("~/"):
        path = HOME + path[1:]
    return posixpath.normpath(posixpath.join(HOME, path))


def _children(files: dict[str, bytes], path: str) -> list[str]:
    """Sorted names directly under directory `path` (empty if it is no directory)."""
    prefix = path.rstrip("/") + "/"
    names = {p[len(prefix) :].split("/", 1)[0] for p in files if p.startswith(prefix)}
    return sorted(names)
