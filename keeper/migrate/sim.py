"""MM_U for the simulated hypervisor (keeper.vmm): Domain U's memory as a page stream.

  create_incoming  the target makes an empty Domain U and a guest process that waits
  iterate          one pre-copy round: every page first, then what the guest dirtied
                   meanwhile (log-dirty, ORed with may-write), zero runs elided;
                   ready when few dirty pages remain (or too many rounds / bytes)
  stop             the guest process pauses at a clean point (all state in memory)
  save_links       the event-channel port pairs between R and U (S4)
  final_copy       what is still dirty, ORed with may-write (the rings R wrote)
  link             target: the same port pairs re-made (S6); the baseline instead
                   offers U's ports to Dom0 again and re-creates its XenStore entries
  resume           target: the guest process runs on the copied memory
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from keeper.migrate import pagestream
from keeper.migrate.peer import DeviceLinks, IncomingGuest, PeerClient, SoloLinks
from keeper.vmm.hypervisor import Domain, Hypervisor

ROUND_PAUSE = 0.02  # between converged rounds while Domain R is not ready yet
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Policy:
    """When pre-copy stops: few dirty pages left, or too many rounds, or too much sent."""

    max_rounds: int = 30
    min_dirty_pages: int = 64
    max_sent_factor: float = 3.0


class SimGuest:
    """Implements plans.GuestMigrator for a simulated Domain U."""

    kind = "sim"

    def __init__(self, hv: Hypervisor, u: Domain, req: IncomingGuest, peer: PeerClient, *,
                 r_domid: int | None, pause: Callable[[], Awaitable[None]],
                 unpause: Callable[[], Awaitable[None]],
                 release: Callable[[], Awaitable[None]],
                 policy: Policy | None = None, progress: Progress | None = None) -> None:
        self.hv, self.u, self.req, self.peer, self.r_domid = hv, u, req, peer, r_domid
        self._pause, self._unpause, self._release = pause, unpause, release
        self.policy = policy or Policy()
        self.progress = progress or (lambda event: None)
        self.rounds: list[dict[str, Any]] = []
        self.bytes_sent = self._sent_pages = 0
        self._converged = False
        self._paused = False  # set before the pause is asked for

    async def create_incoming(self) -> None:
        await self.peer.incoming(self.req)
        self.hv.mark_all_dirty(self.u.domid)  # round 1 sends every page

    async def iterate(self) -> bool:
        if self._converged:  # S2: keep the final copy small while R gets ready
            await asyncio.sleep(ROUND_PAUSE)
        pfns = self.hv.collect_dirty(self.u.domid)
        await self._send(pfns)
        self._sent_pages += len(pfns)
        pending = int(np.count_nonzero(self.u.dirty_view()))
        self.progress({"phase": "pre-copy", "round": len(self.rounds), "pages": len(pfns),
                       "dirty_now": pending})
        p = self.policy
        self._converged = self._converged or pending <= p.min_dirty_pages or (
            len(self.rounds) >= p.max_rounds
            or self._sent_pages >= p.max_sent_factor * self.u.pages)
        return self._converged

    async def stop(self) -> None:
        self._paused = True
        await self._pause()

    async def save_links(self) -> DeviceLinks:
        assert self.r_domid is not None
        pairs = self.hv.save_evtchns(self.r_domid, self.u.domid)
        return DeviceLinks(pairs=[list(p) for p in pairs])

    async def final_copy(self) -> None:
        await self._send(self.hv.collect_dirty(self.u.domid), final=True)

    async def link(self, links: DeviceLinks | None) -> None:
        if links is not None:
            await self.peer.links(self.req.name, links)
            return
        prefix = f"/local/domain/{self.u.domid}/"
        xs = {k[len(prefix):]: v for k, v in self.hv.xenstore.subtree(prefix[:-1]).items()
              if "/device/" in k or "/console/" in k}
        await self.peer.solo_links(self.req.name, SoloLinks(
            unbound=self.hv.ports_of(self.u.domid), xenstore=xs))

    async def resume(self) -> None:
        await self.peer.resume_guest(self.req.name)

    async def unpause(self) -> None:
        if self._paused:
            await self._unpause()
            self._paused = False

    async def cancel_target(self) -> None:
        await self.peer.cancel_guest(self.req.name)

    async def release(self) -> None:
        await self._release()

    def partner_ready(self) -> None:
        pass  # pre-copy needs nothing of Domain R

    def report(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "bytes_sent": self.bytes_sent,
                "mem_bytes": self.u.pages * 4096, "guest": {"kind": self.kind}}

    async def _send(self, pfns: np.ndarray, *, final: bool = False) -> None:
        mem = memoryview(self.u.mem)  # type: ignore[arg-type]
        counted = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal counted
            for chunk in pagestream.encode(mem, pfns):
                counted += len(chunk)
                yield chunk
                await asyncio.sleep(0)  # keep the agent responsive during big rounds

        t0 = time.monotonic()
        await self.peer.pages(self.req.name, body())
        self.bytes_sent += counted
        self.rounds.append({"round": len(self.rounds) + 1, "pages": len(pfns),
                            "bytes": counted, "ms": round((time.monotonic() - t0) * 1e3, 3),
                            "final": final})
