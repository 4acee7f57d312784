"""bench/latency.py and bench/degradation.py with --json end with one JSON line that
says what they measured (root: each builds its own labs; the smallest scale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root
pytest.importorskip("matplotlib")

BENCH = Path(__file__).parents[2] / "bench"


def last_json(script: str, out: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KEEPER_BENCH_OUT": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return doc


def test_latency_ends_with_one_json_line(tmp_path: Path) -> None:
    doc = last_json("latency.py", tmp_path, "--seconds", "1", "--rms", "ssh")
    assert doc["bench"] == "latency"
    assert [(r["mode"], r["rms"]) for r in doc["rows"]] == [("keeper", "ssh"),
                                                           ("baseline", "ssh")]
    assert all(r["keys"] > 0 and r["median_ms"] > 0 for r in doc["rows"])
    assert Path(doc["file"]) == tmp_path / "latency.json"


def test_degradation_ends_with_one_json_line(tmp_path: Path) -> None:
    doc = last_json("degradation.py", tmp_path, "--mem-mb", "16", "--settle", "0.5",
                    "--rms", "console")
    assert doc["bench"] == "degradation"
    rows = {r["rms"]: r for r in doc["rows"]}
    assert set(rows) == {"console", "vnc-fps"}
    assert rows["console"]["lost"] == 0 and rows["console"]["samples"] > 0
    assert rows["console"]["unit"] == "ms" and rows["vnc-fps"]["unit"] == "frames/s"
    assert rows["console"]["migration_s"] > 0
