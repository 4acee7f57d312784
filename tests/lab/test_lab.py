"""`keeper lab up | status | down` through the real command line (root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keeper.net import netns
from tests.conftest import lab_processes, unique

pytestmark = pytest.mark.root


def keeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keeper", *args], capture_output=True,
                          text=True, timeout=120)


def waiting_spares(name: str, timeout: float = 30.0) -> set[int]:
    """The pids of the agents' spare Domain Rs, once every agent has one waiting (an
    agent starts the next a few seconds after one is taken)."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(keeper("lab", "status", "--lab", name, "--json").stdout)
        pids = {h["spare_domr"]["pid"] for h in status["hosts"]}
        if None not in pids or time.monotonic() > deadline:
            return {p for p in pids if p is not None}
        time.sleep(0.5)


def test_up_is_idempotent_status_tells_where_down_removes_everything() -> None:
    name = unique()
    try:
        first = keeper("lab", "up", "--lab", name)
        assert first.returncode == 0, first.stderr
        again = keeper("lab", "up", "--lab", name)  # idempotent: nothing doubled, no error
        assert again.returncode == 0, again.stderr
        made = sorted(ns for ns in netns.netns.listnetns() if ns.startswith(f"{name}-"))
        assert made == sorted(f"{name}-{x}" for x in ("a", "b", "client", "sw", "r-guest1-a"))
        # one agent per host, guest1's Domain U and Domain R, and each agent's one
        # spare Domain R (keeper.hostd.spare): nothing started twice
        spares = waiting_spares(name)
        assert len(spares) == 2
        procs = set(lab_processes(name))
        assert spares <= procs and len(procs - spares) == 4

        created = keeper("domr", "create", "r1", "--host", "b", "--lab", name)
        assert created.returncode == 0, created.stderr
        status = json.loads(keeper("lab", "status", "--lab", name, "--json").stdout)
        assert status["client_netns"] == f"{name}-client"
        assert status["ssh"]["login"] == "admin"
        key = Path(status["ssh"]["key"])
        assert key.exists() and key.stat().st_mode & 0o077 == 0  # the login key is root's
        assert {h["host"]: h["mgmt_ip"] for h in status["hosts"]} == {
            "a": "198.18.0.1", "b": "198.18.0.2"}
        doms = {d["name"]: d for d in status["domains"]}
        assert (doms["guest1"]["host"], doms["guest1"]["ip"], doms["guest1"]["guest"]) == (
            "a", "198.18.0.101", True)
        assert doms["guest1"]["services"] == {"console": 2323, "ssh": 22, "vnc": 5900,
                                              "web": 6080}
        assert (doms["r1"]["host"], doms["r1"]["ip"], doms["r1"]["guest"]) == (
            "b", "198.18.0.102", False)

        moved = keeper("migrate", "r1", "--to", "a", "--lab", name, "--json")
        assert moved.returncode == 0, moved.stderr
        trace = json.loads(moved.stdout)
        assert [m["name"] for m in trace["marks"]] == [
            "start", "prepared", "quiesced", "dumped", "resumed", "source_released"]
        assert trace["trace_ok"] and trace["link_down_ms"] >= 0
        status = json.loads(keeper("lab", "status", "--lab", name, "--json").stdout)
        assert {d["name"]: d["host"] for d in status["domains"]} == {"guest1": "a", "r1": "a"}

        journal = keeper("guest", "journal", "guest1", "--lab", name, "--json")
        assert journal.returncode == 0 and json.loads(journal.stdout)["count"] == 0
        moved = keeper("migrate", "guest1", "--to", "b", "--lab", name, "--json")
        assert moved.returncode == 0, moved.stderr
        assert json.loads(moved.stdout)["trace_ok"] is True
        assert f"{name}-r-r1-b" not in netns.netns.listnetns()

        bad = keeper("migrate", "r1", "--to", "nowhere", "--lab", name)
        assert bad.returncode == 1 and "no host 'nowhere'" in bad.stderr
    finally:
        down = keeper("lab", "down", "--lab", name)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in netns.netns.listnetns() if ns.startswith(f"{name}-")]
    assert not lab_processes(name)
    assert keeper("lab", "down", "--lab", name).returncode == 0  # down twice is fine
