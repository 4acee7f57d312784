"""A spare Domain R: one process per host agent, started ahead and kept waiting, so
that a migration's twin (and any new Domain R) does not pay for starting Python and
importing asyncssh, aiohttp, numpy and scapy (about a second, on the critical path
of a co-migration: Domain U's pre-copy is done long before a cold twin is ready).

The spare (`keeper domr spare`, keeper.domr.main) imports everything a Domain R
needs, with no socket and no namespace of its own yet, then blocks on one line of
its standard input. Taking it hands it a Domain R's argv and log file: it enters
that Domain R's namespace and runs as `keeper domr run` would have. The agent then
starts the next spare, a little later and at low priority, out of the way of the
migration that took this one. A spare dies with its agent (the pipe closes, and
PDEATHSIG), and is recorded in the lab's pid files like every process we start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

from keeper.hostd import procs

log = logging.getLogger("keeper.hostd")

REFILL_DELAY = 3.0  # s after a take: the migration that took it runs its last steps first
SPARE_NICE = 10  # while it imports; the agent resets it to 0 when it takes the spare


class Spare:
    """The host agent's one spare Domain R (or none, when turned off)."""

    def __init__(self, rundir: Path, host: str, *, enabled: bool = True) -> None:
        self.rundir, self.label = rundir, f"domr-spare-{host}"
        self.enabled = enabled
        self.proc: subprocess.Popen[bytes] | None = None
        self._refill: asyncio.TimerHandle | None = None
        self.taken = 0  # spares handed out
        self.cold = 0  # Domain Rs started without one (none ready, or turned off)

    def start(self) -> None:
        """Start a spare now, if turned on and none is waiting. Call on the agent's
        event-loop thread: the spare's PDEATHSIG is tied to the thread that forks it."""
        if not self.enabled or (self.proc is not None and self.proc.poll() is None):
            return
        self.proc = procs.spawn(self.rundir, self.label,
                                ["domr", "spare", "--parent", str(os.getpid()),
                                 "--nice", str(SPARE_NICE), "--rundir", str(self.rundir)],
                                stdin=subprocess.PIPE)

    def take(self, label: str, argv: list[str]) -> subprocess.Popen[bytes] | None:
        """The spare, now running `keeper domr ARGV` under `label` (its pid file and
        log), or None if there is no live spare: then start the process cold."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None or proc.stdin is None:
            if self.enabled:
                self.cold += 1
            self._schedule()
            return None
        with contextlib.suppress(OSError):  # back to full speed, if it is still importing
            os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
        log_path = self.rundir / f"{label}.log"
        try:
            proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}).encode() + b"\n")
            proc.stdin.close()
        except OSError as exc:  # it died just now
            log.warning("spare Domain R %d is gone (%s): starting cold", proc.pid, exc)
            procs.forget(self.rundir, self.label)
            self.cold += 1
            self._schedule()
            return None
        procs.forget(self.rundir, self.label)
        procs.record(self.rundir, label, proc.pid)
        self.taken += 1
        self._schedule()
        return proc

    def _schedule(self) -> None:
        if not self.enabled or self._refill is not None:
            return
        loop = asyncio.get_running_loop()

        def refill() -> None:
            self._refill = None
            try:
                self.start()
            except OSError as exc:
                log.warning("cannot start a spare Domain R: %s", exc)

        self._refill = loop.call_later(REFILL_DELAY, refill)

    async def close(self) -> None:
        """End the waiting spare (a spare holds nothing: it has not started serving)."""
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # it reads EOF and exits
        await procs.reap(proc, timeout=3.0)
        procs.forget(self.rundir, self.label)

    def status(self) -> dict[str, object]:
        waiting = self.proc is not None and self.proc.poll() is None
        return {"enabled": self.enabled, "pid": self.proc.pid if waiting and self.proc else None,
                "taken": self.taken, "cold_starts": self.cold}
