"""The host agent: one per host namespace. Places Domain Rs and moves them.

Control API (aiohttp, JSON). Local callers use the Unix socket
/run/keeper/<lab>/hostd-<host>.sock; peer agents use TCP on the management
address, port 7480.

    GET    /status                      this host and its Domain Rs
    POST   /domr        {name, ip, mac} create a Domain R here and start it
    DELETE /domr/{name}                 stop and remove it
    POST   /domr/{name}/migrate {to}    move it to another host (MM_R)
    POST   /domr/{name}/link {up}       set its link (tests and operators)
    POST   /domr/{name}/announce        one gratuitous ARP from it now
    POST   /debug/fault {point, action} one-shot failure drill: at point (prepare,
                                        restore, restored, link_up) "fail" or "crash"
  peers (TCP, management network):
    GET    /status
    POST   /peer/domr/prepare           make the twin (link down), start it empty
    POST   /peer/domr/{name}/restore    checkpoint in; restore, link up, resume
    POST   /peer/domr/{name}/cancel     drop a prepared or restored twin
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field

from aiohttp import web

from keeper import control
from keeper.arp.garp import parse_schedule
from keeper.errors import KeeperError, LabError
from keeper.hostd import metrics, tls
from keeper.hostd.client import Http
from keeper.hostd.guests import Guests
from keeper.lab import placement, procs, sshkeys
from keeper.lab.topology import AGENT_PORT, HostSpec, LabSpec
from keeper.migrate import mm_r, pagestream
from keeper.migrate.coordinator import CoMigration, SoloMigration
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
    announce_schedule: str = "0,20,100,300"
    state: str = "starting"  # starting | incoming | restored | running | moving
    created: float = field(default_factory=time.time)
    r_domid: int | None = None  # its domain in the hypervisor (guest consoles only)
    hc: HypercallServer | None = None
    baseline: bool = False  # the conventional set-up: the servers run in Dom0 (this agent's
    # namespace, the host's address) and do not move; see keeper.migrate.coordinator


class HostAgent:
    def __init__(self, spec: LabSpec, host: str, *, may_write: bool = True) -> None:
        self.spec = spec
        self.host: HostSpec = spec.host(host)
        self.hv = Hypervisor(host, may_write=may_write)
        self.guests = Guests(self)
        self.domrs: dict[str, DomrEntry] = {}
        self._peers: dict[str, Http] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.moves = 0
        self.faults: dict[str, str] = {}  # point -> "fail" | "crash", one-shot (drills, tests)

    # -- bookkeeping ------------------------------------------------------------

    def domr(self, name: str) -> DomrEntry:
        try:
            return self.domrs[name]
        except KeyError:
            raise LabError(f"no Domain R {name!r} on host {self.host.name}") from None

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def peer(self, host: str) -> Http:
        if host not in self._peers:
            self._peers[host] = Http(base=self.spec.host(host).agent_url,
                                     ssl=tls.client_context(self.spec.pki, self.host.name))
        return self._peers[host]

    async def set_link(self, name: str, *, up: bool) -> None:
        # netlink runs in a worker thread: pyroute2's sync API needs a loop of its own
        await asyncio.to_thread(placement.set_link, self.spec, self.host.name, name, up)

    def label(self, name: str) -> str:
        return f"domr-{name}-{self.host.name}"

    def fault(self, point: str) -> None:
        """A failure drill: at `point`, fail the request or kill this agent outright."""
        action = self.faults.pop(point, None)
        if action == "crash":
            log.warning("fault drill: crashing at %s", point)
            os._exit(70)
        if action == "fail":
            raise KeeperError(f"fault drill: failing at {point}")

    # -- Domain R processes -------------------------------------------------------

    async def start_domr(self, name: str, ip: str, mac: str, *, restore: bool,
                         announce: bool = True, announce_schedule: str = "0,20,100,300",
                         guest: bool = False, baseline: bool = False) -> DomrEntry:
        """Place and start a Domain R. With `guest`, it is a domain of the hypervisor with
        a hypercall channel and serves the console of guest `name` (on a restore the
        association comes later, at S1)."""
        if name in self.domrs:
            raise LabError(f"Domain R {name} already exists on host {self.host.name}")
        r_domid, hc = None, None
        if guest:
            managed = None if restore else self.guests.get(name).u.domid
            r_domid = self.hv.create_domain_r(name, managed=managed).domid
            hc = HypercallServer(self.hv, r_domid, self.spec.rundir /
                                 f"hc-{name}-r-{self.host.name}.sock")
        if baseline:  # Dom0-hosted servers: on the host's own address, nothing to place
            ns, ip, announce = self.host.ns, self.host.mgmt_ip, False
        else:
            log.info("placing Domain R %s (%s %s)", name, ip, mac)
            ns = await asyncio.to_thread(
                placement.place, self.spec, self.host.name, name, ip, mac, link_up=not restore
            )
        path = self.spec.domr_control(name, self.host.name)
        argv = ["domr", "run", "--name", name, "--ip", ip, "--mac", mac, "--netns", ns,
                "--control", str(path)]
        if restore:
            argv += ["--restore", "--parent", str(os.getpid())]
        if not announce:
            argv.append("--no-announce")
        argv += ["--announce-schedule", announce_schedule]
        if hc is not None:
            argv += ["--hypercall", str(hc.path)]
            if not restore:  # a guest's Domain R serves its console over SSH too
                argv += ["--ssh-host-key", str(sshkeys.host_key(self.spec, name)),
                         "--ssh-authorized-keys", str(self.spec.ssh_dir / "authorized_keys")]
        path.unlink(missing_ok=True)
        proc = procs.spawn(self.spec.rundir, self.label(name), argv)
        entry = DomrEntry(name, ip, mac, ns, Http(unix=str(path), timeout=10), proc,
                          announce=announce, announce_schedule=announce_schedule,
                          r_domid=r_domid, hc=hc, baseline=baseline)
        self.domrs[name] = entry
        try:
            await self._wait_ready(entry, path)
        except BaseException:
            await self.forget_domr(name)
            raise
        entry.state = "incoming" if restore else "running"
        return entry

    async def _wait_ready(self, entry: DomrEntry, path) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if entry.proc is not None and entry.proc.poll() is not None:
                raise KeeperError(f"Domain R {entry.name} exited with {entry.proc.returncode}; "
                                  f"see {self.spec.rundir / (self.label(entry.name) + '.log')}")
            if path.exists():
                with contextlib.suppress(KeeperError):
                    await entry.control.call("GET", "/status", timeout=2)
                    return
            await asyncio.sleep(0.05)
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
        if entry.r_domid is not None:
            self.hv.destroy(entry.r_domid)
        if not entry.baseline:
            await asyncio.to_thread(placement.remove, self.spec, self.host.name, name)

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
                    placement.link_is_up, self.spec, self.host.name, entry.name),
                "baseline": entry.baseline,
                "services": {"console": 2323, "ssh": 22, "vnc": 5900} if entry.r_domid is not None
                else {"console": 2323},
            }
            if entry.state != "moving":
                try:
                    item["domr"] = await entry.control.call("GET", "/status", timeout=3)
                except KeeperError as exc:
                    item["error"] = str(exc)
            doms.append(item)
        guests = [{"name": g.name, "domid": g.u.domid, "state": g.state,
                   "mem_bytes": g.u.pages * 4096, "pid": g.proc.pid if g.proc else None}
                  for g in self.guests.entries.values()]
        return {"host": self.host.name, "mgmt_ip": self.host.mgmt_ip, "netns": self.host.ns,
                "moves": self.moves, "may_write": self.hv.may_write_enabled,
                "domrs": doms, "guests": guests}

    # -- HTTP -------------------------------------------------------------------------

    def apps(self) -> tuple[web.Application, web.Application]:
        """(local, peer): the Unix socket gets everything, the network only /peer and /status."""
        routes = web.RouteTableDef()
        peer_routes = web.RouteTableDef()

        guarded = control.guarded(log)

        @routes.get("/status")
        @guarded
        async def status(_: web.Request) -> web.StreamResponse:
            return web.json_response(await self.status())

        @routes.post("/domr")
        @guarded
        async def create(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            name = body["name"]
            placement.check_name(name)
            parse_schedule_or_fail(body.get("announce_schedule", "0,20,100,300"))
            async with self.lock(name):
                entry = await self.start_domr(
                    name, body["ip"], body["mac"], restore=False,
                    announce=body.get("announce", True),
                    announce_schedule=body.get("announce_schedule", "0,20,100,300"))
            return web.json_response({"name": entry.name, "ip": entry.ip, "mac": entry.mac,
                                      "host": self.host.name})

        @routes.delete("/domr/{name}")
        @guarded
        async def delete(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            async with self.lock(name):
                await self.stop_domr(name)
            return web.json_response({"removed": name})

        @routes.post("/domr/{name}/migrate")
        @guarded
        async def migrate(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            target = (await request.json())["to"]
            async with self.lock(name):
                trace = await mm_r.move_out(self, name, target)
            self.moves += 1
            return web.json_response(trace.as_dict())

        @routes.post("/domr/{name}/link")
        @guarded
        async def link(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            up = bool((await request.json())["up"])
            self.domr(name)
            await self.set_link(name, up=up)
            return web.json_response({"name": name, "link_up": up})

        @routes.post("/domr/{name}/announce")
        @guarded
        async def announce(request: web.Request) -> web.StreamResponse:
            entry = self.domr(request.match_info["name"])
            await entry.control.call("POST", "/announce")
            return web.json_response({"ok": True})

        # -- guests (Domain U + Domain R pairs) ---------------------------------------

        @routes.post("/guest")
        @guarded
        async def create_guest(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            name = body["name"]
            placement.check_name(name)
            parse_schedule_or_fail(body.get("announce_schedule", "0,20,100,300"))
            async with self.lock(name):
                entry = self.guests.create_domain(
                    name, int(body.get("mem_mb", 256)) << 20,
                    event_delay_ms=float(body.get("event_delay_ms", 0)),
                    dirty_rate=float(body.get("dirty_rate", 0)))
                try:
                    await self.guests.start_process(entry, resume=False)
                    await self.guests.wait_console(entry)
                    await self.start_domr(name, body["ip"], body["mac"], restore=False,
                                          announce=body.get("announce", True),
                                          announce_schedule=body.get("announce_schedule",
                                                                     "0,20,100,300"),
                                          guest=True, baseline=body.get("mode") == "baseline")
                except BaseException:
                    await self.guests.destroy(name)
                    raise
            return web.json_response({"name": name, "host": self.host.name,
                                      "domid": entry.u.domid, "ip": self.domrs[name].ip,
                                      "mac": body["mac"]})

        @routes.delete("/guest/{name}")
        @guarded
        async def delete_guest(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            async with self.lock(name):
                if name in self.domrs:
                    await self.stop_domr(name)
                await self.guests.destroy(name)
            return web.json_response({"removed": name})

        @routes.get("/guest/{name}/journal")
        @guarded
        async def journal(request: web.Request) -> web.StreamResponse:
            doc = self.guests.journal(request.match_info["name"])
            doc["journal"] = doc["journal"].hex()
            return web.json_response(doc)

        @routes.get("/guest/{name}/screen")
        @guarded
        async def screen(request: web.Request) -> web.StreamResponse:
            pixels = self.guests.screen(request.match_info["name"])
            return web.Response(body=pixels, content_type="application/octet-stream",
                                headers={"X-Keeper-Geometry": "800x600x32 BGRX"})

        @routes.post("/guest/{name}/migrate")
        @guarded
        async def migrate_guest(request: web.Request) -> web.StreamResponse:
            """Streams progress as JSON lines; the last line is the summary or an error."""
            name = request.match_info["name"]
            target = (await request.json())["to"]
            self.spec.host(target)
            self.guests.get(name)
            if target == self.host.name:
                raise KeeperError(f"{name} is already on {target}")
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            lines: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()
            kind = SoloMigration if self.domr(name).baseline else CoMigration
            co = kind(self, name, target, progress=lines.put_nowait)

            async def drive() -> None:
                try:
                    async with self.lock(name):
                        summary = await co.run()
                    self.moves += 1
                    metrics.observe_migration(summary)
                    await lines.put({"done": True, "summary": summary})
                except KeeperError as exc:
                    metrics.MIGRATIONS.labels(result="rolled_back").inc()
                    await lines.put({"done": True, "error": str(exc)})
                finally:
                    await lines.put(None)

            task = asyncio.create_task(drive())
            try:
                while (item := await lines.get()) is not None:
                    with contextlib.suppress(ConnectionError):
                        await resp.write(json.dumps(item).encode() + b"\n")
            finally:
                await task  # the migration finishes (or rolls back) even if the caller left
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp

        @routes.post("/vmm/config")
        @guarded
        async def vmm_config(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if "may_write" in body:
                self.hv.may_write_enabled = bool(body["may_write"])
            return web.json_response({"may_write": self.hv.may_write_enabled})

        @routes.get("/metrics")
        async def metrics_page(_: web.Request) -> web.StreamResponse:
            body, ctype = metrics.render(self)
            return web.Response(body=body, headers={"Content-Type": ctype})

        @peer_routes.post("/peer/guest/{name}/incoming")
        @guarded
        async def incoming(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            name = request.match_info["name"]
            self.fault("incoming")
            stale = self.guests.entries.get(name)
            if stale is not None and stale.state == "incoming":
                await self.guests.destroy(name)  # from an earlier, failed migration
            entry = self.guests.create_domain(
                name, int(body["mem_bytes"]), event_delay_ms=float(body["event_delay_ms"]),
                dirty_rate=float(body["dirty_rate"]), state="incoming")
            try:
                await self.guests.start_process(entry, resume=True)  # waits for `go`
            except BaseException:
                await self.guests.destroy(name)
                raise
            entry.state = "incoming"
            return web.json_response({"domid": entry.u.domid})

        @peer_routes.post("/peer/guest/{name}/associate")
        @guarded
        async def associate(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            self.fault("associate")
            r = self.domr(name)
            assert r.r_domid is not None
            self.hv.associate(r.r_domid, self.guests.get(name).u.domid)
            return web.json_response({"r": r.r_domid})

        @peer_routes.post("/peer/guest/{name}/pages")
        @guarded
        async def pages(request: web.Request) -> web.StreamResponse:
            entry = self.guests.get(request.match_info["name"])
            if entry.state != "incoming":
                raise KeeperError(f"guest {entry.name} is {entry.state}, not incoming")
            self.fault("pages")
            assert entry.u.mem is not None
            written, nbytes = await pagestream.apply(
                request.content.readexactly, memoryview(entry.u.mem), entry.u.pages)
            metrics.PAGES_RECEIVED.inc(written)
            return web.json_response({"pages": written, "bytes": nbytes})

        @peer_routes.post("/peer/guest/{name}/evtchns")
        @guarded
        async def evtchns(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            entry = self.guests.get(name)
            self.fault("evtchns")
            r = self.domr(name)
            assert r.r_domid is not None
            body = await request.json()
            pairs = [(int(a), int(b)) for a, b in body["pairs"]]
            self.hv.restore_evtchns(r.r_domid, entry.u.domid, pairs)  # S6
            entry.evtchns_ready = True
            return web.json_response({"pairs": pairs})

        @peer_routes.post("/peer/guest/{name}/solo-evtchns")
        @guarded
        async def solo_evtchns(request: web.Request) -> web.StreamResponse:
            """The baseline: U's ports come back unbound (offered to Dom0), and the
            toolstack re-creates U's XenStore entries so fresh backends can find it."""
            entry = self.guests.get(request.match_info["name"])
            body = await request.json()
            for port in body["unbound"]:
                self.hv.evtchn.alloc_unbound(entry.u.domid, 0, port=int(port))
            for rel, value in body["xenstore"].items():
                self.hv.xs_write(0, f"/local/domain/{entry.u.domid}/{rel}", value)
            entry.evtchns_ready = True
            return web.json_response({"ports": body["unbound"]})

        @peer_routes.post("/peer/guest/{name}/baseline-server")
        @guarded
        async def baseline_server(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            entry = await self.start_domr(name, self.host.mgmt_ip, "00:00:00:00:00:00",
                                          restore=False, guest=True, baseline=True)
            return web.json_response({"ip": entry.ip})

        @peer_routes.post("/peer/guest/{name}/resume")
        @guarded
        async def guest_resume(request: web.Request) -> web.StreamResponse:
            entry = self.guests.get(request.match_info["name"])
            if not entry.evtchns_ready:  # S6: never before the channels are back
                raise KeeperError(f"guest {entry.name}: event channels not re-established")
            self.fault("guest_resume")
            await self.guests.go(entry)
            return web.json_response({"resumed": entry.name})

        @peer_routes.post("/peer/guest/{name}/cancel")
        @guarded
        async def guest_cancel(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            entry = self.guests.entries.get(name)
            if entry is not None and entry.state == "incoming":
                await self.guests.destroy(name)
            return web.json_response({"cancelled": name})

        @routes.post("/debug/fault")
        @guarded
        async def set_fault(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if body.get("action") not in ("fail", "crash"):
                raise KeeperError("fault action must be 'fail' or 'crash'")
            self.faults[str(body["point"])] = body["action"]
            return web.json_response({"faults": self.faults})

        @peer_routes.get("/status")
        @guarded
        async def peer_status(_: web.Request) -> web.StreamResponse:
            return web.json_response({"host": self.host.name, "mgmt_ip": self.host.mgmt_ip})

        @peer_routes.post("/peer/domr/prepare")
        @guarded
        async def prepare(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            name = body["name"]
            placement.check_name(name)
            self.fault("prepare")
            stale = self.domrs.get(name)
            if stale is not None and stale.state == "incoming":
                await self.stop_domr(name)  # a leftover from an earlier, failed move
            await self.start_domr(name, body["ip"], body["mac"], restore=True,
                                  announce=body.get("announce", True),
                                  announce_schedule=body.get("announce_schedule", "0,20,100,300"),
                                  guest=bool(body.get("guest", False)))
            return web.json_response({"ready": name})

        @peer_routes.post("/peer/domr/{name}/restore")
        @guarded
        async def restore(request: web.Request) -> web.StreamResponse:
            entry = self.domr(request.match_info["name"])
            if entry.state != "incoming":
                raise KeeperError(f"Domain R {entry.name} is {entry.state}, not incoming")
            blob = await request.read()
            self.fault("restore")
            t0 = time.monotonic()
            restored = await entry.control.call("POST", "/restore", data=blob)
            self.fault("restored")
            entry.state = "restored"
            return web.json_response({
                "sessions": restored["sessions"], "restore_ms": restored["restore_ms"],
                "restore_call_ms": (time.monotonic() - t0) * 1e3})

        @peer_routes.post("/peer/domr/{name}/resume")
        @guarded
        async def resume(request: web.Request) -> web.StreamResponse:
            entry = self.domr(request.match_info["name"])
            if entry.state != "restored":
                raise KeeperError(f"Domain R {entry.name} is {entry.state}, not restored")
            t1 = time.monotonic()
            await self.set_link(entry.name, up=True)  # the source's link is down already
            self.fault("link_up")
            t2 = time.monotonic()
            await entry.control.call("POST", "/resume")
            entry.state = "running"
            return web.json_response({"link_up_ms": (t2 - t1) * 1e3,
                                      "resume_ms": (time.monotonic() - t2) * 1e3})

        @peer_routes.post("/peer/domr/{name}/cancel")
        @guarded
        async def cancel(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            entry = self.domrs.get(name)
            if entry is not None and entry.state in ("incoming", "restored"):
                await self.set_link(name, up=False)
                await self.stop_domr(name)
            return web.json_response({"cancelled": name})

        local = web.Application()
        local.add_routes(routes)
        peer = web.Application(client_max_size=1 << 30)  # checkpoints can be large
        peer.add_routes(peer_routes)
        return local, peer

    async def close(self) -> None:
        """Idempotent. Domain Rs keep running: an agent restart must not end the VMs."""
        for http in self._peers.values():
            await http.close()
        for entry in self.domrs.values():
            await entry.control.close()


def parse_schedule_or_fail(text: str) -> None:
    try:
        parse_schedule(text)
    except ValueError as exc:
        raise KeeperError(str(exc)) from None


async def serve(spec: LabSpec, host: str, *, may_write: bool = True) -> int:
    import signal

    agent = HostAgent(spec, host, may_write=may_write)
    local_app, peer_app = agent.apps()
    local = web.AppRunner(local_app, access_log=None)
    peer = web.AppRunner(peer_app, access_log=None)
    await local.setup()
    await peer.setup()
    sock_path = spec.agent_socket(host)
    sock_path.unlink(missing_ok=True)
    old = os.umask(0o077)  # root's alone
    try:
        await web.UnixSite(local, str(sock_path)).start()
    finally:
        os.umask(old)
    await web.TCPSite(peer, agent.host.mgmt_ip, AGENT_PORT,
                      ssl_context=tls.server_context(spec.pki, host)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("host agent %s up on %s:%d and %s", host, agent.host.mgmt_ip, AGENT_PORT, sock_path)
    await stop.wait()
    await agent.close()
    await local.cleanup()
    await peer.cleanup()
    sock_path.unlink(missing_ok=True)
    return 0
