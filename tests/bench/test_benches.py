"""The benches run end to end at a tiny scale and write what they promise (root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
pytest.importorskip("matplotlib")

BENCH = Path(__file__).parents[2] / "bench"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=600)


def test_keyloss_keeper_against_the_baseline(tmp_path: Path) -> None:
    done = run("keyloss.py", "--migrations", "1", "--configs", "keeper,baseline",
               "--interval", "0.5", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "keyloss.json").read_text())
    by = {r["config"]: r for r in doc["results"]}
    assert by["keeper"]["lost"] == 0 and by["keeper"]["reconnects"] == 0
    assert by["keeper"]["keys_sent"] > 0
    assert by["baseline"]["reconnects"] >= 1  # the conventional set-up breaks the session
    assert (tmp_path / "keyloss.png").stat().st_size > 1000
    assert "keeper" in done.stdout and "baseline" in done.stdout  # the printed table
