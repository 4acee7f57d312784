"""The agents' peer protocol: the source half (a typed client) and the target half
(routes over a `Target`), in one place so the two cannot drift apart.

A migration's source agent drives; the target agent answers. Every request body is
a dataclass here, parsed once on arrival (`keeper.control.body`): a missing field or a
wrong type is a 400 naming it. Paths are built only by `Paths`.

  source (MM_U / MM_R)                 target
  incoming(IncomingGuest)         ->   an empty Domain U waiting for its memory
  pages(name, stream)             ->   pre-copy and final pages
  associate(name)                 ->   S1: U becomes the twin R's managed domain
  links(name, DeviceLinks)        ->   S6: U's device links re-made (same ports)
  solo_links(name, SoloLinks)     ->   the baseline: U's ports offered to Dom0 again
  resume_guest(name)              ->   U runs there (never before S6)
  cancel_guest(name)              ->   drop a half-made U (idempotent)
  prepare_domr(PrepareDomr)       ->   the twin Domain R, link down, empty
  restore_domr(name, ckpt, epoch) ->   sessions restored, sockets in repair mode
  resume_domr(name)               ->   link up, repair off, announce, serve
  cancel_domr(name)               ->   drop a half-made twin (idempotent)
  settle_domr(name)               ->   after RESUME_R: "resumed" (confirmed, B's now)
                                       or "fenced" (B's R gone, its epoch refused)
  migration(name)                 <-   the target asks the source, once it holds a
                                       restored pair that has not settled: "driving"?
  release(name)                   <-   the target took over a pair the source left
                                       undecided: the source drops its copies
  wire_domr(name, WireSeeds)      ->   client retransmissions seen there after resume
  baseline_server(name)           ->   the baseline: fresh servers for U there
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aiohttp import web

from keeper import control
from keeper.arp.garp import DEFAULT_SCHEDULE
from keeper.errors import BadRequest
from keeper.http import Http

RESTORE_TIMEOUT = 60.0
CANCEL_TIMEOUT = 10.0
SETTLE_TIMEOUT = 15.0
WIRE_TIMEOUT = 20.0
PAGES_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class IncomingGuest:
    name: str
    mem_bytes: int
    kind: str = "sim"  # sim | qemu
    event_delay_ms: float = 0.0
    dirty_rate: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # per kind (QEMU: accel,
    # image; baseline: {"vnc_display", "serial_port"}, its consoles on the target's address)


@dataclass(frozen=True, slots=True)
class PrepareDomr:
    name: str
    ip: str
    mac: str
    announce: bool = True
    announce_schedule: str = DEFAULT_SCHEDULE
    guest: bool = False  # serves a guest (a domain of the hypervisor), not the echo service
    kind: str = "sim"  # the guest's: sim (hypercall channel) | qemu (device channel)
    source: str = ""  # the host driving the move (asked if it goes silent; the window)

    def __post_init__(self) -> None:
        control.ipv4("ip", self.ip)
        control.mac("mac", self.mac)


@dataclass(frozen=True, slots=True)
class DeviceLinks:
    """What S4 saved of U's device links, re-made on the target at S6."""

    pairs: list[list[int]] = field(default_factory=list)  # event-channel (R port, U port)
    state: dict[str, Any] = field(default_factory=dict)  # per kind (QEMU: unconsumed input)


@dataclass(frozen=True, slots=True)
class WireSeeds:
    """What the source saw of each client flow on its wire ("ip:port" -> the sequence
    number after the highest byte the client sent), so the target can judge the first
    segments it sees (keeper.net.wiretap)."""

    highs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SoloLinks:
    unbound: list[int]
    xenstore: dict[str, str]


class Paths:
    incoming = staticmethod(lambda name: f"/peer/guest/{name}/incoming")
    pages = staticmethod(lambda name: f"/peer/guest/{name}/pages")
    associate = staticmethod(lambda name: f"/peer/guest/{name}/associate")
    links = staticmethod(lambda name: f"/peer/guest/{name}/links")
    solo_links = staticmethod(lambda name: f"/peer/guest/{name}/solo-links")
    resume_guest = staticmethod(lambda name: f"/peer/guest/{name}/resume")
    cancel_guest = staticmethod(lambda name: f"/peer/guest/{name}/cancel")
    baseline_server = staticmethod(lambda name: f"/peer/guest/{name}/baseline-server")
    prepare_domr = "/peer/domr/prepare"
    restore_domr = staticmethod(lambda name: f"/peer/domr/{name}/restore")
    resume_domr = staticmethod(lambda name: f"/peer/domr/{name}/resume")
    cancel_domr = staticmethod(lambda name: f"/peer/domr/{name}/cancel")
    settle_domr = staticmethod(lambda name: f"/peer/domr/{name}/settle")
    migration = staticmethod(lambda name: f"/peer/migration/{name}")
    release = staticmethod(lambda name: f"/peer/migration/{name}/release")
    wire_domr = staticmethod(lambda name: f"/peer/domr/{name}/wire")
    status = "/status"


class PeerClient:
    """The source's view of a target agent (mutual TLS underneath)."""

    def __init__(self, http: Http) -> None:
        self.http = http

    async def incoming(self, req: IncomingGuest) -> dict[str, Any]:
        return await self.http.call("POST", Paths.incoming(req.name), json=asdict(req),
                                    timeout=60)

    async def pages(self, name: str, stream: AsyncIterator[bytes]) -> dict[str, Any]:
        return await self.http.call("POST", Paths.pages(name), data=stream,  # type: ignore[arg-type]
                                    timeout=PAGES_TIMEOUT)

    async def associate(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.associate(name))

    async def links(self, name: str, links: DeviceLinks) -> dict[str, Any]:
        return await self.http.call("POST", Paths.links(name), json=asdict(links))

    async def solo_links(self, name: str, links: SoloLinks) -> dict[str, Any]:
        return await self.http.call("POST", Paths.solo_links(name), json=asdict(links))

    async def resume_guest(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.resume_guest(name))

    async def cancel_guest(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.cancel_guest(name), timeout=CANCEL_TIMEOUT)

    async def baseline_server(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.baseline_server(name), timeout=30)

    async def prepare_domr(self, req: PrepareDomr) -> dict[str, Any]:
        return await self.http.call("POST", Paths.prepare_domr, json=asdict(req), timeout=30)

    async def restore_domr(self, name: str, checkpoint: bytes,
                           epoch: int = 0) -> dict[str, Any]:
        return await self.http.call("POST", f"{Paths.restore_domr(name)}?epoch={epoch}",
                                    data=checkpoint, timeout=RESTORE_TIMEOUT)

    async def resume_domr(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.resume_domr(name))

    async def cancel_domr(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.cancel_domr(name), timeout=CANCEL_TIMEOUT)

    async def settle_domr(self, name: str) -> dict[str, Any]:
        return await self.http.call("POST", Paths.settle_domr(name), timeout=SETTLE_TIMEOUT)

    async def migration(self, name: str) -> dict[str, Any]:
        """(target -> source) {"state": "driving" | an outcome | "unknown", "started"}."""
        return await self.http.call("GET", Paths.migration(name), timeout=5)

    async def release(self, name: str) -> dict[str, Any]:
        """(target -> source) I serve the pair you left undecided: drop your copies."""
        return await self.http.call("POST", Paths.release(name), timeout=30)

    async def wire_domr(self, name: str, seeds: WireSeeds) -> dict[str, Any]:
        """What the clients' TCP cost after the resume there (keeper.hostd.clientwire);
        answers once the target's window closed."""
        return await self.http.call("POST", Paths.wire_domr(name), json=asdict(seeds),
                                    timeout=WIRE_TIMEOUT)


class Target(Protocol):
    """What a host offers as a migration target (the host agent implements it)."""

    async def incoming_guest(self, req: IncomingGuest) -> dict[str, Any]: ...
    async def apply_pages(self, name: str,
                          read: Callable[[int], Awaitable[bytes]]) -> dict[str, Any]: ...
    async def associate(self, name: str) -> dict[str, Any]: ...
    async def restore_links(self, name: str, links: DeviceLinks) -> dict[str, Any]: ...
    async def solo_links(self, name: str, links: SoloLinks) -> dict[str, Any]: ...
    async def resume_guest(self, name: str) -> dict[str, Any]: ...
    async def cancel_guest(self, name: str) -> dict[str, Any]: ...
    async def baseline_server(self, name: str) -> dict[str, Any]: ...
    async def prepare_domr(self, req: PrepareDomr) -> dict[str, Any]: ...
    async def restore_domr(self, name: str, checkpoint: bytes,
                           epoch: int = 0) -> dict[str, Any]: ...
    async def resume_domr(self, name: str) -> dict[str, Any]: ...
    async def cancel_domr(self, name: str) -> dict[str, Any]: ...
    async def settle_domr(self, name: str) -> dict[str, Any]: ...
    async def migration(self, name: str) -> dict[str, Any]: ...
    async def release(self, name: str) -> dict[str, Any]: ...
    async def wire_domr(self, name: str, seeds: WireSeeds) -> dict[str, Any]: ...
    def identity(self) -> dict[str, Any]: ...


def routes(target: Target, guarded: Callable[[control.Handler], control.Handler]
           ) -> web.RouteTableDef:
    """The target half: each route parses its body once and calls `target`."""
    r = web.RouteTableDef()

    def named(fn: Callable[[str], Awaitable[dict[str, Any]]]) -> control.Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(await fn(request.match_info["name"]))
        return guarded(handler)

    @r.get(Paths.status)
    @guarded
    async def status(_: web.Request) -> web.StreamResponse:
        return web.json_response(target.identity())

    @r.post(Paths.incoming("{name}"))
    @guarded
    async def incoming(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, IncomingGuest)
        _same_name(request, req.name)
        return web.json_response(await target.incoming_guest(req))

    @r.post(Paths.pages("{name}"))
    @guarded
    async def pages(request: web.Request) -> web.StreamResponse:
        return web.json_response(await target.apply_pages(request.match_info["name"],
                                                          request.content.readexactly))

    @r.post(Paths.links("{name}"))
    @guarded
    async def links(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, DeviceLinks)
        return web.json_response(await target.restore_links(request.match_info["name"], req))

    @r.post(Paths.solo_links("{name}"))
    @guarded
    async def solo_links(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, SoloLinks)
        return web.json_response(await target.solo_links(request.match_info["name"], req))

    @r.post(Paths.prepare_domr)
    @guarded
    async def prepare(request: web.Request) -> web.StreamResponse:
        return web.json_response(await target.prepare_domr(
            await control.body(request, PrepareDomr)))

    @r.post(Paths.restore_domr("{name}"))
    @guarded
    async def restore(request: web.Request) -> web.StreamResponse:
        try:
            epoch = int(request.query.get("epoch", "0"))
        except ValueError:
            raise BadRequest("epoch must be an integer") from None
        return web.json_response(await target.restore_domr(request.match_info["name"],
                                                           await request.read(), epoch))

    r.post(Paths.associate("{name}"))(named(target.associate))
    r.post(Paths.resume_guest("{name}"))(named(target.resume_guest))
    r.post(Paths.cancel_guest("{name}"))(named(target.cancel_guest))
    r.post(Paths.baseline_server("{name}"))(named(target.baseline_server))
    r.post(Paths.resume_domr("{name}"))(named(target.resume_domr))
    r.post(Paths.cancel_domr("{name}"))(named(target.cancel_domr))
    r.post(Paths.settle_domr("{name}"))(named(target.settle_domr))
    r.get(Paths.migration("{name}"))(named(target.migration))
    r.post(Paths.release("{name}"))(named(target.release))

    @r.post(Paths.wire_domr("{name}"))
    @guarded
    async def wire(request: web.Request) -> web.StreamResponse:
        req = await control.body(request, WireSeeds)
        return web.json_response(await target.wire_domr(request.match_info["name"], req))

    return r


def refused(exc: BaseException) -> bool:
    """Whether `exc` (a KeeperError from keeper.http) is a connection refused: the
    peer's host answers but no agent listens there, its agent is gone (and, in this
    lab, everything it ran: guests and unconfirmed Domain Rs die with it)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        os_error = getattr(cause, "os_error", None)
        if isinstance(os_error, ConnectionRefusedError):
            return True
        cause = cause.__cause__
    return False


def _same_name(request: web.Request, name: str) -> None:
    if request.match_info["name"] != name:
        raise BadRequest(f"body names {name!r}, the path {request.match_info['name']!r}")
