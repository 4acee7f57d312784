#!/usr/bin/env python3
"""§5.1 of the paper: are keys lost when the VM migrates during remote management?

A client sends one key every 50 ms over VNC (`--rms ssh`: through OpenSSH into the
console; a key counts as sent once the client's socket, or ssh's terminal, took it)
while the guest migrates N times, and we compare what was sent with what the guest
received (its input journal). Three configurations:

  keeper     D-MORE: the servers and backends live in Domain R, which migrates with
             the guest; the client keeps its one connection
  baseline   the conventional set-up: servers in Dom0 on the host's address; the
             guest migrates alone, in Xen's order: the source's servers keep
             reading the client's keys into the stopped guest's devices until the
             source domain is destroyed (what they read after the final copy is
             lost: the paper's 1.4 keys per run), then the client is cut off,
             reconnects to the new host's address (as a person would), and types on
  ablation   keeper with the may-write extension off and the guest handling each
             event 200 ms late (the paper's experiment that shows why it is needed)

With `--guest qemu` the guest is a real Linux VM under QEMU (128 MiB) and the keys
are counted from the guest kernel's own journal. keeper's row types through Domain
R (`--rms ssh`: OpenSSH into the serial console; `console`: raw TCP; `vnc`:
keeper's RFB client). The baseline is the stock QEMU set-up, no Domain R: QEMU's
own serial chardev (2323) and VNC server (5900) on the host's management address;
it has no SSH server, so for `--rms ssh` its client is a raw TCP client of that
chardev; for `vnc` a viewer of QEMU's VNC server that sends Shift itself (QEMU maps
keysyms through its keymap). The ablation is the simulated guest's only.

Writes bench/out/keyloss.json (every sample) and bench/out/keyloss.png, prints a
table (with `--json`, then one JSON line last: every row). Needs root (builds and
removes its own labs).

    python bench/keyloss.py --migrations 10
    python bench/keyloss.py --guest qemu --rms ssh --migrations 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT, finish, lab, need_root, pyplot, quiet, save

from keeper import ports
from keeper.lab import ops
from keeper.lab.sshclient import SshLink
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.lab.vncclient import VncTypist
from keeper.qemu.image import PROMPT as QEMU_PROMPT
from keeper.qemu.image import TYPIST as QEMU_TYPIST
from keeper.vnc.keysyms import keysym_to_keys

GUEST = "guest1"
XK_SHIFT_L = 0xFFE1
QUIET_S = 0.4  # a QEMU guest's console says nothing for this long: it has caught up


class ViewerVncTypist(VncTypist):
    """A VNC viewer as a person's: Shift down around the keys that need it ('#').
    QEMU's own VNC server maps a keysym through its keymap and adds no Shift; Domain
    R's does not need it (it types the key with Shift itself)."""

    async def _key(self, ch: int) -> None:
        keys = keysym_to_keys(ch)
        if keys is None or not keys[1]:
            await super()._key(ch)
            return
        self.w.write(struct.pack(">BBxxI", 4, 1, XK_SHIFT_L))
        await super()._key(ch)
        self.w.write(struct.pack(">BBxxI", 4, 0, XK_SHIFT_L))
        await self.w.drain()


def client_of(config: str, rms: str, guest: str) -> str:
    """What types, and where to (said in the output)."""
    if guest == "qemu" and config == "baseline":
        if rms == "vnc":
            return "RFB viewer (Shift sent) -> QEMU's own VNC server, host address :5900"
        return ("raw TCP -> QEMU's serial chardev, host address :2323 (the stock set-up "
                "has no SSH server)" if rms == "ssh" else
                "raw TCP -> QEMU's serial chardev, host address :2323")
    where = "Dom0 servers, host address" if config == "baseline" else "Domain R"
    return {"vnc": f"RFB client -> {where} :5900", "ssh": f"OpenSSH -> {where} :22",
            "console": f"raw TCP -> {where} :2323"}[rms]


async def guest_ip(spec: LabSpec) -> str | None:
    for d in (await ops.status(spec))["domains"]:
        if d["name"] == GUEST and d["state"] == "running":
            return str(d["ip"])
    return None


async def session(spec: LabSpec, ip: str, rms: str, period: float, work: Path, *,
                  guest: str = "sim", config: str = "keeper",
                  connection: int = 0) -> Typist | VncTypist:
    qemu = guest == "qemu"
    prompt = QEMU_PROMPT if qemu else f"{GUEST}:~$ ".encode()
    extra: dict[str, Any] = dict(QEMU_TYPIST) if qemu else {}
    qemu_baseline = qemu and config == "baseline"
    if rms == "vnc":
        if not qemu_baseline:
            return await VncTypist.connect(spec.client_ns, (ip, ports.VNC), period=period)
        v = await ViewerVncTypist.connect(spec.client_ns, (ip, ports.VNC), period=period)
        for key in b"# c%03d\r" % connection:  # the connection's mark (see below)
            await v._key(key)  # paced: QEMU's PS/2 queue holds 16 bytes
            await asyncio.sleep(period)
        v._waiting.clear()  # no echo timing for the mark
        return v
    if rms == "console" or qemu_baseline:  # QEMU's stock set-up has no SSH server
        t = await Typist.over_tcp(spec.client_ns, (ip, ports.CONSOLE), prompt, period,
                                  **extra)
        if qemu:
            # a TCG guest may still echo what the last client typed: that goes to
            # whoever is connected now; start once the console is quiet
            await quiet(t.link, QUIET_S)
        if qemu_baseline:
            # as a person does on a serial console they just reached: Enter, for a
            # fresh prompt (the cut-off client left a line half typed), here after a
            # comment naming the connection, so that the journal's sessions line up
            # with what each connection typed (every one starts at line 0). Keys
            # typed like the others: counted as sent
            mark = b"# c%03d\r" % connection
            await t.link.send(mark)
            t.stats.sent += mark
            await quiet(t.link, QUIET_S)
        return t
    link = await SshLink.start(spec.client_ns, ip, key=spec.ssh_dir / "id_ed25519",
                               known_hosts=work / f"known_hosts-{ip}", workdir=work)
    await link.wait_connected()
    await asyncio.sleep(1.0)  # the login settles before the first key
    return Typist(link, prompt, period=period, **extra)


async def typing(spec: LabSpec, stop: asyncio.Event, period: float, rms: str,
                 rec: dict[str, Any], guest: str = "sim") -> None:
    """Type until `stop`; reconnect (to wherever the guest's servers are now) when the
    connection breaks, as a person would."""
    work = Path(tempfile.mkdtemp(prefix="keeper-keyloss-"))
    while not stop.is_set():
        ip = await guest_ip(spec)
        if ip is None:
            await asyncio.sleep(0.05)
            continue
        try:
            t = await session(spec, ip, rms, period, work, guest=guest,
                              config=rec["config"], connection=rec["connections"])
        except (OSError, ConnectionError, TimeoutError):
            rec["connect_failures"] += 1
            await asyncio.sleep(0.1)
            continue
        rec["connections"] += 1
        rec.setdefault("connected_at", []).append(time.monotonic())
        st = await t.run(stop, settle=5.0)
        if isinstance(t, Typist):
            st.retransmits = t.retransmits()
            t.link.close()
        else:
            t.close()
        rec["sent"] += st.sent
        rec["sessions"].append({"ip": ip, "sent": len(st.sent), "errors": st.errors[:3]})
        rec["retransmits_client"] += st.retransmits
        rec["latencies_ms"] += st.echo_latencies_ms
        rec.setdefault("samples", []).extend(st.samples)  # (sent at, ms): bench/downtime.py
        if st.errors and not stop.is_set():
            rec["reconnects"] += 1
            rec["errors"] += st.errors


async def run_config(name: str, migrations: int, mem_mb: int, interval: float,
                     period: float, rms: str, guest: str = "sim") -> dict[str, Any]:
    mode = "baseline" if name == "baseline" else "keeper"
    rec: dict[str, Any] = {"config": name, "rms": rms, "guest": guest,
                           "client": client_of(name, rms, guest), "sent": bytearray(),
                           "reconnects": 0, "connections": 0, "connect_failures": 0,
                           "retransmits_client": 0, "latencies_ms": [], "errors": [],
                           "sessions": [], "migrations": []}
    async with lab("kl") as spec:
        await ops.create_guest(spec, GUEST, "a", mem_mb=mem_mb, mode=mode, guest=guest,
                               event_delay_ms=200 if name == "ablation" else 0)
        if name == "ablation":
            for h in spec.hosts:
                await ops.call(spec, h.name, "POST", "/vmm/config", json={"may_write": False})
        before = (await ops.journal(spec, GUEST))["count"]
        stop = asyncio.Event()
        task = asyncio.create_task(typing(spec, stop, period, rms, rec, guest))
        await asyncio.sleep(interval)
        where = "a"
        for _ in range(migrations):
            where = "b" if where == "a" else "a"
            server_before = await ops.server_retransmits(spec)
            t0 = time.monotonic()
            trace = await ops.migrate(spec, GUEST, where)
            rec["migrations"].append({
                "to": where, "total_ms": trace["total_ms"], "downtime_ms": trace["downtime_ms"],
                # the baseline: how long the source's servers fed the guest after its
                # final copy (the keys they read meanwhile are lost)
                "after_final_copy_ms": trace["downtime_ms"].get("after_final_copy"),
                "qemu_downtime_ms": trace.get("qemu_downtime_ms"),
                "wall_ms": round((time.monotonic() - t0) * 1e3, 1),
                "retransmits_server_before": server_before})
            await asyncio.sleep(interval)
        stop.set()
        await task
        journal = await settled_journal(spec, len(rec["sent"]), before)
        rec["retransmits_server"] = await ops.server_retransmits(spec)
    sent = bytes(rec.pop("sent"))
    # missing: sent minus received, whatever the alignment (`lost` and `duplicated` are
    # difflib's: a client that restarts its script on every connection repeats lines)
    rec.update(compare(sent, journal), keys_sent=len(sent), keys_received=len(journal),
               missing=len(sent) - len(journal),
               sent_text=sent.decode("latin-1"), journal_text=journal.decode("latin-1"))
    lat = rec["latencies_ms"]
    rec["pause_ms_max"] = round(max(lat, default=0.0), 3)
    rec["pause_ms_median"] = round(statistics.median(lat), 3) if lat else 0.0
    rec["retransmits_per_migration"] = round(rec["retransmits_client"] / max(1, migrations), 2)
    return rec


async def settled_journal(spec: LabSpec, want: int, before: int) -> bytes:
    """The guest's journal since `before`, once it holds `want` bytes or stops growing
    (a QEMU guest writes it a moment after the keys arrive)."""
    journal, last_len, still = b"", -1, 0
    for _ in range(50):
        journal = (await ops.journal(spec, GUEST))["journal"][before:]
        if len(journal) >= want:
            break
        still = still + 1 if len(journal) == last_len else 0
        if still >= 5:
            break
        last_len = len(journal)
        await asyncio.sleep(0.1)
    return journal


def brief(r: dict[str, Any]) -> dict[str, Any]:
    """A row without its samples: what the summary line says."""
    mig = r["migrations"]

    def med(key: str) -> float | None:
        vals = [m[key] for m in mig if m.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    out = {k: r[k] for k in ("config", "rms", "guest", "client", "keys_sent", "keys_received",
                             "missing", "lost", "duplicated", "reordered", "reconnects",
                             "connections",
                             "connect_failures", "retransmits_per_migration", "pause_ms_max",
                             "pause_ms_median", "migration_count")}
    out["downtime_u_ms_median"] = round(statistics.median(
        [m["downtime_ms"]["U"] for m in mig]), 3) if mig else None
    out["missing_per_migration"] = round(r["missing"] / max(1, len(mig)), 2)
    # the baseline: the source's servers' reading after the final copy, and the keys a
    # client typing one every `period` sends in that time (what is lost there)
    out["after_final_copy_ms_median"] = med("after_final_copy_ms")
    out["qemu_downtime_ms_median"] = med("qemu_downtime_ms")
    out["migration_wall_ms_median"] = med("wall_ms")
    return out


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
    p.add_argument("--guest", choices=["sim", "qemu"], default="sim",
                   help="keeper's simulated guest, or a real Linux VM under QEMU")
    p.add_argument("--mem-mb", type=int, default=None, help="default: 64 (sim), 128 (qemu)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between migrations")
    p.add_argument("--period", type=float, default=0.05, help="seconds between keys")
    p.add_argument("--configs", default=None,
                   help="default: keeper,baseline,ablation (sim), keeper,baseline (qemu)")
    p.add_argument("--rms", choices=["vnc", "ssh", "console"], default="vnc",
                   help="type through VNC (the paper's §5.1), SSH or the raw console")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", action="store_true", help="print one JSON line last: every row")
    args = p.parse_args(argv)
    qemu = args.guest == "qemu"
    mem_mb = args.mem_mb or (128 if qemu else 64)
    configs = (args.configs or ("keeper,baseline" if qemu else "keeper,baseline,ablation")
               ).split(",")
    if qemu and "ablation" in configs:
        p.error("the ablation (may-write off) is the simulated guest's only")
    need_root("bench/keyloss.py")
    results = []
    for name in configs:
        print(f"running {name} ({client_of(name, args.rms, args.guest)}) ...", file=sys.stderr)
        rec = asyncio.run(run_config(name, args.migrations, mem_mb, args.interval,
                                     args.period, args.rms, args.guest))
        rec["migration_count"] = args.migrations
        results.append(rec)
    print(f"\n{args.guest} guest, {mem_mb} MiB, {args.migrations} migrations, one key every "
          f"{args.period * 1e3:.0f} ms over {args.rms}; lost keys from the guest's journal")
    print(f"{'config':10s} {'sent':>6s} {'recv':>6s} {'lost':>5s} {'miss/mig':>8s} "
          f"{'dup':>4s} {'reord':>5s} {'reconn':>6s} {'retr/mig':>8s} {'pause max ms':>12s}"
          f"  client")
    for r in results:
        b = brief(r)
        print(f"{r['config']:10s} {r['keys_sent']:6d} {r['keys_received']:6d} {r['lost']:5d} "
              f"{b['missing_per_migration']:8.2f} "
              f"{r['duplicated']:4d} {r['reordered']:5d} {r['reconnects']:6d} "
              f"{r['retransmits_per_migration']:8.2f} {r['pause_ms_max']:12.1f}  "
              f"{r['client']}")
    for r in results:
        fed = brief(r)["after_final_copy_ms_median"]
        if fed is not None:
            print(f"{r['config']}: the source's servers fed the guest {fed:.0f} ms (median) "
                  f"after its final copy; at one key every {args.period * 1e3:.0f} ms that "
                  f"is {fed / 1e3 / args.period:.1f} keys per migration read and lost there")
    stem = "keyloss" if args.rms == "vnc" else f"keyloss-{args.rms}"
    if qemu:
        stem += "-qemu"
    path = save(stem, {"args": {k: str(v) for k, v in vars(args).items()},
                       "results": results}, args.out)
    plot(results, path)
    keeper = next((r for r in results if r["config"] == "keeper"), None)
    good = keeper is None or (keeper["lost"] == 0 and keeper["reconnects"] == 0)
    if args.json:
        print(json.dumps({"bench": "keyloss", "guest": args.guest, "rms": args.rms,
                          "mem_mb": mem_mb, "migrations": args.migrations, "ok": good,
                          "file": str(path), "rows": [brief(r) for r in results]}))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
