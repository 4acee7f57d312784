"""The host agent's control API, on its root-only Unix socket (JSON over HTTP).

    GET    /status                         this host, its guests and Domain Rs
    GET    /metrics                        Prometheus
    POST   /domr        CreateDomr         a stand-alone Domain R here (echo service)
    DELETE /domr/{name}                    stop and remove it
    POST   /domr/{name}/migrate  MigrateTo move it to another host (MM_R alone)
    POST   /domr/{name}/link     SetLink   its link up or down (tests, operators)
    POST   /domr/{name}/announce           one gratuitous ARP from it now
    POST   /guest       CreateGuest        a guest (Domain U + its Domain R) here
    DELETE /guest/{name}
    GET    /guest/{name}/journal           every byte the guest received, in order
    GET    /guest/{name}/screen            its framebuffer (BGRX)
    POST   /guest/{name}/migrate MigrateTo co-migration; progress as JSON lines
    POST   /vmm/config  VmmConfig          may-write on/off (the ablation)
    POST   /debug/fault Fault              a one-shot failure drill (keeper.hostd.drills)

Bodies are parsed once into the dataclasses of keeper.hostd.requests: a missing
field or a wrong type is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from keeper import control
from keeper.errors import BadRequest, KeeperError
from keeper.hostd import metrics, migrations
from keeper.hostd.requests import CreateDomr, CreateGuest, Fault, MigrateTo, SetLink, VmmConfig
from keeper.net import placement

if TYPE_CHECKING:
    from keeper.hostd.agent import HostAgent

log = logging.getLogger("keeper.hostd")


def local_app(agent: HostAgent) -> web.Application:
    routes = web.RouteTableDef()
    guarded = control.guarded(log)

    def name_of(request: web.Request) -> str:
        return request.match_info["name"]

    @routes.get("/status")
    @guarded
    async def status(_: web.Request) -> web.StreamResponse:
        return web.json_response(await agent.status())

    @routes.get("/metrics")
    async def metrics_page(_: web.Request) -> web.StreamResponse:
        body, ctype = await metrics.page(agent)
        return web.Response(body=body, headers={"Content-Type": ctype})

    @routes.post("/domr")
    @guarded
    async def create(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, CreateDomr)
        placement.check_name(req.name)
        agent.parse_schedule(req.announce_schedule)
        async with agent.lock(req.name):
            entry = await agent.start_domr(req.name, req.ip, req.mac, restore=False,
                                           announce=req.announce,
                                           announce_schedule=req.announce_schedule)
        return web.json_response({"name": entry.name, "ip": entry.ip, "mac": entry.mac,
                                  "host": agent.host.name})

    @routes.delete("/domr/{name}")
    @guarded
    async def delete(request: web.Request) -> web.StreamResponse:
        async with agent.lock(name_of(request)):
            await agent.stop_domr(name_of(request))
        return web.json_response({"removed": name_of(request)})

    @routes.post("/domr/{name}/migrate")
    @guarded
    async def migrate(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, MigrateTo)
        async with agent.lock(name_of(request)):
            trace = await migrations.move_domr(agent, name_of(request), req.to)
        return web.json_response(trace.as_dict())

    @routes.post("/domr/{name}/link")
    @guarded
    async def link(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, SetLink)
        agent.domr(name_of(request))
        await agent.set_link(name_of(request), up=req.up)
        return web.json_response({"name": name_of(request), "link_up": req.up})

    @routes.post("/domr/{name}/announce")
    @guarded
    async def announce(request: web.Request) -> web.StreamResponse:
        await agent.domr(name_of(request)).control.call("POST", "/announce")
        return web.json_response({"ok": True})

    @routes.post("/guest")
    @guarded
    async def create_guest(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, CreateGuest)
        placement.check_name(req.name)
        agent.parse_schedule(req.announce_schedule)
        if req.mode not in ("keeper", "baseline"):
            raise BadRequest(f"mode must be keeper or baseline, not {req.mode!r}")
        if req.guest not in ("sim", "qemu"):
            raise BadRequest(f"guest must be sim or qemu, not {req.guest!r}")
        if not 1 <= req.mem_mb <= 65536:
            raise BadRequest(f"mem_mb {req.mem_mb} is out of range (1-65536)")
        async with agent.lock(req.name):
            doc = await agent.create_guest(req)
        return web.json_response(doc)

    @routes.delete("/guest/{name}")
    @guarded
    async def delete_guest(request: web.Request) -> web.StreamResponse:
        name = name_of(request)
        async with agent.lock(name):
            await agent.destroy_guest(name)
        return web.json_response({"removed": name})

    @routes.get("/guest/{name}/journal")
    @guarded
    async def journal(request: web.Request) -> web.StreamResponse:
        name = name_of(request)
        kind = agent.guest_kind(name)
        doc = agent.qemu.journal(name) if kind == "qemu" else agent.guests.journal(name)
        doc["journal"] = doc["journal"].hex()  # type: ignore[attr-defined]
        return web.json_response(doc)

    @routes.get("/guest/{name}/screen")
    @guarded
    async def screen(request: web.Request) -> web.StreamResponse:
        name = name_of(request)
        if agent.guest_kind(name) == "qemu":
            return web.Response(body=await agent.qemu.screen(name), content_type="image/x-ppm")
        pixels = agent.guests.screen(name)
        return web.Response(body=pixels, content_type="application/octet-stream",
                            headers={"X-Keeper-Geometry": "800x600x32 BGRX"})

    @routes.post("/guest/{name}/migrate")
    @guarded
    async def migrate_guest(request: web.Request) -> web.StreamResponse:
        """Streams progress as JSON lines; the last line is the summary or an error."""
        name, req = name_of(request), await control.body(request, MigrateTo)
        agent.spec.host(req.to)
        agent.guest_kind(name)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def drive() -> None:
            try:
                async with agent.lock(name):
                    summary = await migrations.migrate_guest(agent, name, req.to,
                                                             progress=lines.put_nowait)
                await lines.put({"done": True, "summary": summary})
            except KeeperError as exc:
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
        req = await control.body(request, VmmConfig)
        if req.may_write is not None:
            agent.hv.may_write_enabled = req.may_write
        return web.json_response({"may_write": agent.hv.may_write_enabled})

    @routes.post("/debug/fault")
    @guarded
    async def set_fault(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, Fault)
        return web.json_response({"faults": agent.drills.arm(req.point, req.action)})

    app = web.Application()
    app.add_routes(routes)
    return app
