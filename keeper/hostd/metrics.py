"""The host agent's Prometheus metrics, defined in one place (keeper_<part>_<what>_<unit>).

Counters and histograms are updated when a migration ends; what is costly or only
meaningful at scrape time (domains, sessions) is read then, by a collector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keeper.errors import KeeperError

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
RMS = ("console", "ssh", "vnc", "web")
SESSIONS_MOVED = Counter("keeper_hostd_sessions_moved_total",
                         "Client sessions moved with their Domain R, by RMS", ["rms"],
                         registry=REGISTRY)
SESSIONS_LEFT = Counter("keeper_hostd_sessions_left_behind_total",
                        "Client sessions that could not move (they went on at the source "
                        "until it exited), by RMS", ["rms"], registry=REGISTRY)
KEYS_HELD = Counter("keeper_hostd_keys_held_total",
                    "Client input Domain R held across a switchover and delivered on the "
                    "target, by RMS (console: bytes, vnc and web: key presses)", ["rms"],
                    registry=REGISTRY)
CLIENT_RETRANSMITS = Counter(
    "keeper_hostd_client_retransmits_total",
    "Client TCP segments to a migrating Domain R seen again on this host's wire "
    "(retransmissions; keeper.net.wiretap)", registry=REGISTRY)
MIGRATION_RETRANSMITS = Histogram(
    "keeper_hostd_migration_client_retransmits",
    "Client TCP retransmissions per co-migration, source and target wire together",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
CLIENT_PAUSE_SECONDS = Histogram(
    "keeper_hostd_client_pause_seconds",
    "Per co-migration, the pause clients saw: Domain R stopped until the first client "
    "retransmission reached the target (Domain R's downtime if none was needed)",
    buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4), registry=REGISTRY)


def observe_migration(summary: dict[str, Any]) -> None:
    MIGRATIONS.labels(result="ok").inc()
    MIGRATION_SECONDS.observe(summary["total_ms"] / 1e3)
    for dom, ms in summary["downtime_ms"].items():
        DOWNTIME_SECONDS.labels(domain=dom).observe(ms / 1e3)
    PAGES_SENT.inc(sum(r["pages"] for r in summary["rounds"]))
    ROUNDS.inc(len(summary["rounds"]))
    for rms, counts in summary.get("by_rms", {}).items():
        SESSIONS_MOVED.labels(rms=rms).inc(counts.get("moved", 0))
        SESSIONS_LEFT.labels(rms=rms).inc(counts.get("left_behind", 0))
        KEYS_HELD.labels(rms=rms).inc(counts.get("keys_held", 0))


for _rms in RMS:  # every series exists from the start, at 0
    SESSIONS_MOVED.labels(rms=_rms)
    SESSIONS_LEFT.labels(rms=_rms)
    KEYS_HELD.labels(rms=_rms)
for _result in ("ok", "rolled_back"):
    MIGRATIONS.labels(result=_result)


def observe_client_side(retransmits: int, pause_s: float) -> None:
    """What a co-migration cost its clients, once the target's wire window closed."""
    MIGRATION_RETRANSMITS.observe(retransmits)
    CLIENT_PAUSE_SECONDS.observe(pause_s)


class Observed(Protocol):
    """What the scrape-time gauges read (the host agent)."""

    hv: Any
    guests: Any
    domrs: Any


# where each RMS's sessions are in a Domain R's /status (keeper.domr.server.STATUS_KEYS)
_STATUS_KEYS = {"console": "sessions", "ssh": "ssh_sessions", "vnc": "vnc_sessions",
                "web": "web_sessions"}
DOMR_TIMEOUT = 2.0


class _Live:
    """Gauges read at scrape time from the agent's state and its Domain Rs'."""

    def __init__(self) -> None:
        self.agent: Observed | None = None
        self.domrs: dict[str, dict[str, Any] | None] = {}  # name -> /status (None: no answer)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agent = self.agent
        if agent is None:
            return
        up = GaugeMetricFamily("keeper_domr_up", "1 if this host's Domain R answered its "
                               "agent at this scrape", labels=["domr"])
        sessions = GaugeMetricFamily("keeper_domr_sessions",
                                     "Client sessions a Domain R serves now, by RMS",
                                     labels=["domr", "rms"])
        for name, doc in sorted(self.domrs.items()):
            up.add_metric([name], int(doc is not None))
            for rms, key in _STATUS_KEYS.items():
                if doc is not None:
                    sessions.add_metric([name, rms], len(doc.get(key) or []))
        yield up
        yield sessions
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


async def page(agent: Observed) -> tuple[bytes, str]:
    """The whole page: the Domain Rs serving here are asked first (each at most
    DOMR_TIMEOUT; one that does not answer is `keeper_domr_up 0`). One in the middle
    of a move is left out: it is counted where it serves."""
    async def ask(entry: Any) -> dict[str, Any] | None:
        try:
            doc = await entry.control.call("GET", "/status", timeout=DOMR_TIMEOUT)
        except (TimeoutError, KeeperError, OSError):
            return None
        return doc if isinstance(doc, dict) else None

    entries = [e for e in agent.domrs.values() if e.state == "running" and not e.baseline]
    docs = await asyncio.gather(*(ask(e) for e in entries))
    _live.domrs = {e.name: d for e, d in zip(entries, docs, strict=True)}
    return render(agent)
