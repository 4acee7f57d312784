"""What a process holds (open descriptors, resident memory, threads), sampled from
/proc, and a verdict on whether a series of samples grows beyond noise.

The soak bench samples every agent and Domain R process every N migrations; a leak
shows as a count that keeps rising with the number of migrations. The verdict
compares the last sample with a baseline taken after warm-up (the second sample: the
first migrations import modules and fill caches once) and also reports the
least-squares slope per 100 migrations, so a reader sees both the size and the trend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

METRICS = ("fds", "rss_kb", "threads")
# growth allowed from the baseline to the last sample: max(absolute, relative * baseline)
DEFAULT_LIMITS = {"fds": (4.0, 0.10), "rss_kb": (16 * 1024.0, 0.15), "threads": (2.0, 0.10)}


def sample(pid: int) -> dict[str, int] | None:
    """fds, rss_kb and threads of `pid` now; None if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {"fds": fds, "rss_kb": 0, "threads": 0}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_kb"] = int(value.split()[0])
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass(frozen=True)
class Verdict:
    metric: str
    baseline: float
    last: float
    growth: float
    allowed: float
    slope_per_100: float  # least-squares slope, per 100 migrations

    @property
    def ok(self) -> bool:
        return self.growth <= self.allowed

    def doc(self) -> dict[str, object]:
        return {"metric": self.metric, "baseline": self.baseline, "last": self.last,
                "growth": self.growth, "allowed": round(self.allowed, 1),
                "slope_per_100": round(self.slope_per_100, 2), "ok": self.ok}


def verdict(metric: str, at: list[int], values: list[float],
            limits: dict[str, tuple[float, float]] | None = None) -> Verdict:
    """Does `values` (sampled after `at` migrations) grow beyond noise? Needs one
    sample at least; with three or more the baseline is the second one (warm-up)."""
    if not values or len(at) != len(values):
        raise ValueError(f"{metric}: {len(values)} samples at {len(at)} points")
    absolute, relative = (limits or DEFAULT_LIMITS)[metric]
    base_i = 1 if len(values) >= 3 else 0
    baseline, last = values[base_i], values[-1]
    return Verdict(metric=metric, baseline=baseline, last=last, growth=last - baseline,
                   allowed=max(absolute, relative * baseline),
                   slope_per_100=100 * slope([float(a) for a in at[base_i:]],
                                             [float(v) for v in values[base_i:]]))
