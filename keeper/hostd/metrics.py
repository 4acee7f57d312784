"""The host agent's Prometheus metrics, defined in one place (keeper_<part>_<what>_<unit>).

Counters and histograms are updated when a migration ends; what is costly or only
meaningful at scrape time (domains, sessions) is read then, by a collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()

MIGRATIONS = Counter("keeper_hostd_migrations_total", "Co-migrations started here, by result",
                     ["result"], registry=REGISTRY)
MIGRATION_SECONDS = Histogram(
    "keeper_hostd_migration_duration_seconds", "Co-migration time, start to Domain R resumed",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
DOWNTIME_SECONDS = Histogram(
    "keeper_hostd_downtime_seconds", "Time a domain was stopped during a co-migration",
    ["domain"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=REGISTRY)
PAGES_SENT = Counter("keeper_hostd_pages_sent_total", "Guest pages sent by pre-copy rounds",
                     registry=REGISTRY)
PAGES_RECEIVED = Counter("keeper_hostd_pages_received_total",
                         "Guest pages received from other hosts", registry=REGISTRY)
ROUNDS = Counter("keeper_hostd_precopy_rounds_total", "Pre-copy rounds, final ones included",
                 registry=REGISTRY)


def observe_migration(summary: dict[str, Any]) -> None:
    MIGRATIONS.labels(result="ok").inc()
    MIGRATION_SECONDS.observe(summary["total_ms"] / 1e3)
    for dom, ms in summary["downtime_ms"].items():
        DOWNTIME_SECONDS.labels(domain=dom).observe(ms / 1e3)
    PAGES_SENT.inc(sum(r["pages"] for r in summary["rounds"]))
    ROUNDS.inc(len(summary["rounds"]))


class Observed(Protocol):
    """What the scrape-time gauges read (the host agent)."""

    hv: Any
    guests: Any


class _Live:
    """Gauges read at scrape time from the agent's state."""

    def __init__(self) -> None:
        self.agent: Observed | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agent = self.agent
        if agent is None:
            return
        doms = GaugeMetricFamily("keeper_hostd_domains", "Domains on this host, by kind",
                                 labels=["kind"])
        for kind in ("U", "R"):
            doms.add_metric([kind], sum(1 for d in agent.hv.domains.values()
                                        if d.kind.value == kind))
        yield doms
        mem = GaugeMetricFamily("keeper_hostd_guest_memory_bytes", "Guest memory, by guest",
                                labels=["guest"])
        for g in agent.guests.entries.values():
            mem.add_metric([g.name], g.u.pages * 4096)
        yield mem
        yield GaugeMetricFamily("keeper_hostd_may_write_enabled",
                                "1 if the D-MORE may-write extension is on",
                                value=int(agent.hv.may_write_enabled))


_live = _Live()
REGISTRY.register(_live)  # type: ignore[arg-type]


def render(agent: Observed) -> tuple[bytes, str]:
    _live.agent = agent
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
