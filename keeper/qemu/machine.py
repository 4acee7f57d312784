"""One QEMU process running keeper's guest image, controlled over QMP (`qemu.qmp`).

Modelled on QEMU's own `python/qemu/machine/machine.py`: the process is our child,
QMP is a Unix socket, events are awaited with timeouts, and the process is always
reaped and its sockets removed, whichever way we leave.

Files, in the machine's run directory (0700; sockets 0600, QEMU runs with umask 077):

    qmp.sock     QMP (QEMU listens; one client at a time, so a restarted agent can
                 reconnect)
    serial.sock  the serial console, ttyS0 (QEMU's chardev server)
    vnc.sock     QEMU's VNC server (screen + keyboard: VGA text console, tty1)
    journal      the guest's input journal, written by the guest on ttyS1 (`journal`);
                 QEMU truncates it at start: one file per QEMU process
    qemu.log     QEMU's stdout and stderr

With `tcp_consoles` (the conventional baseline) the serial console and the VNC server
listen on a host address instead, as libvirt and OpenStack configure them.

Call order: ``await m.start()`` (returns once QMP is connected), QMP helpers, then
``await m.close()``, which is idempotent: quit over QMP with a short deadline, else
SIGTERM, else SIGKILL; reap; remove the sockets; keep the journal and log unless
told. A finalizer (also run at interpreter exit) kills a machine nobody closed, and
QEMU is started with PR_SET_PDEATHSIG (util-linux `setpriv`, which execs QEMU in
place, so the PID stays QEMU's) so it dies with this process even on SIGKILL.

Migration, source and target (DESIGN.md §8): both `set_capabilities()`; the target
was started with ``incoming=True`` (``-incoming defer -S``) and gets
`migrate_incoming(uri)`; the source `migrate(uri)`, `wait_migration("pre-switchover")`,
`migrate_continue()`, `wait_migration("completed")`; then `cont()` on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError
from qemu.qmp import ExecuteError as QMPExecuteError

from keeper.errors import KeeperError, MigrationError
from keeper.net import netns as _netns
from keeper.qemu import journal
from keeper.qemu.image import GuestImage

LOG = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
RUN_BASE = Path("/run/keeper-qemu")
ACCELS = ("kvm", "tcg")
# Unix socket paths are limited to sizeof(sun_path) - 1.
SUN_PATH_MAX = 107
MIGRATION_DONE = ("completed", "failed", "cancelled")
MIGRATION_FAILED = ("failed", "cancelled")


class QemuError(KeeperError):
    """QEMU would not start, exited, or refused a QMP command (`error_class` says how)."""

    def __init__(self, message: str, *, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclasses.dataclass(frozen=True)
class TcpConsoles:
    """The baseline: QEMU's VNC server and serial console on a host address (TCP)."""

    host: str
    vnc_display: int  # VNC listens on port 5900 + display
    serial_port: int

    @property
    def vnc_port(self) -> int:
        return 5900 + self.vnc_display


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where one machine's files are; `serial`/`vnc` are None on TCP consoles."""

    dir: Path
    qmp: Path
    serial: Path | None
    vnc: Path | None
    journal: Path
    log: Path

    @classmethod
    def under(cls, run_dir: Path, *, unix_consoles: bool = True) -> RunPaths:
        return cls(
            dir=run_dir, qmp=run_dir / "qmp.sock",
            serial=run_dir / "serial.sock" if unix_consoles else None,
            vnc=run_dir / "vnc.sock" if unix_consoles else None,
            journal=run_dir / "journal", log=run_dir / "qemu.log",
        )

    def sockets(self) -> list[Path]:
        return [p for p in (self.qmp, self.serial, self.vnc) if p is not None]


class QemuMachine:
    """A QEMU process (child of this one, in the caller's network namespace or `netns`).

    `accel` None probes once (`probe_accel`); `incoming` starts the target of a
    migration (``-incoming defer -S``); `paused` only adds ``-S``.
    """

    def __init__(
        self,
        image: GuestImage,
        *,
        name: str = "guest",
        run_dir: Path | None = None,
        memory_mb: int = 256,
        accel: str | None = None,
        incoming: bool = False,
        paused: bool = False,
        tcp_consoles: TcpConsoles | None = None,
        netns: str | None = None,
        qemu: str = QEMU,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        if accel is not None and accel not in ACCELS:
            raise ValueError(f"accel must be one of {ACCELS}, not {accel!r}")
        # both go into QEMU's comma-separated options unquoted
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"machine name {name!r}: letters, digits, . _ - only")
        if run_dir is not None and "," in str(run_dir):
            raise ValueError(f"run_dir {run_dir}: no commas (QEMU option syntax)")
        self.image = image
        self.name = name
        self.memory_mb = memory_mb
        self.incoming = incoming
        self.paused = paused or incoming
        self.tcp_consoles = tcp_consoles
        self.netns = netns
        self.qemu = qemu
        self.extra_args = tuple(extra_args)
        self.die_with_parent = die_with_parent
        self._accel = accel
        self._run_dir_given = run_dir
        self._made_run_dir = False
        self._paths: RunPaths | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None
        self._migration_events: EventListener | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    # ---- what the host agent reads ------------------------------------------------

    @property
    def paths(self) -> RunPaths:
        if self._paths is None:
            raise QemuError(f"{self.name}: not started")
        return self._paths

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def accel(self) -> str | None:
        return self._accel

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        """QEMU's command line (without the `setpriv` prefix)."""
        if self._accel is None:
            raise QemuError(f"{self.name}: accelerator not chosen yet")
        p = self.paths
        img = self.image
        args = [
            self.qemu, "-name", f"{self.name},process=keeper-qemu-{self.name}",
            "-nodefaults", "-no-user-config", "-machine", "pc", "-smp", "1",
            "-m", str(self.memory_mb), "-accel", self._accel,
            *(["-cpu", "host"] if self._accel == "kvm" else []),
            "-display", "none", "-vga", "std", "-nic", "none",
            "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", img.cmdline,
            "-chardev", f"socket,id=qmp,path={p.qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        if self.tcp_consoles is None:
            assert p.serial is not None and p.vnc is not None
            args += ["-chardev", f"socket,id=serial0,path={p.serial},server=on,wait=off",
                     "-vnc", f"unix:{p.vnc}"]
        else:
            t = self.tcp_consoles
            args += ["-chardev", f"socket,id=serial0,host={t.host},port={t.serial_port},"
                                 "server=on,wait=off,telnet=off",
                     "-vnc", f"{t.host}:{t.vnc_display}"]
        # ttyS0 the console, ttyS1 the journal (a file: it outlives the process)
        args += ["-serial", "chardev:serial0",
                 "-chardev", f"file,id=journal,path={p.journal}", "-serial", "chardev:journal"]
        if self.paused:
            args.append("-S")
        if self.incoming:
            args += ["-incoming", "defer"]
        args += self.extra_args
        return args

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self, timeout: float = 20.0) -> None:
        """Launch QEMU and connect QMP; on any failure the process is gone again."""
        if self._proc is not None or self._closed:
            raise QemuError(f"{self.name}: start() once per machine")
        if self._accel is None:
            self._accel = await probe_accel(self.image, qemu=self.qemu)
        self._paths = RunPaths.under(self._make_run_dir(),
                                     unix_consoles=self.tcp_consoles is None)
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)
        try:
            self._spawn()
            await asyncio.wait_for(self._connect(), timeout)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise QemuError(f"{self.name}: QMP not up after {timeout:.0f} s") from exc
            raise

    def _make_run_dir(self) -> Path:
        if self._run_dir_given is not None:
            run_dir = Path(self._run_dir_given)
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            base = RUN_BASE if os.geteuid() == 0 else Path(tempfile.gettempdir()) / (
                f"keeper-qemu-{os.geteuid()}")
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            run_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
            self._made_run_dir = True
        os.chmod(run_dir, 0o700)
        longest = max(len(str(run_dir / n)) for n in ("serial.sock", "qmp.sock", "vnc.sock"))
        if longest > SUN_PATH_MAX:
            raise QemuError(f"{run_dir}: too long for Unix socket paths ({longest} > "
                            f"{SUN_PATH_MAX})")
        return run_dir

    def _spawn(self) -> None:
        argv = self.argv()
        if self.die_with_parent and (setpriv := shutil.which("setpriv")):
            # The signal comes when the *thread* that forked exits: we fork from the
            # event loop's thread, which lives as long as the loop.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        LOG.debug("%s: %s", self.name, " ".join(argv))
        with open(self.paths.log, "ab") as log:
            ctx = _netns.entered(self.netns) if self.netns else contextlib.nullcontext()
            with ctx:
                # umask 177: QEMU's sockets and files are 0600. A new session keeps
                # a terminal's ^C away from QEMU: we stop it, in order.
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    close_fds=True, start_new_session=True, umask=0o177,
                )
        self._finalizer = weakref.finalize(self, _kill_and_reap, self._proc,
                                           tuple(self.paths.sockets()))

    async def _connect(self) -> None:
        assert self._proc is not None
        qmp = QMPClient(self.name)
        while True:
            if self._proc.poll() is not None:
                raise QemuError(f"{self.name}: QEMU exited ({self._proc.returncode}) at start: "
                                f"{self.log_tail()}")
            if self.paths.qmp.exists():
                try:
                    await qmp.connect(str(self.paths.qmp))
                    break
                except ConnectError:
                    pass  # listening socket bound but not yet listening, or QEMU died
            await asyncio.sleep(0.02)
        self._qmp = qmp
        self._migration_events = EventListener("MIGRATION")
        qmp.register_listener(self._migration_events)

    async def close(self, *, keep_journal: bool = True, timeout: float = 3.0) -> None:
        """Stop QEMU and clean up; see the module docstring for the steps.

        Idempotent: QEMU is stopped once; a later call with ``keep_journal=False``
        still removes the journal, the log and a run directory we made.
        """
        if not self._closed:
            self._closed = True
            try:
                await self._stop_process(timeout)
            finally:
                # Always, even when cancelled: SIGKILL if still alive, reap, sockets gone.
                if self._finalizer is not None:
                    self._finalizer()
        if self._paths is not None:
            for sock in self._paths.sockets():
                sock.unlink(missing_ok=True)
            if not keep_journal:
                self._paths.journal.unlink(missing_ok=True)
                self._paths.log.unlink(missing_ok=True)
                if self._made_run_dir:
                    shutil.rmtree(self._paths.dir, ignore_errors=True)

    async def _stop_process(self, timeout: float) -> None:
        if self._qmp is not None and self.alive():
            with contextlib.suppress(QMPError, QemuError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(self._qmp.execute("quit"), timeout)
        await self._disconnect()
        await self._wait_exit(timeout)
        if self.alive():
            assert self._proc is not None
            self._proc.terminate()
            await self._wait_exit(timeout)

    async def _disconnect(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is None:
            return
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(qmp.disconnect(), 2.0)

    async def _wait_exit(self, timeout: float) -> None:
        # Polling keeps this cancellable and free of threads; QEMU exits in ms.
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> QemuMachine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.paths.log.read_bytes()[-limit:].decode(errors="replace").strip()
        except (OSError, QemuError):
            return ""

    # ---- QMP ----------------------------------------------------------------------

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      timeout: float = 10.0) -> Any:
        """One QMP command with a deadline; errors become `QemuError`."""
        if self._qmp is None:
            raise QemuError(f"{self.name}: no QMP connection ({cmd})")
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, arguments), timeout)
        except QMPExecuteError as exc:
            raise QemuError(f"{self.name}: {cmd}: {exc}", error_class=exc.error_class) from exc
        except TimeoutError as exc:
            raise QemuError(f"{self.name}: {cmd}: no reply in {timeout} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"{self.name}: {cmd}: {type(exc).__name__}: {exc}") from exc

    async def status(self) -> str:
        """The VM's run state: running, paused, inmigrate, finish-migrate, postmigrate…"""
        return str((await self.execute("query-status"))["status"])

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def quit(self) -> None:
        """Ask QEMU to exit (close() still reaps it)."""
        with contextlib.suppress(QemuError):  # QEMU may hang up before it replies
            await self.execute("quit")

    async def send_key(self, *qcodes: str, hold_ms: int = 20) -> None:
        """Press `qcodes` together, then release them (QMP send-key), e.g. ("shift", "4")."""
        keys = [{"type": "qcode", "data": q} for q in qcodes]
        await self.execute("send-key", {"keys": keys, "hold-time": hold_ms})

    async def input_send_event(self, events: Sequence[Mapping[str, object]]) -> None:
        await self.execute("input-send-event", {"events": list(events)})

    async def screendump(self, path: Path) -> Path:
        """The screen as a PPM file (written by QEMU, so `path` must be reachable by it)."""
        await self.execute("screendump", {"filename": str(path)})
        return path

    # ---- migration ----------------------------------------------------------------

    async def set_capabilities(self, *, pause_before_switchover: bool = True,
                               return_path: bool = True, **more: bool) -> None:
        """Migration capabilities (both sides need the same); MIGRATION events always on."""
        caps = {"events": True, "pause-before-switchover": pause_before_switchover,
                "return-path": return_path}
        caps.update({k.replace("_", "-"): v for k, v in more.items()})
        await self.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})

    async def set_parameters(self, **params: object) -> None:
        """migrate-set-parameters, keyword names with _ for - (downtime_limit=50)."""
        await self.execute("migrate-set-parameters",
                           {k.replace("_", "-"): v for k, v in params.items()})

    async def set_downtime_limit(self, ms: int) -> None:
        await self.set_parameters(downtime_limit=ms)

    async def migrate(self, uri: str) -> None:
        """Start sending the VM to `uri` (tcp:HOST:PORT); returns at once."""
        await self.execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        """On a target started with ``incoming=True``: listen for the stream on `uri`."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def query_migrate(self) -> dict[str, Any]:
        return dict(await self.execute("query-migrate"))

    async def migrate_continue(self, state: str = "pre-switchover") -> None:
        await self.execute("migrate-continue", {"state": state})

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")  # QMP keeps the old spelling

    async def downtime_ms(self) -> int | None:
        """The downtime QEMU measured (source side, after completion)."""
        info = await self.query_migrate()
        return info.get("downtime") if info.get("status") == "completed" else None

    async def wait_migration(self, *statuses: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until query-migrate's status is one of `statuses`; returns that query.

        MIGRATION events wake us early; each wake (and every 0.5 s, should an event be
        missed) re-reads query-migrate, which is the truth. A terminal status that is
        not asked for raises `MigrationError`.
        """
        if not statuses:
            raise ValueError("wait_migration needs at least one status")
        deadline = time.monotonic() + timeout
        while True:
            info = await self.query_migrate()
            status = info.get("status", "none")
            if status in statuses:
                return info
            if status in MIGRATION_FAILED:
                raise MigrationError(f"{self.name}: migration {status}"
                                     f"{': ' + info['error-desc'] if 'error-desc' in info else ''}"
                                     f" (waited for {', '.join(statuses)})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"{self.name}: migration still {status} after {timeout} s "
                                     f"(waited for {', '.join(statuses)})")
            if not self.alive():
                raise MigrationError(f"{self.name}: QEMU exited ({self.returncode}) while "
                                     f"the migration was {status}")
            assert self._migration_events is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._migration_events.get(), min(0.5, left))

    # ---- the guest's journal ------------------------------------------------------

    def journal_records(self) -> list[journal.Record]:
        return journal.read(self.paths.journal)

    async def wait_booted(self, timeout: float = 60.0) -> str:
        """Wait for the guest's boot record; returns the kernel release it reported."""
        deadline = time.monotonic() + timeout
        while True:
            release = journal.kernel_release(self.journal_records())
            if release is not None:
                return release
            if not self.alive():
                raise QemuError(f"{self.name}: QEMU exited ({self.returncode}) before the "
                                f"guest booted: {self.log_tail()}")
            if time.monotonic() >= deadline:
                raise QemuError(f"{self.name}: guest not booted after {timeout} s")
            await asyncio.sleep(0.05)


def _kill_and_reap(proc: subprocess.Popen[bytes], sockets: tuple[Path, ...]) -> None:
    """The safety net (finalizer and exit): SIGKILL our own child if alive, reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # Popen signals only a child it has not reaped: never a reused PID
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.unlink()


# ---- accelerator --------------------------------------------------------------------

async def probe_accel(image: GuestImage, *, qemu: str = QEMU, timeout: float = 20.0) -> str:
    """"kvm" if this host's KVM really runs the guest, else "tcg"; cached per boot.

    Opening /dev/kvm proves little (here KVM opens but runs no guest), so this boots
    the image under KVM and takes KVM only if the guest writes its boot record in
    time. `KEEPER_QEMU_ACCEL` forces the answer. The answer is kept in the image
    cache, keyed by host boot, QEMU binary and image.
    """
    forced = os.environ.get("KEEPER_QEMU_ACCEL")
    if forced:
        if forced not in ACCELS:
            raise QemuError(f"KEEPER_QEMU_ACCEL={forced!r}: not one of {ACCELS}")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = _accel_key(image, qemu)
    cache = image.cache / "accel.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text())
        if known.get("key") == key and known.get("accel") in ACCELS:
            return str(known["accel"])
    accel = "kvm" if await _boots_with_kvm(image, qemu, timeout) else "tcg"
    with contextlib.suppress(OSError):
        tmp = cache.with_name(f".accel.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "accel": accel}) + "\n")
        tmp.rename(cache)
    return accel


def _accel_key(image: GuestImage, qemu: str) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    binary = shutil.which(qemu) or qemu
    try:
        st = os.stat(binary)
        ident = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = binary
    return f"{boot_id} {ident} {image.key}"


async def _boots_with_kvm(image: GuestImage, qemu: str, timeout: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="probe-", dir=_probe_base()) as tmp:
        m = QemuMachine(image, name="kvm-probe", run_dir=Path(tmp), accel="kvm", qemu=qemu,
                        memory_mb=128)
        try:
            await m.start()
            release = await m.wait_booted(timeout)
            LOG.info("KVM runs the guest (kernel %s)", release)
            return True
        except QemuError as exc:
            LOG.info("KVM does not run the guest, using TCG: %s", exc)
            return False
        finally:
            await m.close()


def _probe_base() -> Path:
    base = RUN_BASE if os.geteuid() == 0 else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base
