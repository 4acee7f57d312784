"""bench/faults.py: which drills it finds and selects, and how it judges a row (no
root: the drills themselves run in tests/lab and in the bench)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from keeper.lab.faults import Drill, Row

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import faults  # noqa: E402  (bench/ is not a package)


def test_finds_every_wire_drill_and_selects_by_prefix() -> None:
    drills, errors = faults.load()
    assert errors == {}, errors
    names = [d.name for d in drills]
    wire = [n for n in names if n.startswith("wire/")]
    assert sorted(wire) == sorted(f"wire/{rms}/loss-{pct}pct" for rms in
                                  ("console", "ssh", "vnc") for pct in (2, 10))
    picked = [d.name for d in faults.select(drills, "wire/ssh", None)]
    assert picked == ["wire/ssh/loss-2pct", "wire/ssh/loss-10pct"]
    assert [d.name for d in faults.select(drills, "wire", "wire/vnc,wire/ssh")] == [
        "wire/console/loss-2pct", "wire/console/loss-10pct"]
    assert faults.select(drills, "wir", None) == []  # a prefix is a whole path segment


def test_list_on_the_command_line() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "faults.py"), "--list", "--only",
                           "wire/vnc"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["wire/vnc/loss-2pct", "wire/vnc/loss-10pct"]
    none = subprocess.run([sys.executable, str(BENCH / "faults.py"), "--only", "nothing"],
                          capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "no drill matches" in none.stderr


def test_a_row_that_lost_or_did_not_recover_fails() -> None:
    async def good() -> Row:
        return Row("t/good", 1, 0, 0, True, {"pause_ms": {"max": 5.0, "median": 1.0}})

    async def lossy() -> Row:
        return Row("t/lossy", 1, 3, 0, True)

    async def broken() -> Row:
        raise RuntimeError("the lab did not come up")

    rows = asyncio.run(faults.run_all(
        [Drill("t/good", good), Drill("t/lossy", lossy), Drill("t/broken", broken)],
        lambda *a: None))
    assert [faults.failed(r) for r in rows] == [False, True, True]
    assert rows[2]["case"] == "t/broken" and not rows[2]["recovered"]
    assert "the lab did not come up" in rows[2]["error"]
    assert rows[0]["pause_ms"]["max"] == 5.0  # extras kept in the row
