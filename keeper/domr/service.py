"""The Domain R process's service: its control API and its life (`keeper domr run`).

Kept apart from keeper.domr.main so that the command line (`keeper --help`, `keeper
lab status`) does not import asyncssh, aiohttp's server and the device backends."""


from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from keeper import control
from keeper.arp.garp import parse_schedule
from keeper.domr import checkpoint as ck
from keeper.domr.console import ConsoleBackend
from keeper.domr.display import DisplayBackend
from keeper.domr.server import Device, Display, DomainR
from keeper.qemu.chardev import ChardevConsole
from keeper.qemu.devices import DeviceClient
from keeper.qemu.display import QemuDisplay
from keeper.ssh.host import SshConfig
from keeper.vmm.hypercall import HypercallClient

log = logging.getLogger("keeper.domr")
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Hold:
    on: bool


def build_app(domr: DomainR) -> web.Application:
    routes = web.RouteTableDef()

    guarded = control.guarded()

    @routes.get("/status")
    @guarded
    async def status(_: web.Request) -> web.StreamResponse:
        return web.json_response(domr.status())

    @routes.post("/quiesce")
    @guarded
    async def quiesce(_: web.Request) -> web.StreamResponse:
        await domr.quiesce()
        return web.json_response({"phase": domr.phase.value})

    @routes.post("/checkpoint")
    @guarded
    async def checkpoint(_: web.Request) -> web.StreamResponse:
        blob = domr.checkpoint()
        return web.Response(
            body=blob, content_type="application/octet-stream",
            headers={"X-Keeper-Dump-Ms": f"{domr.last_move.dump_ms:.3f}",
                     "X-Keeper-Sessions": str(domr.last_move.sessions),
                     "X-Keeper-Queued-In": str(domr.last_move.queued_in),
                     "X-Keeper-Queued-Out": str(domr.last_move.queued_out),
                     "X-Keeper-By-Rms": json.dumps(domr.last_move.by_rms)},
        )

    @routes.post("/abort")
    @guarded
    async def abort(_: web.Request) -> web.StreamResponse:
        domr.abort()
        return web.json_response({"phase": domr.phase.value})

    @routes.post("/commit")
    @guarded
    async def commit(_: web.Request) -> web.StreamResponse:
        domr.commit()
        return web.json_response({"phase": domr.phase.value})

    @routes.post("/restore")
    @guarded
    async def restore(request: web.Request) -> web.StreamResponse:
        stats = await domr.restore(await request.read())
        return web.json_response({"sessions": stats.sessions, "restore_ms": stats.restore_ms})

    @routes.post("/resume")
    @guarded
    async def resume(request: web.Request) -> web.StreamResponse:
        # drills (keeper.hostd.drills, resume_prepare and resume_midway): fail after
        # this many services prepared, resp. left repair mode, as a service would
        drill = {k: int(v) for k, v in request.query.items()
                 if k in ("fail_prepare_after", "fail_after")}
        failed = await domr.resume(**drill)
        # still bound to the agent: until the source has settled the move, a crash of
        # this host's agent must take this R with it (docs/design.md, the window)
        return web.json_response({"phase": domr.phase.value, "failed": failed})

    @routes.post("/confirm")
    @guarded
    async def confirm(_: web.Request) -> web.StreamResponse:
        die_with_parent(False)  # the move is settled: outlive an agent restart, like a VM
        return web.json_response({"phase": domr.phase.value, "confirmed": True})

    @routes.post("/hold")
    @guarded
    async def hold(request: web.Request) -> web.StreamResponse:
        body = await control.body(request, Hold)
        await domr.hold_input(body.on)
        return web.json_response({"held": domr.input_held})

    @routes.post("/announce")
    @guarded
    async def announce(_: web.Request) -> web.StreamResponse:
        await domr.announce_now()
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=1 << 30)
    app.add_routes(routes)
    return app


def die_with_parent(on: bool) -> None:
    """An incoming Domain R (not yet serving) dies with the agent that started it:
    a target whose agent crashed mid-move must not linger with our IP and MAC."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL if on else 0, 0, 0, 0)


async def serve(args: argparse.Namespace) -> int:
    device: Device | None = None
    display: Display | None = None
    if args.devices:  # a QEMU guest: its serial console and QEMU's VNC server
        devices = DeviceClient(args.devices)
        device, display = ChardevConsole(devices), QemuDisplay(devices)
        if not args.restore:
            device.connect()
            await display.connect()
    elif args.hypercall:
        hc = HypercallClient(args.hypercall)
        device = ConsoleBackend(hc)
        display = DisplayBackend(hc)
        if not args.restore:  # first start: find the guest's devices and bind them
            device.connect()
            display.connect()
    ssh = None
    if args.ssh_host_key and not args.restore:  # after a move, it comes with the checkpoint
        ssh = SshConfig(host_key=Path(args.ssh_host_key).read_text(),
                        authorized_keys=Path(args.ssh_authorized_keys).read_text())
    domr = DomainR(args.name, args.ip, args.mac, console_port=args.console_port,
                   announce=not args.no_announce,
                   announce_schedule=parse_schedule(args.announce_schedule), device=device,
                   ssh=ssh, display=display)
    if args.restore:
        die_with_parent(True)
        if os.getppid() != args.parent:
            return 1  # the agent is already gone
    domr.prepare_announcer()
    domr.bind()
    ck.prepare()  # what writing (source) or reading (twin) one takes: not in the pause
    if not args.restore:
        domr.start()
    runner = web.AppRunner(build_app(domr), access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    old = os.umask(0o077)  # the control socket (and later, checkpoints) are root's alone
    try:
        site = web.UnixSite(runner, args.control)
        await site.start()
    finally:
        os.umask(old)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, domr.stopped.set)
    log.info("Domain R %s %s %s ready (%s)", args.name, args.ip, args.mac,
             "awaiting restore" if args.restore else "serving")
    await domr.stopped.wait()
    await asyncio.sleep(0.05)  # let the last control reply go out
    await domr.close()
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    return 0


