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
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field

from aiohttp import web

from keeper import control
from keeper.arp.garp import parse_schedule
from keeper.errors import KeeperError, LabError
from keeper.hostd.client import Http
from keeper.lab import placement, procs
from keeper.lab.topology import AGENT_PORT, HostSpec, LabSpec
from keeper.migrate import mm_r

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
    state: str = "starting"  # starting | incoming | running | moving
    created: float = field(default_factory=time.time)


class HostAgent:
    def __init__(self, spec: LabSpec, host: str) -> None:
        self.spec = spec
        self.host: HostSpec = spec.host(host)
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
            self._peers[host] = Http(base=self.spec.host(host).agent_url)
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
                         announce: bool = True,
                         announce_schedule: str = "0,20,100,300") -> DomrEntry:
        if name in self.domrs:
            raise LabError(f"Domain R {name} already exists on host {self.host.name}")
        log.info("placing Domain R %s (%s %s)", name, ip, mac)
        ns = await asyncio.to_thread(
            placement.place, self.spec, self.host.name, name, ip, mac, link_up=not restore
        )
        log.info("placed Domain R %s in %s", name, ns)
        path = self.spec.domr_control(name, self.host.name)
        argv = ["domr", "run", "--name", name, "--ip", ip, "--mac", mac, "--netns", ns,
                "--control", str(path)]
        if restore:
            argv += ["--restore", "--parent", str(os.getpid())]
        if not announce:
            argv.append("--no-announce")
        argv += ["--announce-schedule", announce_schedule]
        path.unlink(missing_ok=True)
        proc = procs.spawn(self.spec.rundir, self.label(name), argv)
        entry = DomrEntry(name, ip, mac, ns, Http(unix=str(path), timeout=10), proc,
                          announce=announce, announce_schedule=announce_schedule)
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
            proc = entry.proc
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                await asyncio.to_thread(procs.stop, proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(proc.wait, 5)
        procs.forget(self.spec.rundir, self.label(name))
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
                "link_up": await asyncio.to_thread(
                    placement.link_is_up, self.spec, self.host.name, entry.name),
                "services": {"console": 2323},
            }
            if entry.state != "moving":
                try:
                    item["domr"] = await entry.control.call("GET", "/status", timeout=3)
                except KeeperError as exc:
                    item["error"] = str(exc)
            doms.append(item)
        return {"host": self.host.name, "mgmt_ip": self.host.mgmt_ip, "netns": self.host.ns,
                "moves": self.moves, "domrs": doms}

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
            try:
                parse_schedule(body.get("announce_schedule", "0,20,100,300"))
            except ValueError as exc:
                raise KeeperError(str(exc)) from None
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
                                  announce_schedule=body.get("announce_schedule", "0,20,100,300"))
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
            t1 = time.monotonic()
            await self.set_link(entry.name, up=True)
            self.fault("link_up")
            t2 = time.monotonic()
            await entry.control.call("POST", "/resume")
            t3 = time.monotonic()
            entry.state = "running"
            return web.json_response({
                "sessions": restored["sessions"], "restore_ms": restored["restore_ms"],
                "restore_call_ms": (t1 - t0) * 1e3, "link_up_ms": (t2 - t1) * 1e3,
                "resume_ms": (t3 - t2) * 1e3,
            })

        @peer_routes.post("/peer/domr/{name}/cancel")
        @guarded
        async def cancel(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            if name in self.domrs:
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


async def serve(spec: LabSpec, host: str) -> int:
    import signal

    agent = HostAgent(spec, host)
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
    await web.TCPSite(peer, agent.host.mgmt_ip, AGENT_PORT).start()
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
