"""bench/throughput.py --json at the smallest scale: one JSON line with issue #13's
ratios (each a number or null with its reason) and a row per encoding and path; with
QEMU installed, the QEMU guest's rows (keeper against QEMU's own VNC server) and
their ratio. Only the structure is checked, not the timing. Also the guest's
`screensaver uncapped` that the bench drives (no root)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from keeper import demo
from keeper.domu.guestos import GuestOS
from keeper.domu.memory import GuestMemory
from keeper.xen import events as ev
from keeper.xen.console import RawPage
from tests.bench.test_bench_json import last_json

KEYS = {"s": 31, "c": 46, "r": 19, "e": 18, "n": 49, "a": 30, "v": 47, "u": 22, "p": 25,
        "d": 32, " ": 57, "\r": 28}


def type_line(m: mmap.mmap, g: GuestOS, line: str) -> None:
    assert g.display is not None
    kbd = RawPage(m, g.display.kbd_pfn * 4096)
    for ch in line:
        ev.put(kbd, ev.KBD_IN, [ev.key_event(KEYS[ch], True), ev.key_event(KEYS[ch], False)],
               peer="t")
        g.display.service_keyboard()


@pytest.mark.parametrize(("line", "period"), [("screensaver\r", 1 / 50),
                                               ("screensaver uncapped\r", 0.0)])
def test_screensaver_period(line: str, period: float) -> None:
    m = mmap.mmap(-1, 8 << 20)
    g = GuestOS.boot(GuestMemory(m, mmap.mmap(-1, 2048)))
    assert g.display is not None
    type_line(m, g, line)
    assert g.display.saver_on and g.display.saver_period == period
    type_line(m, g, " ")  # a key ends it, uncapped or not
    assert not g.display.saver_on


@pytest.mark.root
def test_throughput_ends_with_one_json_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = last_json("throughput.py", tmp_path, "--seconds", "0.5", "--chars", "20000")
    assert doc["bench"] == "throughput" and doc["chars"] == 20000
    ssh = doc["ssh_ratio_vs_openssh"]
    for path in ("domain_r_path", "whole_path"):
        assert (isinstance(ssh[path], float) and ssh[path] > 0) or (
            ssh[path] is None and ssh[f"{path}_why_null"])
    encodings = ("raw", "hextile", "zrle")
    assert set(doc["vnc_updates_per_s"]) == set(encodings)
    sim = [r for r in doc["rows"] if r["what"] == "vnc" and r["guest"] == "sim"]
    assert [(r["mode"], r["encoding"]) for r in sim] == [
        (m, e) for m in ("keeper", "baseline") for e in encodings]
    # every encoding delivered whole 800x600 screens to the client
    assert all(r["frames_per_s"] > 0 and r["full_screens_per_s"] == r["frames_per_s"]
               for r in sim)
    qemu = [r for r in doc["rows"] if r["what"] == "vnc" and r["guest"] == "qemu"]
    if demo.qemu_available():  # setup installs QEMU and the image: the ratio is measured
        assert [(r["mode"], r["encoding"]) for r in qemu] == [
            (m, e) for m in ("keeper", "baseline") for e in encodings]
        # the VGA text console, changing as a whole: both servers sent updates of it
        assert all(r["screen"] == "720x400" and r["frames_per_s"] > 0
                   and r["full_screens_per_s"] > 0 for r in qemu)
        ratio = doc["vnc_ratio_vs_qemu"]
        assert set(ratio) == set(encodings) and all(v > 0 for v in ratio.values())
        assert set(doc["vnc_updates_per_s_qemu"]) == {"keeper", "qemu_vnc_server"}
    else:
        assert qemu == []
        assert doc["vnc_ratio_vs_qemu"] is None and doc["vnc_ratio_vs_qemu_why_null"]
    ssh_rows = {r["mode"]: r for r in doc["rows"] if r["what"] == "ssh"}
    assert {"keeper", "baseline", "domain-r-fed"} <= set(ssh_rows)
    if Path("/usr/sbin/sshd").exists():  # setup installs it: both ratios are measured
        assert "openssh-sshd" in ssh_rows
        assert all(isinstance(ssh[p], float) for p in ("domain_r_path", "whole_path")), ssh
    assert all(r["chars"] >= 20000 for r in ssh_rows.values())
