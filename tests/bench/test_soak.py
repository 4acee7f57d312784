"""bench/soak.py at 50 migrations, sampling every 10 (root): a raw console, OpenSSH
and VNC typing at once lose nothing and never reconnect, and no agent, Domain R or
Domain U process grows in descriptors, memory or threads beyond the bench's limits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# a migration takes 2.5-11 s here, as the machine's load goes
pytestmark = [pytest.mark.root, pytest.mark.timeout(3600)]

SOAK = Path(__file__).parents[2] / "bench" / "soak.py"


def test_soak_50_migrations(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), "--migrations", "50", "--sample-every", "10", "--json",
         "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=3500)
    finally:  # interrupted: SIGTERM lets the bench take its lab down
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-4000:]
    summary = json.loads(stdout.strip().splitlines()[-1])  # one JSON line, last
    assert summary["ok"] and summary["migrations"] == 50
    assert summary["lost"] == summary["duplicated"] == summary["reordered"] == 0
    assert summary["reconnects"] == 0 and summary["alive"] and summary["trace_ok"]
    for rms in ("console", "ssh", "vnc"):
        s = summary["sessions"][rms]
        assert s["sent"] > 0 and s["sent"] == s["received"] and s["alive"], s
    assert summary["enter"]["sent"] == summary["enter"]["received"] > 0
    # a series per process: both agents, guest1's Domain R and Domain U; a sample
    # before the first migration and after every 10th
    assert set(summary["series"]) == {"hostd-a", "hostd-b", "domr-guest1", "domu-guest1"}
    for label, series in summary["series"].items():
        assert series["at"] == [0, 10, 20, 30, 40, 50], label
        assert all(len(series[m]) == 6 for m in ("fds", "rss_kb", "threads")), label
        assert {v["metric"] for v in summary["verdicts"][label]} == {
            "fds", "rss_kb", "threads"}
    # the Domain R is a new process after each migration, the agents are not
    assert len(set(summary["series"]["domr-guest1"]["pid"])) > 1
    assert len(set(summary["series"]["hostd-a"]["pid"])) == 1
    assert summary["grew"] == []
    assert (tmp_path / "soak.json").exists()
