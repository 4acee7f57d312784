"""MM_R: move a Domain R — its IP, MAC and live TCP sessions — to another host.

Source agent, in this order (DESIGN.md §5 and the traps it lists):

  1. prepare   target makes the twin namespace (same IP/MAC, link DOWN) and starts an
               empty Domain R there, ready before we stop anything
  2. quiesce   source Domain R stops accepting, reading and writing
  3. link down source link down: from here no segment reaches the old sockets, and
               none can draw a RST when they are released
  4. dump      source Domain R dumps every socket (repair mode) and session state
  5. restore   checkpoint goes to the target agent over TCP on the management network;
               target: restore (repair mode, link down) → link up → resume (repair
               off with a window probe, gratuitous ARP, serve)
  6. commit    source Domain R drops its repaired sockets silently and exits; its
               namespace is removed

Any failure in 1-5 rolls back: the target is cancelled, the source link comes up and
the source Domain R leaves repair mode and serves on. The client sees a pause.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from keeper.errors import KeeperError, MigrationError
from keeper.migrate.trace import Trace

if TYPE_CHECKING:
    from keeper.hostd.agent import HostAgent

log = logging.getLogger("keeper.mm_r")

RESTORE_TIMEOUT = 60.0


async def move_out(agent: HostAgent, dom: str, target: str) -> Trace:
    entry = agent.domr(dom)
    if target == agent.host.name:
        raise MigrationError(f"{dom} is already on {target}")
    peer = agent.peer(target)
    trace = Trace("domr", dom, agent.host.name, target)
    entry.state = "moving"
    stopped = False
    try:
        trace.mark("start")
        await peer.call("POST", "/peer/domr/prepare",
                        json={"name": dom, "ip": entry.ip, "mac": entry.mac,
                              "announce": entry.announce,
                              "announce_schedule": entry.announce_schedule})
        trace.mark("prepared")
        await entry.control.call("POST", "/quiesce")
        stopped = True
        trace.mark("quiesced")
        await agent.set_link(dom, up=False)
        trace.mark("link_down")
        blob, headers = await entry.control.request("POST", "/checkpoint")
        trace.mark("dumped")
        trace.info["checkpoint_bytes"] = len(blob)
        trace.info["sessions"] = int(headers.get("X-Keeper-Sessions", "0"))
        trace.info["dump_ms"] = float(headers.get("X-Keeper-Dump-Ms", "0"))
        trace.info["queued_in"] = int(headers.get("X-Keeper-Queued-In", "0"))
        trace.info["queued_out"] = int(headers.get("X-Keeper-Queued-Out", "0"))
        result = await peer.call("POST", f"/peer/domr/{dom}/restore", data=blob,
                                 timeout=RESTORE_TIMEOUT)
        result.update(await peer.call("POST", f"/peer/domr/{dom}/resume"))
        trace.mark("resumed")
        trace.info["restore"] = result
    except BaseException as exc:
        try:
            await _roll_back(agent, dom, peer, stopped)
        finally:
            entry.state = "running"
        trace.mark("rolled_back")
        if not isinstance(exc, Exception):
            raise  # cancellation: rolled back, and still cancelled
        raise MigrationError(f"moving Domain R {dom} to {target} failed, it stays on "
                             f"{agent.host.name}: {exc}") from exc
    # The target serves now; the source's copy must go without a sound.
    try:
        await entry.control.call("POST", "/commit")
    except KeeperError as exc:
        log.warning("commit on source %s: %s (killing it)", dom, exc)
    await agent.forget_domr(dom)
    trace.mark("source_released")
    trace.info["pause_ms"] = round(trace.span("quiesced", "resumed"), 3)
    return trace


async def _roll_back(agent: HostAgent, dom: str, peer, stopped: bool) -> None:  # type: ignore[no-untyped-def]
    try:
        await peer.call("POST", f"/peer/domr/{dom}/cancel", timeout=10)
    except KeeperError as exc:
        log.warning("cancel on target failed: %s", exc)
    entry = agent.domr(dom)
    await agent.set_link(dom, up=True)
    if stopped:
        await entry.control.call("POST", "/abort")
    entry.state = "running"
