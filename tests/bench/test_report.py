"""bench/report.py writes a section only from a bench that succeeded and from JSON
newer than its run, commits that JSON beside the plots, and otherwise exits non-zero
naming what it refused (root: report.py runs benches only as root).

The benches report.py runs here are small scripts in a temporary bench directory
that behave as a real bench does at its end (write their JSON, exit 0) or as one
that went wrong (exit 1 after writing, or write nothing and leave an older file);
what is under test is report.py's judgement of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPORT = Path(__file__).parents[2] / "bench" / "report.py"
# what bench/latency.py's JSON holds, as far as the latency section reads it
ROWS = [{"rms": "vnc", "mode": "keeper", "median_ms": 1.2345, "p95_ms": 2.5},
        {"rms": "ssh", "mode": "baseline", "median_ms": 0.75, "p95_ms": 1.0}]
BENCH = """
import json, os, sys
from pathlib import Path
out = Path(os.environ["KEEPER_BENCH_OUT"])
mode = {mode!r}
if mode != "silent":
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({{"bench": "latency", "rows": {rows!r}}}))
sys.exit(1 if mode == "fails" else 0)
"""


def report(tmp: Path, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    bench = tmp / "bench"
    bench.mkdir(exist_ok=True)
    (bench / "latency.py").write_text(BENCH.format(mode=mode, rows=ROWS))
    return subprocess.run(
        [sys.executable, str(REPORT), "--only", "latency", "--bench-dir", str(bench),
         "--out", str(tmp / "out"), "--results", str(tmp / "results"),
         "--md", str(tmp / "RESULTS.md"), *extra],
        capture_output=True, text=True, timeout=120, cwd=REPORT.parent)


def section(md: str, name: str) -> str:
    return md.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_a_bench_that_succeeded_is_written_and_its_json_committed(tmp_path: Path) -> None:
    done = report(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    latency = section((tmp_path / "RESULTS.md").read_text(), "latency")
    assert "vnc via Domain R: median 1.23 ms, p95 2.50 ms" in latency
    assert "bench/results/latency.json" in latency
    committed = json.loads((tmp_path / "results" / "latency.json").read_text())
    assert committed["rows"] == ROWS
    assert committed["report"]["bench_exit"] == 0
    assert committed["report"]["argv"][0] == "latency.py"
    # a section that did not run this time is not invented
    assert "not run at this scale yet" in section((tmp_path / "RESULTS.md").read_text(),
                                                  "keyloss")
    # and --no-run writes it again from the committed evidence alone
    os.remove(tmp_path / "out" / "latency.json")
    again = report(tmp_path, "ok", "--no-run")
    assert again.returncode == 0, again.stderr
    assert "median 1.23 ms" in section((tmp_path / "RESULTS.md").read_text(), "latency")


def test_a_failed_bench_writes_no_section(tmp_path: Path) -> None:
    done = report(tmp_path, "fails")  # it wrote its JSON, then exited 1
    assert done.returncode != 0
    assert "latency" in done.stderr and "exited 1" in done.stderr
    latency = section((tmp_path / "RESULTS.md").read_text(), "latency")
    assert "not written" in latency and "1.23" not in latency
    assert not (tmp_path / "results" / "latency.json").exists()


def test_stale_json_writes_no_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = out / "latency.json"  # left by an earlier run; this run's bench writes nothing
    old.write_text(json.dumps({"bench": "latency", "rows": ROWS}))
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    done = report(tmp_path, "silent")
    assert done.returncode != 0
    assert "latency" in done.stderr and "older than this run" in done.stderr
    latency = section((tmp_path / "RESULTS.md").read_text(), "latency")
    assert "not written" in latency and "1.23" not in latency
    assert not (tmp_path / "results" / "latency.json").exists()


def test_unstamped_committed_json_is_not_evidence(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    # a JSON nobody vouched for (no report stamp, or from a bench that failed)
    (results / "latency.json").write_text(json.dumps({"rows": ROWS}))
    done = report(tmp_path, "ok", "--no-run")
    assert done.returncode == 0, done.stderr
    assert "not run at this scale yet" in section((tmp_path / "RESULTS.md").read_text(),
                                                  "latency")
    (results / "latency.json").write_text(json.dumps(
        {"rows": ROWS, "report": {"bench_exit": 1, "date": "x", "argv": ["latency.py"]}}))
    done = report(tmp_path, "ok", "--no-run")
    assert "1.23" not in section((tmp_path / "RESULTS.md").read_text(), "latency")
