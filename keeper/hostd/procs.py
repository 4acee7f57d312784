"""Processes a lab starts (host agents, Domain Rs), tracked by pid files so `down` ends them.

Only processes we recorded are signalled, by PID, and only while their command line
still says they are ours (PIDs are reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def pidfile(rundir: Path, label: str) -> Path:
    return rundir / "pids" / f"{label}.pid"


def record(rundir: Path, label: str, pid: int) -> None:
    path = pidfile(rundir, label)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(str(pid))


def forget(rundir: Path, label: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        pidfile(rundir, label).unlink()


def is_ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"keeper" in cmdline


def spawn(rundir: Path, label: str, argv: list[str], pass_fds: tuple[int, ...] = (),
          stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start `python -m keeper ARGV...` detached, logging to <rundir>/<label>.log
    (`stdin`: subprocess.PIPE for a spare Domain R, keeper.hostd.spare)."""
    rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logf = open(rundir / f"{label}.log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keeper", *argv],
            stdin=stdin, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, pass_fds=pass_fds,
        )
    finally:
        logf.close()
    record(rundir, label, proc.pid)
    return proc


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(pid: int, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps it if it is our child."""
    if not is_ours(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def reap(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait (off the event loop) for a child we asked to exit; stop it if it won't."""
    try:
        await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        await asyncio.to_thread(stop, proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, timeout)


def stop_all(rundir: Path) -> list[str]:
    stopped = []
    piddir = rundir / "pids"
    if not piddir.is_dir():
        return stopped
    # Domain Rs before host agents, so no agent restarts anything meanwhile.
    files = sorted(piddir.glob("*.pid"), key=lambda p: p.name.startswith("hostd"))
    for path in files:
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            continue
        stop(pid)
        stopped.append(f"process {path.stem} ({pid})")
        path.unlink(missing_ok=True)
    return stopped
