"""The soak's growth verdict and /proc sampling (no root)."""

from __future__ import annotations

import os
import threading

import pytest

from keeper.lab import procstat


def test_sample_reads_this_process() -> None:
    before = procstat.sample(os.getpid())
    assert before is not None and before["rss_kb"] > 0 and before["threads"] >= 1
    r, w = os.pipe()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        now = procstat.sample(os.getpid())
        assert now is not None
        assert now["fds"] >= before["fds"] + 2
        assert now["threads"] >= before["threads"] + 1
    finally:
        stop.set()
        t.join()
        os.close(r)
        os.close(w)
    assert procstat.sample(2**22 + 12345) is None  # no such process


def test_verdict_flat_noise_and_growth() -> None:
    at = [0, 100, 200, 300, 400]
    flat = procstat.verdict("fds", at, [30, 35, 36, 35, 35])  # warm-up, then flat
    assert flat.ok and flat.baseline == 35 and flat.growth == 0
    leak = procstat.verdict("fds", at, [30, 35, 45, 55, 65])
    assert not leak.ok and leak.growth == 30 and leak.slope_per_100 == pytest.approx(10)
    rss = procstat.verdict("rss_kb", at, [80_000, 110_000, 112_000, 109_000, 113_000])
    assert rss.ok  # within max(16 MiB, 15 %)
    assert not procstat.verdict("rss_kb", at, [80_000, 110_000, 140_000, 170_000,
                                               200_000]).ok
    assert procstat.verdict("threads", [0], [5]).ok  # one sample: nothing to grow
    with pytest.raises(ValueError):
        procstat.verdict("threads", [0, 1], [5])
