"""The host agent: one per host namespace, the Dom0 of one host. It runs guests and
their Domain Rs, and migrates them (as source: keeper.migrate's plans; as target:
keeper.hostd.target behind the peer protocol).

  keeper/hostd/agent.py    this module: processes (Domain Rs, guests), status, serve()
  keeper/hostd/api.py      the control API on the root-only Unix socket
  keeper/hostd/target.py   the target half of migrations (peer API, mutual TLS)
  keeper/hostd/drills.py   one-shot failure drills
  keeper/hostd/guests.py   simulated guests: memory, guest process, pause/resume
  keeper/hostd/metrics.py  /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from keeper import ports
from keeper.arp.garp import DEFAULT_SCHEDULE, parse_schedule
from keeper.errors import BadRequest, KeeperError, LabError
from keeper.hostd import procs, tls
from keeper.hostd.clientwire import ClientWire
from keeper.hostd.drills import Drills
from keeper.hostd.guests import Guests
from keeper.hostd.qemu_guests import QemuGuests
from keeper.hostd.requests import CreateGuest
from keeper.hostd.spare import Spare
from keeper.http import Http
from keeper.lab import sshkeys
from keeper.lab.topology import HostSpec, LabSpec
from keeper.migrate.peer import PeerClient
from keeper.net import netns, placement
from keeper.qemu.devices import DeviceServer
from keeper.qemu.machine import TcpConsoles
from keeper.vmm.hypercall import HypercallServer
from keeper.vmm.hypervisor import Hypervisor

log = logging.getLogger("keeper.hostd")

READY_TIMEOUT = 20.0


@dataclass
class DomrEntry:
    name: str
    ip: str
    mac: str
    ns: str
    control: Http
    proc: subprocess.Popen[bytes] | None
    announce: bool = True
    announce_schedule: str = DEFAULT_SCHEDULE
    state: str = "starting"  # starting | incoming | restored | resuming | running | moving
    epoch: int = 0  # of its checkpoint lineage: each dump is one more (keeper.domr.checkpoint)
    created: float = field(default_factory=time.time)
    r_domid: int | None = None  # its domain in the hypervisor (guest consoles only)
    hc: HypercallServer | None = None
    devices: DeviceServer | None = None  # a QEMU guest's Domain R: its device sockets
    baseline: bool = False  # the conventional set-up: the servers run in Dom0 (this agent's
    # namespace, the host's address) and do not move; see keeper.migrate.plans.SoloMigration


class HostAgent:
    def __init__(self, spec: LabSpec, host: str, *, may_write: bool = True,
                 spare: bool = True) -> None:
        self.spec = spec
        self.host: HostSpec = spec.host(host)
        self.hv = Hypervisor(host, may_write=may_write)
        self.guests = Guests(self.hv, host, spec.rundir)
        self.qemu = QemuGuests(host, self.host.mgmt_ip, spec.rundir)
        self.domrs: dict[str, DomrEntry] = {}
        self._peers: dict[str, PeerClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.moves = 0
        self.started = time.time()  # a peer tells a restarted agent by this (the window)
        self.outgoing: dict[str, str] = {}  # guest -> "driving" or how its last move ended
        self.drills = Drills()
        self.wire = ClientWire()  # client retransmissions on this host's wire
        self.metrics_url: str | None = None  # set by serve() once /metrics listens
        self.place = spec.place_on(host)
        self.links = netns.LinkSwitch(self.place.ns)
        self.spare = Spare(spec.rundir, host, enabled=spare)  # started by serve()

    # -- bookkeeping ------------------------------------------------------------

    def domr(self, name: str) -> DomrEntry:
        try:
            return self.domrs[name]
        except KeyError:
            raise LabError(f"no Domain R {name!r} on host {self.host.name}") from None

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def peer(self, host: str) -> PeerClient:
        if host not in self._peers:
            self._peers[host] = PeerClient(Http(
                base=self.spec.host(host).agent_url,
                ssl=tls.client_context(self.spec.pki, self.host.name)))
        return self._peers[host]

    async def set_link(self, name: str, *, up: bool) -> None:
        """Domain R `name`'s port on this host's bridge, up or down: on a move's
        critical path (the stop, the resume), hence one netlink socket kept open.
        Up returns once Domain R's own end can send (netns.LinkSwitch)."""
        peer = (self.place.domr_ns(name), placement.IFACE) if up else None
        if not await self.links.set(placement.host_port(name), up, peer=peer):
            log.warning("Domain R %s: its link was not up %.1f s after we set it up",
                        name, self.links.PEER_TIMEOUT)

    def label(self, name: str) -> str:
        return f"domr-{name}-{self.host.name}"

    # -- Domain R processes -------------------------------------------------------

    async def start_domr(self, name: str, ip: str, mac: str, *, restore: bool,
                         announce: bool = True, announce_schedule: str = DEFAULT_SCHEDULE,
                         guest: bool = False, baseline: bool = False,
                         kind: str = "sim") -> DomrEntry:
        """Place and start a Domain R. With `guest`, it serves guest `name`: a simulated
        guest's Domain R is a domain of the hypervisor with a hypercall channel; a QEMU
        guest's gets a device channel to that guest's sockets. On a restore the
        association comes later, at S1."""
        if name in self.domrs:
            raise LabError(f"Domain R {name} already exists on host {self.host.name}")
        r_domid, hc, devices = None, None, None
        if guest and kind == "qemu":
            devices = DeviceServer(
                self.spec.rundir / f"dev-{name}-{self.host.name}.sock",
                lambda g: self.qemu.get(g).devices(), guest=None if restore else name)
        elif guest:
            managed = None if restore else self.guests.get(name).u.domid
            r_domid = self.hv.create_domain_r(name, managed=managed).domid
            hc = HypercallServer(self.hv, r_domid, self.spec.rundir /
                                 f"hc-{name}-r-{self.host.name}.sock")
        if baseline:  # Dom0-hosted servers: on the host's own address, nothing to place
            ns, ip, announce = self.host.ns, self.host.mgmt_ip, False
        else:
            log.info("placing Domain R %s (%s %s)", name, ip, mac)
            ns = await asyncio.to_thread(placement.place, self.place, name, ip, mac,
                                         link_up=not restore)
        path = self.spec.domr_control(name, self.host.name)
        argv = ["--name", name, "--ip", ip, "--mac", mac, "--netns", ns,
                "--control", str(path)]
        if restore:
            argv += ["--restore", "--parent", str(os.getpid())]
        if not announce:
            argv.append("--no-announce")
        argv += ["--announce-schedule", announce_schedule]
        if hc is not None:
            argv += ["--hypercall", str(hc.path)]
        if devices is not None:
            argv += ["--devices", str(devices.path)]
        if guest and not restore:  # a guest's Domain R serves its console over SSH too
            argv += ["--ssh-host-key", str(sshkeys.host_key(self.spec, name)),
                     "--ssh-authorized-keys", str(self.spec.ssh_dir / "authorized_keys")]
        path.unlink(missing_ok=True)
        proc = (self.spare.take(self.label(name), argv)
                or procs.spawn(self.spec.rundir, self.label(name), ["domr", "run", *argv]))
        entry = DomrEntry(name, ip, mac, ns, Http(unix=str(path), timeout=10), proc,
                          announce=announce, announce_schedule=announce_schedule,
                          r_domid=r_domid, hc=hc, devices=devices, baseline=baseline)
        self.domrs[name] = entry
        try:
            await self._wait_ready(entry, path)
        except BaseException:
            await self.forget_domr(name)
            raise
        entry.state = "incoming" if restore else "running"
        return entry

    async def _wait_ready(self, entry: DomrEntry, path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if entry.proc is not None and entry.proc.poll() is not None:
                raise KeeperError(f"Domain R {entry.name} exited with {entry.proc.returncode}; "
                                  f"see {self.spec.rundir / (self.label(entry.name) + '.log')}")
            if path.exists():
                with contextlib.suppress(KeeperError):
                    await entry.control.call("GET", "/status", timeout=2)
                    return
            await asyncio.sleep(0.01)
        raise KeeperError(f"Domain R {entry.name} not ready after {READY_TIMEOUT:.0f} s")

    async def forget_domr(self, name: str) -> None:
        """Stop the process (if still there), remove its namespace and records."""
        entry = self.domrs.pop(name, None)
        if entry is None:
            return
        await entry.control.close()
        if entry.proc is not None:
            await procs.reap(entry.proc)
        procs.forget(self.spec.rundir, self.label(name))
        if entry.hc is not None:
            entry.hc.close()
        if entry.devices is not None:
            entry.devices.close()
        if entry.r_domid is not None:
            self.hv.destroy(entry.r_domid)
        if not entry.baseline:
            await asyncio.to_thread(placement.remove, self.place, name)

    async def stop_domr(self, name: str) -> None:
        entry = self.domr(name)
        if entry.proc is not None and entry.proc.poll() is None:
            await asyncio.to_thread(procs.stop, entry.proc.pid)
        await self.forget_domr(name)

    # -- reporting --------------------------------------------------------------------

    async def status(self) -> dict[str, object]:
        doms = []
        for entry in self.domrs.values():
            item: dict[str, object] = {
                "name": entry.name, "ip": entry.ip, "mac": entry.mac, "netns": entry.ns,
                "state": entry.state, "pid": entry.proc.pid if entry.proc else None,
                "link_up": None if entry.baseline else await asyncio.to_thread(
                    placement.link_is_up, self.place, entry.name),
                "baseline": entry.baseline,
                "services": ports.GUEST_SERVICES if entry.r_domid is not None
                or entry.devices is not None
                else ports.ECHO_SERVICES,
            }
            if entry.state != "moving":
                try:
                    item["domr"] = await entry.control.call("GET", "/status", timeout=3)
                except KeeperError as exc:
                    item["error"] = str(exc)
            doms.append(item)
        guests = [{"name": g.name, "kind": "sim", "domid": g.u.domid, "state": g.state,
                   "mem_bytes": g.u.pages * 4096, "pid": g.proc.pid if g.proc else None}
                  for g in self.guests.entries.values()] + self.qemu.status()
        return {"host": self.host.name, "mgmt_ip": self.host.mgmt_ip, "netns": self.host.ns,
                "metrics_url": self.metrics_url, "spare_domr": self.spare.status(),
                "moves": self.moves, "may_write": self.hv.may_write_enabled,
                "domrs": doms, "guests": guests, "servers": self.qemu.servers()}

    def guest_kind(self, name: str) -> str:
        """'sim' or 'qemu' for a guest on this host (LabError if there is none)."""
        if name in self.qemu.entries:
            return "qemu"
        self.guests.get(name)
        return "sim"

    async def create_guest(self, req: CreateGuest) -> dict[str, object]:
        """A guest here: its Domain U booted, then its Domain R (or the baseline's
        servers in Dom0) on its console, keyboard and screen."""
        if self.guest_exists(req.name):
            raise LabError(f"guest {req.name} already exists on host {self.host.name}")
        if req.guest == "qemu":
            return await self._create_qemu_guest(req)
        entry = self.guests.create_domain(req.name, req.mem_mb << 20,
                                          event_delay_ms=req.event_delay_ms,
                                          dirty_rate=req.dirty_rate)
        try:
            await self.guests.start_process(entry, resume=False)
            await self.guests.wait_console(entry)
            await self.start_domr(req.name, req.ip, req.mac, restore=False,
                                  announce=req.announce,
                                  announce_schedule=req.announce_schedule,
                                  guest=True, baseline=req.mode == "baseline")
        except BaseException:
            await self.guests.destroy(req.name)
            raise
        return {"name": req.name, "host": self.host.name, "domid": entry.u.domid,
                "ip": self.domrs[req.name].ip, "mac": req.mac}

    def guest_exists(self, name: str) -> bool:
        return name in self.qemu.entries or name in self.guests.entries

    async def _create_qemu_guest(self, req: CreateGuest) -> dict[str, object]:
        if req.mode == "baseline":
            return await self._create_qemu_baseline(req)
        q = await self.qemu.create(req.name, req.mem_mb)
        try:
            await self.start_domr(req.name, req.ip, req.mac, restore=False,
                                  announce=req.announce, announce_schedule=req.announce_schedule,
                                  guest=True, kind="qemu")
        except BaseException:
            await self.qemu.destroy(req.name)
            raise
        return {"name": req.name, "host": self.host.name, "kind": "qemu", "accel": q.accel,
                "kernel": q.release, "ip": self.domrs[req.name].ip, "mac": req.mac}

    def baseline_consoles(self) -> TcpConsoles:
        """The stock set-up's consoles of a QEMU guest on this host: QEMU's own VNC
        server (display 0, port 5900) and serial chardev (port 2323) on the host's
        management address, as libvirt and OpenStack configure them."""
        return TcpConsoles(host=self.host.mgmt_ip, vnc_display=ports.VNC - 5900,
                           serial_port=ports.CONSOLE)

    async def _create_qemu_baseline(self, req: CreateGuest) -> dict[str, object]:
        """The conventional baseline on QEMU: no Domain R at all; the servers are
        QEMU's own, on this host's address (one such guest per host: the ports are
        the host's)."""
        taken = next((g.name for g in self.qemu.entries.values() if g.baseline is not None),
                     None)
        if taken is not None or any(d.baseline for d in self.domrs.values()):
            raise LabError(f"host {self.host.name} already serves a baseline guest's "
                           f"consoles on {self.host.mgmt_ip} ({taken or 'Dom0 servers'})")
        q = await self.qemu.create(req.name, req.mem_mb, baseline=self.baseline_consoles())
        return {"name": req.name, "host": self.host.name, "kind": "qemu", "mode": "baseline",
                "accel": q.accel, "kernel": q.release, "ip": self.host.mgmt_ip,
                "services": q.services()}

    async def destroy_guest(self, name: str) -> None:
        if name in self.domrs:
            await self.stop_domr(name)
        await self.guests.destroy(name)
        await self.qemu.destroy(name)

    async def start_baseline_servers(self, name: str) -> DomrEntry:
        return await self.start_domr(name, self.host.mgmt_ip, "00:00:00:00:00:00",
                                     restore=False, guest=True, baseline=True)

    @staticmethod
    def parse_schedule(text: str) -> None:
        try:
            parse_schedule(text)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    async def close(self) -> None:
        """Idempotent. Domain Rs keep running: an agent restart must not end the VMs."""
        for peer in self._peers.values():
            await peer.http.close()
        for entry in self.domrs.values():
            await entry.control.close()
        await self.qemu.close()  # a VM dies with its agent (and would anyway: PDEATHSIG)
        await self.spare.close()
        await self.wire.close()
        self.links.close()
