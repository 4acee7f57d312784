"""Migrations from this host: the plans of keeper.migrate, given this agent's pieces.

The plans know neither the agent nor the hypervisor; here they get what they drive:
MM_U for the guest's hypervisor (the simulated VMM: keeper.migrate.sim; QEMU:
keeper.migrate.qemu), MM_R over the guest's Domain R (keeper.migrate.domr), the
baseline's servers (Dom0's for a simulated guest, QEMU's own consoles for a QEMU
guest), a typed peer client for the target.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from keeper.errors import KeeperError, MigrationError
from keeper.hostd import clientwire, drills, metrics
from keeper.hostd.agent import HostAgent
from keeper.hostd.guests import GuestEntry
from keeper.hostd.qemu_guests import QemuGuestEntry
from keeper.migrate.domr import DomrLink
from keeper.migrate.peer import IncomingGuest, PrepareDomr, WireSeeds
from keeper.migrate.plans import CoMigration, DomrMove, GuestMigrator, Progress, SoloMigration
from keeper.migrate.qemu import QemuGuest
from keeper.migrate.sim import SimGuest
from keeper.migrate.sync import Step
from keeper.migrate.trace import Trace

log = logging.getLogger("keeper.hostd")


class BaselineServers:
    """The conventional baseline's servers: the guest's VNC/SSH/console servers in Dom0
    (this agent's namespace, the host's address). They do not move: on a migration
    they serve the source guest until it is destroyed (reading input into its rings
    while it is stopped; after the final copy that input is lost), then end here;
    fresh ones start on the target (implements plans.Servers)."""

    def __init__(self, agent: HostAgent, name: str, target: str) -> None:
        self.agent, self.name, self.target = agent, name, target

    async def stop(self) -> None:
        await self.agent.stop_domr(self.name)  # the sessions end here

    async def start_on_target(self) -> None:
        await self.agent.peer(self.target).baseline_server(self.name)


class QemuConsoles:
    """The baseline's servers on QEMU: QEMU's own VNC server and serial console on the
    host's address (implements plans.Servers). They are QEMU's, so they move with
    nothing: the target QEMU was started with the same consoles on the target's
    address (listening from its start), and the source's die with the source QEMU.
    So, as under libvirt or OpenStack, a client stays connected to the source through
    the stop-and-copy (keys it types while the VM is stopped are dropped by QEMU)
    until the source QEMU is destroyed — `stop`, once the VM runs on the target (the
    release at COMMIT then finds it gone) — and then must find the new host.
    `start_on_target` only marks that point."""

    def __init__(self, destroy_source: Callable[[], Awaitable[None]]) -> None:
        self.destroy_source = destroy_source

    async def stop(self) -> None:
        await self.destroy_source()  # its consoles close with it

    async def start_on_target(self) -> None:
        return None


def domr_link(agent: HostAgent, name: str, target: str, *, guest: bool) -> DomrLink:
    entry = agent.domr(name)
    req = PrepareDomr(name=name, ip=entry.ip, mac=entry.mac, announce=entry.announce,
                      announce_schedule=entry.announce_schedule, guest=guest,
                      kind="qemu" if entry.devices is not None else "sim",
                      source=agent.host.name)

    async def set_link(up: bool) -> None:
        await agent.set_link(name, up=up)

    def on_epoch(epoch: int) -> None:
        entry.epoch = epoch

    return DomrLink(req, entry.control, agent.peer(target), set_link=set_link,
                    forget=lambda: agent.forget_domr(name), epoch=entry.epoch,
                    on_epoch=on_epoch)


def guest_migrator(agent: HostAgent, name: str, target: str,
                   progress: Progress | None) -> GuestMigrator:
    if agent.guest_kind(name) == "qemu":
        return qemu_migrator(agent, name, target, progress)
    g = agent.guests.get(name)
    r = agent.domrs.get(name)
    return SimGuest(
        agent.hv, g.u, IncomingGuest(**g.spec()), agent.peer(target),  # type: ignore[arg-type]
        r_domid=r.r_domid if r is not None else None,
        pause=lambda: agent.guests.pause(g), unpause=lambda: agent.guests.unpause(g),
        release=lambda: agent.guests.destroy(name), progress=progress)


def qemu_migrator(agent: HostAgent, name: str, target: str,
                  progress: Progress | None) -> QemuGuest:
    q = agent.qemu.get(name)
    r = agent.domrs.get(name)

    async def hold(on: bool) -> None:
        # Domain R holds its guest's input and waits until QEMU has read all of it
        if r is not None:
            await r.control.call("POST", "/hold", json={"on": on}, timeout=15)

    options: dict[str, object] = {}
    if q.baseline is not None:  # the target QEMU gets the same consoles on its address
        options["baseline"] = {"vnc_display": q.baseline.vnc_display,
                               "serial_port": q.baseline.serial_port}
    return QemuGuest(q.machine, IncomingGuest(name=name, mem_bytes=q.mem_mb << 20, kind="qemu",
                                              options=options),
                     agent.peer(target), history=q.journal_bytes,
                     release=lambda: agent.qemu.destroy(name),
                     hold=hold if r is not None and not r.baseline else None,
                     kernel=q.release, progress=progress)


def _cancel_drill(agent: HostAgent, plan: CoMigration | SoloMigration) -> list[str]:
    """Cancel this run just after it launches an action armed with a cancel drill;
    the returned list names that action once it happened. A `crash` drill at a step
    kills this agent there (before the action's request leaves), `kill_domr` the
    guest's Domain R here (SIGKILL), and the run goes on."""
    fired: list[str] = []
    task = asyncio.current_task()

    def hook(step: Step) -> None:
        for action in step.start:
            drill = agent.drills.take_step(action.name)
            if drill == "crash":
                log.warning("fault drill: crashing at %s", action.name)
                os._exit(70)
            if drill == "kill_domr":
                r = agent.domrs.get(plan.name)
                if r is not None and r.proc is not None:
                    log.warning("fault drill: killing Domain R (%d) at %s", r.proc.pid,
                                action.name)
                    drills.kill(r.proc.pid)
            if drill == "cancel" and not fired and task is not None:
                fired.append(action.name)
                # after the action's first step has run: cancelled in the middle of it
                asyncio.get_running_loop().call_soon(task.cancel)

    plan.hooks.append(hook)
    return fired


def _check_target(agent: HostAgent, name: str, target: str) -> None:
    agent.spec.host(target)
    if target == agent.host.name:
        raise KeeperError(f"{name} is already on {target}")


async def move_domr(agent: HostAgent, name: str, target: str) -> Trace:
    """A stand-alone Domain R to another host (MM_R alone)."""
    _check_target(agent, name, target)
    entry = agent.domr(name)
    entry.state = "moving"
    agent.outgoing[name] = "driving"
    try:
        trace = await DomrMove(name, agent.host.name, target,
                               domr_link(agent, name, target, guest=False)).run()
    finally:
        agent.outgoing[name] = "done"
        if name in agent.domrs:
            entry.state = "running"
    agent.moves += 1
    return trace


async def migrate_guest(agent: HostAgent, name: str, target: str,
                        progress: Progress | None = None) -> dict[str, object]:
    """Domain U and its Domain R to another host: co-migration, or the baseline's solo
    migration when the guest's servers run in Dom0."""
    _check_target(agent, name, target)
    g: GuestEntry | QemuGuestEntry = (agent.qemu.get(name) if agent.guest_kind(name) == "qemu"
                                      else agent.guests.get(name))
    qb = g if isinstance(g, QemuGuestEntry) and g.baseline is not None else None
    r = None if qb is not None else agent.domr(name)  # the QEMU baseline has no Domain R
    guest = guest_migrator(agent, name, target, progress)
    plan: SoloMigration | CoMigration
    if r is None:
        plan = SoloMigration(name, agent.host.name, target, guest,
                             QemuConsoles(lambda: agent.qemu.destroy(name)),
                             progress=progress)
    elif r.baseline:
        plan = SoloMigration(name, agent.host.name, target, guest,
                             BaselineServers(agent, name, target), progress=progress)
    else:
        plan = CoMigration(name, agent.host.name, target, agent.peer(target), guest,
                           domr_link(agent, name, target, guest=True), progress=progress)
    drill = _cancel_drill(agent, plan)
    agent.outgoing[name] = "driving"  # the target may ask (keeper.hostd.target)
    g.state = "moving"
    if r is not None:
        r.state = "moving"
    # the clients' retransmissions of the pause reach this host's wire (keeper.hostd.clientwire)
    tap = clientwire.open_tap(r.ip) if isinstance(plan, CoMigration) and r is not None else None
    ok = False
    try:
        summary = await plan.run()
        ok = True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if drill and task is not None and task.uncancel() == 0:  # ours, nobody else's
            metrics.MIGRATIONS.labels(result="rolled_back").inc()
            raise MigrationError(f"migration of {name} cancelled at {drill[0]} (drill), "
                                 f"it stays on {agent.host.name}") from None
        raise
    except BaseException:
        metrics.MIGRATIONS.labels(result="rolled_back").inc()
        raise
    finally:
        outcome = plan.trace.info.get("outcome", "failed")
        agent.outgoing[name] = outcome
        for item in (agent.guests.entries.get(name), agent.qemu.entries.get(name),
                     agent.domrs.get(name)):
            if item is not None:  # undecided: kept, not serving, until the target says
                item.state = "unsettled" if outcome == "failed_after_resume" else "running"
        if tap is not None and not ok:
            tap.close()  # rolled back: nothing to count
    if qb is not None:
        # QEMU's consoles never stopped: a client's outage is at least from the VM's
        # stop (keys dropped from then) to the source QEMU's exit (its consoles close,
        # the client may reconnect to the target), more its own reconnect
        t = plan.trace
        summary["downtime_ms"] = {"U": summary["downtime_ms"]["U"],
                                  "consoles": round(t.span("U stopped", "servers stopped"), 3),
                                  "after_final_copy": summary["downtime_ms"]["after_final_copy"]}
        summary["consoles"] = {"source": agent.host.mgmt_ip,
                               "target": agent.spec.host(target).mgmt_ip, **qb.services()}
    agent.moves += 1
    metrics.observe_migration(summary)
    if tap is not None:
        peer = agent.peer(target)
        summary["retransmits_client_source"] = agent.wire.settle(
            name, tap, summary["downtime_ms"]["R"],
            lambda highs: peer.wire_domr(name, WireSeeds(highs=highs)))
    return summary
