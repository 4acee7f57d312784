"""What operators (and the demo, and the tests) do to a lab: the same calls the CLI makes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.errors import KeeperError, LabError, MigrationError
from keeper.hostd import procs, tls
from keeper.hostd.metrics_http import MetricsConfig
from keeper.http import Http
from keeper.lab import sshkeys, topology
from keeper.lab.topology import LabSpec
from keeper.ssh.console import LOGIN

READY_TIMEOUT = 20.0


def agent(spec: LabSpec, host: str, timeout: float = 30.0) -> Http:
    return Http(unix=str(spec.agent_socket(host)), timeout=timeout)


async def call(spec: LabSpec, host: str, method: str, path: str, **kw: Any) -> Any:
    http = agent(spec, host, timeout=kw.pop("timeout", 30.0))
    try:
        return await http.call(method, path, **kw)
    finally:
        await http.close()


async def up(name: str = "keeper", hosts: tuple[str, ...] = ("a", "b"),
             ssh_authorized_keys: Path | None = None,
             metrics: MetricsConfig | None = None) -> LabSpec:
    """Build the network and start one agent per host. Idempotent. `metrics`: how the
    agents serve /metrics (TLS, basic auth; default plain HTTP on port 9464), for
    agents started by this call."""
    try:
        spec = topology.load(name)
    except LabError:
        spec = topology.spec_for(name, hosts)
    await asyncio.to_thread(topology.build_network, spec)
    if metrics is not None:
        metrics.save_for_lab(spec.rundir)
    # the agents' peer channel: mutual TLS with a CA made for this lab
    tls.make_lab_pki(spec.pki, {h.name: h.mgmt_ip for h in spec.hosts})
    sshkeys.ensure_login_key(spec, ssh_authorized_keys)
    for h in spec.hosts:
        sock = spec.agent_socket(h.name)
        pidf = procs.pidfile(spec.rundir, f"hostd-{h.name}")
        if pidf.exists() and procs.alive(int(pidf.read_text())) and sock.exists():
            continue
        procs.spawn(spec.rundir, f"hostd-{h.name}",
                    ["hostd", "--lab", spec.name, "--host", h.name])
    for h in spec.hosts:
        await _wait_agent(spec, h.name)
    return spec


async def _wait_agent(spec: LabSpec, host: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await call(spec, host, "GET", "/status", timeout=2)
            return
        except KeeperError as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise LabError(f"host agent {host} not ready after {READY_TIMEOUT:.0f} s: {last}; "
                   f"see {spec.rundir / f'hostd-{host}.log'}")


async def status(spec: LabSpec) -> dict[str, Any]:
    hosts = []
    for h in spec.hosts:
        try:
            hosts.append(await call(spec, h.name, "GET", "/status", timeout=10))
        except KeeperError as exc:
            hosts.append({"host": h.name, "mgmt_ip": h.mgmt_ip, "netns": h.ns,
                          "error": str(exc), "domrs": [], "metrics_url": None})
    key = sshkeys.login_key(spec)
    return {
        "lab": spec.name, "client_netns": spec.client_ns, "client_ip": spec.client_ip,
        "ssh": {"login": LOGIN, "key": str(key) if key else None},
        "switch_netns": spec.switch_ns, "hosts": hosts,
        # Domain Rs, and the baseline's QEMU servers (no Domain R: on the host's address)
        "domains": [_domain(h, d) for h in hosts
                    for d in [*h["domrs"], *h.get("servers", [])]],
    }


def _domain(host: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    g = next((g for g in host.get("guests", []) if g["name"] == d["name"]), None)
    doc = {"name": d["name"], "host": host["host"], "ip": d["ip"], "mac": d["mac"],
           "state": d["state"], "services": d.get("services", {}), "guest": g is not None,
           "mem_bytes": g["mem_bytes"] if g else None}
    doc["mode"] = "baseline" if d.get("baseline") else "keeper"
    # a guest's Domain R serves its screen to browsers (noVNC) on its own address
    doc["web_url"] = (f"http://{d['ip']}:{ports.WEB}/" if g is not None
                      and doc["mode"] == "keeper" else None)
    if g is not None:
        doc["kind"] = g.get("kind", "sim")
        if doc["kind"] == "qemu":
            doc.update(accel=g.get("accel"), kernel=g.get("kernel"))
    return doc


async def server_retransmits(spec: LabSpec) -> int:
    """TCP retransmissions counted by every Domain R session socket in the lab now."""
    total = 0
    for h in (await status(spec))["hosts"]:
        for d in h["domrs"]:
            total += sum(s.get("retransmits", 0) for s in d.get("domr", {}).get("sessions", []))
    return total


async def where(spec: LabSpec, dom: str) -> str:
    for d in (await status(spec))["domains"]:
        if d["name"] == dom and d["state"] != "incoming":
            return str(d["host"])
    raise LabError(f"no Domain R {dom!r} in lab {spec.name}")


async def free_index(spec: LabSpec) -> int:
    """The lowest Domain R address index (IP .100+N) no domain of the lab uses."""
    used = {d["ip"] for d in (await status(spec))["domains"]}
    return next(i for i in range(1, 150) if spec.domr_ip(i) not in used)


async def create_domr(spec: LabSpec, dom: str, host: str, *, index: int | None = None,
                      announce: bool = True,
                      announce_schedule: str = DEFAULT_SCHEDULE) -> dict[str, Any]:
    if index is None:
        index = await free_index(spec)
    return await call(spec, host, "POST", "/domr",
                      json={"name": dom, "ip": spec.domr_ip(index),
                            "mac": spec.domr_mac(index), "announce": announce,
                            "announce_schedule": announce_schedule})


async def migrate(spec: LabSpec, dom: str, to: str,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Move guest `dom` (Domain U + Domain R, co-migration) or a stand-alone Domain R."""
    spec.host(to)
    doc = next((d for d in (await status(spec))["domains"]
                if d["name"] == dom and d["state"] != "incoming"), None)
    if doc is None:
        raise LabError(f"no domain {dom!r} in lab {spec.name}")
    source = str(doc["host"])
    if not doc["guest"]:
        return await call(spec, source, "POST", f"/domr/{dom}/migrate", json={"to": to},
                          timeout=120)
    http = agent(spec, source)
    try:
        async for line in http.lines("POST", f"/guest/{dom}/migrate", json={"to": to}):
            if line.get("done"):
                if "error" in line:
                    raise MigrationError(line["error"])
                return dict(line["summary"])
            if progress is not None:
                progress(line)
    finally:
        await http.close()
    raise MigrationError(f"migration of {dom}: the agent on {source} stopped answering")


async def create_guest(spec: LabSpec, name: str, host: str, *, index: int | None = None,
                       mem_mb: int = 256, event_delay_ms: float = 0.0,
                       dirty_rate: float = 0.0, announce: bool = True,
                       mode: str = "keeper", guest: str = "sim") -> dict[str, Any]:
    """A guest pair: Domain U + its Domain R (mode "keeper"), or Domain U with its
    servers in Dom0 on the host's address (mode "baseline", the conventional set-up).
    `guest` "sim" is keeper's simulated guest, "qemu" a real Linux VM under QEMU."""
    if index is None:
        index = await free_index(spec)
    return await call(spec, host, "POST", "/guest", timeout=180, json={
        "name": name, "ip": spec.domr_ip(index), "mac": spec.domr_mac(index),
        "mem_mb": mem_mb, "event_delay_ms": event_delay_ms, "dirty_rate": dirty_rate,
        "announce": announce, "mode": mode, "guest": guest})


async def screen(spec: LabSpec, name: str) -> bytes:
    """The guest's framebuffer as its memory holds it (800x600, BGRX)."""
    host = await where(spec, name)
    http = agent(spec, host)
    try:
        body, _ = await http.request("GET", f"/guest/{name}/screen")
    finally:
        await http.close()
    return body


async def journal(spec: LabSpec, name: str) -> dict[str, Any]:
    host = await where(spec, name)
    doc = await call(spec, host, "GET", f"/guest/{name}/journal")
    doc["journal"] = bytes.fromhex(doc["journal"])
    return dict(doc)


async def settled_journal(spec: LabSpec, name: str, before: int, want: int,
                          timeout: float) -> bytes:
    """The journal's bytes since entry `before`, once `want` of them came (or after
    `timeout` s, as they are): the last keys may still be on their way (a resend
    through loss, a busy guest) when the client has stopped typing."""
    deadline = time.monotonic() + timeout
    while True:
        got = (await journal(spec, name))["journal"][before:]
        if len(got) >= want or time.monotonic() > deadline:
            return bytes(got)
        await asyncio.sleep(0.2)
