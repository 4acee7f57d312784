"""A real Prometheus server (Debian's `prometheus`) scrapes both host agents of a lab over
HTTPS with basic auth while a guest co-migrates twice with a client typing into its
console; its HTTP API then shows every target up, the migrations counted and the
clients' TCP retransmissions (root: the whole lab; Prometheus runs in the lab's client
namespace, on the management network, with a temporary config and storage, and is
killed by PID afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keeper import ports
from keeper.hostd import metrics_http
from keeper.hostd.metrics_http import MetricsConfig
from keeper.lab import ops, topology
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.net import netns
from tests.conftest import lab_processes, unique

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="Debian's prometheus is not installed")]

GUEST, PROMPT = "guest1", b"guest1:~$ "
USER, PASSWORD = "prometheus", "lab scrape secret"
PROM_PORT = 9090
DEADLINE = 60.0  # for Prometheus to start and to see what happened (a scrape a second)


@pytest.fixture
async def secured_lab(tmp_path: Path) -> AsyncIterator[tuple[LabSpec, Path]]:
    """A lab whose agents serve /metrics over TLS (the lab PKI) with basic auth."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{USER}:{metrics_http.hash_password(PASSWORD)}\n")
    name = unique()
    try:
        spec = await ops.up(name, metrics=MetricsConfig(tls=True, htpasswd=htpasswd))
        yield spec, tmp_path
    finally:
        topology.down(name)
        leftovers = [ns for ns in netns.netns.listnetns() if ns.startswith(f"{name}-")]
        assert not leftovers, f"lab left namespaces behind: {leftovers}"
        assert not lab_processes(name), f"lab left processes behind: {lab_processes(name)}"


@contextlib.asynccontextmanager
async def prometheus(spec: LabSpec, workdir: Path, targets: list[str]
                     ) -> AsyncIterator[asyncio.subprocess.Process]:
    (workdir / "password").write_text(PASSWORD)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{
            "job_name": "keeper",
            "scheme": "https",
            "tls_config": {"ca_file": str(spec.pki / "ca.crt")},
            "basic_auth": {"username": USER, "password_file": str(workdir / "password")},
            "static_configs": [{"targets": targets}],
        }],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = (workdir / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "prometheus", f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={spec.client_ip}:{PROM_PORT}",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        preexec_fn=lambda: netns.enter(spec.client_ns))
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


def _get(spec: LabSpec, path: str) -> Any:
    with netns.entered(spec.client_ns), urllib.request.urlopen(
            f"http://{spec.client_ip}:{PROM_PORT}{path}", timeout=5) as r:
        return json.loads(r.read())


async def query(spec: LabSpec, expr: str) -> list[dict[str, Any]]:
    """Prometheus' instant query API: the result vector."""
    doc = await asyncio.to_thread(
        _get, spec, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


async def value(spec: LabSpec, expr: str) -> float | None:
    result = await query(spec, expr)
    return float(result[0]["value"][1]) if result else None


async def until(spec: LabSpec, expr: str, ok: Any, proc: asyncio.subprocess.Process,
                workdir: Path) -> float:
    """Poll `expr` until `ok(value)`; fail with what Prometheus last said."""
    deadline, last = time.monotonic() + DEADLINE, None
    while time.monotonic() < deadline:
        assert proc.returncode is None, (workdir / "prometheus.log").read_text()[-2000:]
        with contextlib.suppress(OSError):
            last = await value(spec, expr)
            if last is not None and ok(last):
                return last
        await asyncio.sleep(0.5)
    targets = await asyncio.to_thread(_get, spec, "/api/v1/targets")
    raise AssertionError(f"{expr} = {last}; targets: {json.dumps(targets)[:1500]}")


async def test_prometheus_scrapes_both_agents_through_two_comigrations(
        secured_lab: tuple[LabSpec, Path]) -> None:
    spec, workdir = secured_lab
    status = await ops.status(spec)
    urls = {h["host"]: h["metrics_url"] for h in status["hosts"]}
    assert urls == {h.name: f"https://{h.mgmt_ip}:{ports.METRICS}/metrics" for h in spec.hosts}
    doc = await ops.create_guest(spec, GUEST, "a", dirty_rate=200)
    dom = next(d for d in (await ops.status(spec))["domains"] if d["name"] == GUEST)
    assert dom["web_url"] == f"http://{doc['ip']}:{ports.WEB}/"
    targets = [u.removeprefix("https://").removesuffix("/metrics") for u in urls.values()]
    async with prometheus(spec, workdir, targets) as proc:
        for t in targets:
            await until(spec, f'up{{instance="{t}"}}', lambda v: v == 1, proc, workdir)
        before = await value(spec, 'sum(keeper_hostd_migrations_total{result="ok"})')
        retrans_before = await value(spec, "sum(keeper_hostd_client_retransmits_total)")
        assert (before, retrans_before) == (0, 0)
        before_journal = (await ops.journal(spec, GUEST))["count"]
        # a client types fast (every 10 ms), so keys land in Domain R's pauses
        typist = await Typist.over_tcp(spec.client_ns, (doc["ip"], ports.CONSOLE), PROMPT,
                                       period=0.01)
        stop = asyncio.Event()
        typing = asyncio.create_task(typist.run(stop))
        try:
            await asyncio.sleep(0.5)
            for target in ("b", "a"):
                await ops.migrate(spec, GUEST, target)
                await asyncio.sleep(0.5)
            # Domain R's own numbers, through its agent: the typist's console session
            await until(spec, 'keeper_domr_sessions{domr="guest1",rms="console"}',
                        lambda v: v == 1, proc, workdir)
        finally:
            stop.set()
            stats = await typing
            typist.close()
        journal = (await ops.journal(spec, GUEST))["journal"][before_journal:]
        assert not stats.errors
        assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0,
                                                       "reordered": 0}
        client_own = stats.retransmits  # the client kernel's count (TCP_INFO)
        assert client_own > 0  # the pauses did cost retransmissions
        # what Prometheus saw: every target up all along, two migrations, and the
        # retransmissions (each migration observed once both wires were judged)
        await until(spec, 'sum(keeper_hostd_migrations_total{result="ok"})',
                    lambda v: v == 2, proc, workdir)
        await until(spec, "sum(keeper_hostd_migration_client_retransmits_count)",
                    lambda v: v == 2, proc, workdir)
        # complete now (both observed, on the source); the counter is counted on each
        # host's own wire, and each agent is scraped on its own beat: it catches up
        per_migration = await value(spec, "sum(keeper_hostd_migration_client_retransmits_sum)")
        seen = await until(spec, "sum(keeper_hostd_client_retransmits_total)",
                           lambda v: v == per_migration, proc, workdir)
        assert 0 < seen <= client_own
        scrapes = {}
        for t in targets:
            assert await value(spec, f'up{{instance="{t}"}}') == 1
            # how many scrapes there were, and how many answered in time (a scrape can
            # time out on a loaded machine: reported, not a test of speed)
            scrapes[t] = (await value(spec, f'count_over_time(up{{instance="{t}"}}[5m])'),
                          await value(spec, f'sum_over_time(up{{instance="{t}"}}[5m])'))
            assert scrapes[t][1] > 0
        assert await until(spec, "sum(keeper_hostd_downtime_seconds_count)",
                           lambda v: v == 4, proc, workdir) == 4  # U and R, twice
        assert await value(spec, "sum(keeper_hostd_client_pause_seconds_count)") == 2
        await until(spec, 'sum(keeper_hostd_sessions_moved_total{rms="console"})',
                    lambda v: v == 2, proc, workdir)
        await until(spec, 'keeper_domr_sessions{domr="guest1",rms="console"}',
                    lambda v: v == 0, proc, workdir)  # the typist left
        assert await value(spec, 'keeper_domr_up{domr="guest1"}') == 1
        print(f"client retransmissions: on the wire {seen:.0f}, the client's own "
              f"{client_own}; scrapes (all, answered): {scrapes}")
