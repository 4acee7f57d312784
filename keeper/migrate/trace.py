"""A timestamped record of one migration: named marks, in the order they happened."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Trace:
    kind: str
    domain: str
    source: str
    target: str
    started_wall: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1e3

    def mark(self, name: str) -> None:
        self.marks.append((name, self.elapsed_ms()))

    def names(self) -> list[str]:
        return [n for n, _ in self.marks]

    def at(self, name: str) -> float:
        for n, t in self.marks:
            if n == name:
                return t
        raise KeyError(name)

    def span(self, start: str, end: str) -> float:
        return self.at(end) - self.at(start)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "domain": self.domain, "source": self.source,
            "target": self.target, "started": self.started_wall,
            "t0_monotonic": self._t0,  # CLOCK_MONOTONIC: comparable within one machine
            "marks": [{"name": n, "ms": round(t, 3)} for n, t in self.marks],
            **self.info,
        }


def longest_wait(trace: dict[str, Any], samples: Iterable[tuple[float, float]],
                 start: str, end: str) -> float:
    """The pause a user saw in one migration: the slowest round trip (ms) among
    `samples` ((sent at, ms), CLOCK_MONOTONIC) that overlapped the window between
    marks `start` and `end` of `trace` (a Trace.as_dict, taken on this machine)."""
    at = {m["name"]: trace["t0_monotonic"] + m["ms"] / 1e3 for m in trace["marks"]}
    lo, hi = at[start], at[end]
    return max((ms for t, ms in samples if t <= hi and t + ms / 1e3 >= lo), default=0.0)
