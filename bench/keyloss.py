#!/usr/bin/env python3
"""§5.1 of the paper: are keys lost when the VM migrates during remote management?

A client sends one key every 50 ms over VNC (`--rms ssh`: through OpenSSH into the
console; a key counts as sent once the client's socket, or ssh's terminal, took it)
while the guest migrates N times, and we compare what was sent with what the guest
received (its input journal). Three configurations:

  keeper     D-MORE: the servers and backends live in Domain R, which migrates with
             the guest; the client keeps its one connection
  baseline   the conventional set-up: servers in Dom0 on the host's address; the
             guest migrates alone, the client is cut off and reconnects to the new
             host's address (as a person would), and types on
  ablation   keeper with the may-write extension off and the guest handling each
             event 200 ms late (the paper's experiment that shows why it is needed)

Writes bench/out/keyloss.json (every sample) and bench/out/keyloss.png, prints a
table. Needs root (builds and removes its own labs).

    python bench/keyloss.py --migrations 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT, finish, lab, need_root, pyplot, save

from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.lab.vncclient import VncTypist

GUEST = "guest1"


async def guest_ip(spec: LabSpec) -> str | None:
    for d in (await ops.status(spec))["domains"]:
        if d["name"] == GUEST and d["state"] == "running":
            return str(d["ip"])
    return None


async def session(spec: LabSpec, ip: str, rms: str, period: float,
                  work: Path) -> Typist | VncTypist:
    if rms == "vnc":
        return await VncTypist.connect(spec.client_ns, (ip, 5900), period=period)
    link = await SshLink.start(spec.client_ns, ip, key=spec.ssh_dir / "id_ed25519",
                               known_hosts=work / f"known_hosts-{ip}", workdir=work)
    await link.wait_connected()
    await asyncio.sleep(1.0)  # the login settles before the first key
    return Typist(link, f"{GUEST}:~$ ".encode(), period=period)


async def typing(spec: LabSpec, stop: asyncio.Event, period: float, rms: str,
                 rec: dict[str, Any]) -> None:
    """Type until `stop`; reconnect (to wherever the guest's servers are now) when the
    connection breaks, as a person would."""
    work = Path(tempfile.mkdtemp(prefix="keeper-keyloss-"))
    while not stop.is_set():
        ip = await guest_ip(spec)
        if ip is None:
            await asyncio.sleep(0.05)
            continue
        try:
            t = await session(spec, ip, rms, period, work)
        except (OSError, ConnectionError, TimeoutError):
            rec["connect_failures"] += 1
            await asyncio.sleep(0.1)
            continue
        rec["connections"] += 1
        st = await t.run(stop, settle=5.0)
        if isinstance(t, Typist):
            st.retransmits = t.retransmits()
            t.link.close()
        else:
            t.close()
        rec["sent"] += st.sent
        rec["retransmits_client"] += st.retransmits
        rec["latencies_ms"] += st.echo_latencies_ms
        if st.errors and not stop.is_set():
            rec["reconnects"] += 1
            rec["errors"] += st.errors


async def run_config(name: str, migrations: int, mem_mb: int, interval: float,
                     period: float, rms: str) -> dict[str, Any]:
    mode = "baseline" if name == "baseline" else "keeper"
    rec: dict[str, Any] = {"config": name, "rms": rms, "sent": bytearray(), "reconnects": 0,
                           "connections": 0, "connect_failures": 0, "retransmits_client": 0,
                           "latencies_ms": [], "errors": [], "migrations": []}
    async with lab("kl") as spec:
        await ops.create_guest(spec, GUEST, "a", mem_mb=mem_mb, mode=mode,
                               event_delay_ms=200 if name == "ablation" else 0)
        if name == "ablation":
            for h in spec.hosts:
                await ops.call(spec, h.name, "POST", "/vmm/config", json={"may_write": False})
        before = (await ops.journal(spec, GUEST))["count"]
        stop = asyncio.Event()
        task = asyncio.create_task(typing(spec, stop, period, rms, rec))
        await asyncio.sleep(interval)
        where = "a"
        for _ in range(migrations):
            where = "b" if where == "a" else "a"
            server_before = await ops.server_retransmits(spec)
            t0 = time.monotonic()
            trace = await ops.migrate(spec, GUEST, where)
            rec["migrations"].append({
                "to": where, "total_ms": trace["total_ms"], "downtime_ms": trace["downtime_ms"],
                "wall_ms": round((time.monotonic() - t0) * 1e3, 1),
                "retransmits_server_before": server_before})
            await asyncio.sleep(interval)
        stop.set()
        await task
        journal = (await ops.journal(spec, GUEST))["journal"][before:]
        rec["retransmits_server"] = await ops.server_retransmits(spec)
    sent = bytes(rec.pop("sent"))
    rec.update(compare(sent, journal), keys_sent=len(sent), keys_received=len(journal))
    lat = rec["latencies_ms"]
    rec["pause_ms_max"] = round(max(lat, default=0.0), 3)
    rec["pause_ms_median"] = round(statistics.median(lat), 3) if lat else 0.0
    rec["retransmits_per_migration"] = round(rec["retransmits_client"] / max(1, migrations), 2)
    return rec


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    names = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, title in zip(axes, ("lost", "reconnects", "retransmits_per_migration"),
                              ("keys lost", "client reconnects",
                               "TCP retransmissions / migration"), strict=True):
        ax.bar(names, [r[key] for r in results], color=["#2a7", "#c44", "#c93"][:len(names)])
        ax.set_title(title)
    fig.suptitle(f"key loss over {results[0]['migration_count']} migrations, "
                 f"one key every 50 ms over {results[0]['rms'].upper()}")
    finish(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrations", type=int, default=10)
    p.add_argument("--mem-mb", type=int, default=64)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between migrations")
    p.add_argument("--period", type=float, default=0.05, help="seconds between keys")
    p.add_argument("--configs", default="keeper,baseline,ablation")
    p.add_argument("--rms", choices=["vnc", "ssh"], default="vnc",
                   help="type through VNC (the paper's §5.1) or through SSH")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    need_root("bench/keyloss.py")
    results = []
    for name in args.configs.split(","):
        print(f"running {name} ...", file=sys.stderr)
        rec = asyncio.run(run_config(name, args.migrations, args.mem_mb, args.interval,
                                     args.period, args.rms))
        rec["migration_count"] = args.migrations
        results.append(rec)
    print(f"\n{'config':10s} {'sent':>6s} {'recv':>6s} {'lost':>5s} {'dup':>4s} {'reord':>5s} "
          f"{'reconn':>6s} {'retr/mig':>8s} {'pause max ms':>12s}")
    for r in results:
        print(f"{r['config']:10s} {r['keys_sent']:6d} {r['keys_received']:6d} {r['lost']:5d} "
              f"{r['duplicated']:4d} {r['reordered']:5d} {r['reconnects']:6d} "
              f"{r['retransmits_per_migration']:8.2f} {r['pause_ms_max']:12.1f}")
    stem = "keyloss" if args.rms == "vnc" else f"keyloss-{args.rms}"
    path = save(stem, {"args": {k: str(v) for k, v in vars(args).items()},
                       "results": results}, args.out)
    plot(results, path)
    keeper = next((r for r in results if r["config"] == "keeper"), None)
    return 0 if keeper is None or (keeper["lost"] == 0 and keeper["reconnects"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
