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
    # in Xen's order: the source's servers fed the guest after its final copy, until
    # the source was destroyed (the keys they read then are the baseline's loss)
    fed = [m["after_final_copy_ms"] for m in by["baseline"]["migrations"]]
    assert len(fed) == 1 and fed[0] > 0
    assert "after its final copy" in done.stdout
    assert (tmp_path / "keyloss.png").stat().st_size > 1000
    assert "keeper" in done.stdout and "baseline" in done.stdout  # the printed table


def _qemu_missing() -> str | None:
    import shutil

    from keeper.qemu import image

    if shutil.which("qemu-system-x86_64") is None:
        return "no QEMU"
    if image.load() is None:
        return "no guest image (./scripts/setup)"
    return None


def test_keyloss_on_qemu_keeper_against_the_stock_baseline(tmp_path: Path) -> None:
    missing = _qemu_missing()
    if missing:
        pytest.skip(missing)
    done = run("keyloss.py", "--guest", "qemu", "--rms", "console", "--migrations", "1",
               "--interval", "1.5", "--json", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # one JSON line, last
    assert (summary["guest"], summary["migrations"]) == ("qemu", 1)
    by = {r["config"]: r for r in summary["rows"]}
    assert by["keeper"]["lost"] == 0 and by["keeper"]["reconnects"] == 0
    assert by["keeper"]["keys_sent"] > 0
    assert by["baseline"]["reconnects"] >= 1  # QEMU's own console dies with the source
    assert "host address :2323" in by["baseline"]["client"]
    assert by["baseline"]["connections"] >= 2  # and the client found the new host
    doc = json.loads((tmp_path / "keyloss-console-qemu.json").read_text())
    assert {r["config"] for r in doc["results"]} == {"keeper", "baseline"}
