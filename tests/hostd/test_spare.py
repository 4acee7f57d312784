"""The spare Domain R (keeper.hostd.spare): a migration's twin is the process the
target agent started ahead; without one (it died) the twin starts cold; a spare
nobody takes ends with its agent. Root tests run whole labs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keeper.hostd import procs
from keeper.hostd.spare import REFILL_DELAY, Spare
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from tests.migrate.test_comigration import finish, start

GUEST = "guest1"


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def spare_of(lab: LabSpec, host: str, *, not_pid: int | None = None) -> dict[str, Any]:
    """Host `host`'s spare, once it waits (and is not `not_pid`)."""
    deadline = time.monotonic() + REFILL_DELAY + 30
    while time.monotonic() < deadline:
        spare = (await ops.call(lab, host, "GET", "/status"))["spare_domr"]
        if spare["pid"] is not None and spare["pid"] != not_pid:
            return spare
        await asyncio.sleep(0.2)
    raise AssertionError(f"host {host} has no new spare Domain R")


async def domr_pid(lab: LabSpec, host: str) -> int:
    status = await ops.call(lab, host, "GET", "/status")
    return next(d["pid"] for d in status["domrs"] if d["name"] == GUEST)


async def test_spare_lifecycle_without_an_agent(tmp_path: Path) -> None:
    """This test is the agent: the spare waits after its imports, ends when the pipe
    closes, and is recorded (and then forgotten) in the pid files."""
    spare = Spare(tmp_path, "x")
    spare.start()
    assert spare.proc is not None
    pid = spare.proc.pid
    assert procs.pidfile(tmp_path, "domr-spare-x").read_text() == str(pid)
    await asyncio.sleep(1.0)
    assert spare.proc.poll() is None  # waiting for its orders
    assert "spare" in cmdline(pid) and str(tmp_path) in cmdline(pid)
    assert spare.status()["pid"] == pid
    await spare.close()
    assert not procs.alive(pid)
    assert not procs.pidfile(tmp_path, "domr-spare-x").exists()


async def test_disabled_spare_starts_nothing(tmp_path: Path) -> None:
    spare = Spare(tmp_path, "x", enabled=False)
    spare.start()
    assert spare.proc is None
    assert spare.take("domr-g-x", ["--name", "g"]) is None
    assert spare.status() == {"enabled": False, "pid": None, "taken": 0, "cold_starts": 0}
    await spare.close()


def test_spare_dies_with_its_agent(tmp_path: Path) -> None:
    """PDEATHSIG: a spare whose agent is killed outright does not linger."""
    agent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time;"
         "p = subprocess.Popen([sys.executable, '-m', 'keeper', 'domr', 'spare', "
         "'--parent', str(__import__('os').getpid())], stdin=subprocess.PIPE);"
         "print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        time.sleep(1.0)
        assert procs.alive(pid)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 10
        while procs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.alive(pid)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


@pytest.mark.root
async def test_twin_is_the_spare_and_a_dead_spare_means_a_cold_twin(lab: LabSpec) -> None:
    typist, stop, task, before = await start(lab, dirty_rate=500)
    try:
        # 1. the twin on b is b's spare, which then serves the guest; b starts another
        spare = await spare_of(lab, "b")
        assert "spare" in cmdline(spare["pid"])
        trace = await ops.migrate(lab, GUEST, "b")
        assert trace["trace_ok"]
        assert await domr_pid(lab, "b") == spare["pid"]
        refilled = await spare_of(lab, "b", not_pid=spare["pid"])
        assert refilled["taken"] == 1 and refilled["cold_starts"] == 0
        # 2. a's spare is killed: the twin starts cold, and the move still succeeds
        dead = (await spare_of(lab, "a"))["pid"]
        os.kill(dead, signal.SIGKILL)
        while procs.alive(dead):
            await asyncio.sleep(0.05)
        trace = await ops.migrate(lab, GUEST, "a")
        assert trace["trace_ok"]
        twin = await domr_pid(lab, "a")
        assert twin != dead and "run" in cmdline(twin)
        after = (await ops.call(lab, "a", "GET", "/status"))["spare_domr"]
        assert after["cold_starts"] == 1
        assert after["taken"] == 1  # the guest's first Domain R, at create
        await spare_of(lab, "a")  # and a has a spare again
    finally:
        result = await finish(lab, typist, stop, task, before)
    assert result == {"lost": 0, "duplicated": 0, "reordered": 0, "sent": result["sent"],
                      "errors": 0}, typist.stats.errors
    assert result["sent"] > 20
