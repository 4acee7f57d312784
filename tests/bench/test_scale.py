"""bench/scale.py, bench/downtime.py and bench/migration_time.py end to end at a tiny
scale: the JSON line they end with has what issue 13 asks for (root). Structure and
correctness only; the timing goals are printed by the benches, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def run(script: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(done.stdout.strip().splitlines()[-1])  # one JSON line, last


@pytest.mark.root
def test_scale_moves_every_connection_and_every_guest(tmp_path: Path) -> None:
    _, summary = run("scale.py", "--sockets", "9", "--mix", "34,33,33", "--guests", "2",
                     "--json", "--out", str(tmp_path))
    assert summary["bench"] == "scale"
    assert (summary["sockets"], summary["guests"], summary["lost"]) == (9, 2, 0)
    # the 9 connections and the typist's, every RMS
    assert summary["moved"] == 10
    assert summary["dump_restore_ms"] > 0
    doc = json.loads((tmp_path / "scale.json").read_text())
    one = doc["one_domr"]
    assert one["mix"] == {"console": 5, "ssh": 2, "vnc": 2}  # 9 x 33 % rounds down
    assert {k: v["moved"] for k, v in one["by_rms"].items() if v["moved"]} == {
        "console": 6, "ssh": 2, "vnc": 2}
    assert one["dump_cpu_ms"] > 0
    assert one["keys_missing_before"] == one["keys_missing_after"] == {
        "console": 0, "ssh": 0, "vnc": 0}
    rows = doc["many_guests"]["rows"]
    assert [r["guest"] for r in rows] == ["g0", "g1"]
    assert all(r["lost"] == 0 and r["sent"] > 0 and r["migration_ms"] > 0 for r in rows)


@pytest.mark.root
def test_downtime_gives_max_and_p99_pause_per_rms(tmp_path: Path) -> None:
    _, summary = run("downtime.py", "--sizes", "64", "--migrations", "2", "--json",
                     "--out", str(tmp_path))
    assert summary["migrations"] == 2
    assert set(summary["pause"]) == {"console", "ssh", "vnc"}
    for v in summary["pause"].values():
        assert v["migrations"] == 2
        assert v["unsampled"] == 0, v  # a key overlapped every frozen window
        assert 0 < v["p99_ms"] <= v["max_ms"]
    assert all(r["lost"] == 0 for r in summary["rows"])


@pytest.mark.root
def test_migration_time_gives_the_overhead_ratio(tmp_path: Path) -> None:
    done, summary = run("migration_time.py", "--sizes", "64", "--runs", "1", "--json")
    assert summary["bench"] == "migration_time"
    assert summary["overhead_ratio"] == summary["overhead_by_size"]["64"] > 0
    for key in ("co_migration_ms", "u_alone_ms", "co_migration_typing_ms", "independent_ms"):
        assert summary[key]["64"] > 0
    phases = summary["phases_ms"]["64"]
    assert set(phases) == {"co_precopy", "alone_precopy", "co_window", "alone_window"}
    assert all(v > 0 for v in phases.values())
    # a co-migration is its pre-copy, then its stop window (and nothing else of note)
    assert phases["co_precopy"] + phases["co_window"] <= summary["co_migration_ms"]["64"] + 1
    assert "overhead_ratio" in done.stdout


def test_p99_is_the_nearest_rank() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from downtime import p99
    finally:
        sys.path.remove(str(BENCH))
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0]) == 5.0
    assert p99([3.0, 1.0]) == 3.0
    assert p99([]) == 0.0
