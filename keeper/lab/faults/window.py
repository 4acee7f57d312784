"""Drills of the window after Domain U resumed on the target (docs/design.md, "The
window"): each kills or fails one process at one point while a console session types
through the guest's Domain R, and checks that afterwards exactly one Domain R serves
the guest, on the host the design says, and that the session went on with nothing
lost, duplicated or reordered.

Each `Case` arms one drill (keeper.hostd.drills) on the source or the target agent:

  target agent crash   at guest_resumed (U runs on B, the answer lost), at link_up
                       (B's R link up, still in repair mode)   -> the pair on the source
  target step fails    at link_up                              -> on the source
  target R killed      at link_up (SIGKILL, in repair mode)    -> on the source
  target R's resume    fails preparing (every socket silent)    -> on the source
                       fails midway (the console's sockets left repair mode: past
                       the point of no return; the other services' sessions end
                       with an RST)                            -> on the target
  answer lost          B's R serves, its answer fails          -> on the target
  settle unanswered    B's R serves, the source never hears it (gives up undecided,
                       keeps everything); B asks it, finds it gave up, takes over,
                       and the source releases its copies     -> on the target
  source R killed      when RESUME_R is launched               -> on the target
  source agent crash   when RESUME_U or RESUME_R is launched (before its request
                       leaves: B holds the whole pair, unsettled, and takes it
                       over once it finds the source's agent gone), or COMMIT
                       (B confirmed already)                    -> on the target

`run_case(spec, case)` runs one in an existing lab (the tests' fixture); the `CASES`
drills build a lab of their own each (bench/faults.py).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

from keeper import ports
from keeper.errors import KeeperError
from keeper.lab import ops
from keeper.lab.faults import Drill, Row, in_lab
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.net import netns

GUEST = "guest1"
PROMPT = b"guest1:~$ "
SOURCE, TARGET = "a", "b"


@dataclass(frozen=True)
class Case:
    name: str  # the row's case, "window/..."
    on: str  # "source" | "target": whose agent the drill is armed on
    point: str  # a drill point (target) or a migration step (source)
    action: str  # fail | crash | kill_domr
    ends_on: str  # "source" | "target": where the pair serves afterwards

    def host(self, role: str) -> str:
        return SOURCE if role == "source" else TARGET


WINDOW = (
    Case("window/target-agent-crash/guest-resumed", "target", "guest_resumed", "crash",
         "source"),
    Case("window/target-agent-crash/link-up", "target", "link_up", "crash", "source"),
    Case("window/target-step-fails/link-up", "target", "link_up", "fail", "source"),
    Case("window/target-domr-killed/link-up", "target", "link_up", "kill_domr", "source"),
    Case("window/target-domr-prepare-fails", "target", "resume_prepare", "fail", "source"),
    Case("window/target-domr-resume-fails-midway", "target", "resume_midway", "fail",
         "target"),
    Case("window/answer-lost/resumed", "target", "resumed", "fail", "target"),
    Case("window/settle-unanswered", "target", "settle", "mute", "target"),
    Case("window/source-domr-killed/resume-r", "source", "RESUME_R", "kill_domr", "target"),
    Case("window/source-agent-crash/resume-u", "source", "RESUME_U", "crash", "target"),
    Case("window/source-agent-crash/resume-r", "source", "RESUME_R", "crash", "target"),
    Case("window/source-agent-crash/commit", "source", "COMMIT", "crash", "target"),
)


async def serving(spec: LabSpec, name: str = GUEST) -> list[dict[str, Any]]:
    """Every Domain R of `name` that a live agent reports serving (link up, running),
    with its host; a crashed agent reports none (its leftovers are not on the wire:
    an unconfirmed R died with it, a dumped one has its link down)."""
    found = []
    for h in (await ops.status(spec))["hosts"]:
        for d in h.get("domrs", []):
            if d["name"] == name and d.get("link_up") and \
                    d.get("domr", {}).get("phase") == "serving":
                found.append({"host": h["host"], "state": d["state"],
                              "sessions": len(d["domr"].get("sessions", []))})
    return found


async def run_case(spec: LabSpec, case: Case, *, mem_mb: int = 32) -> Row:
    """One drill in lab `spec` (hosts a and b with agents): a guest on a, a console
    session typing, the drill armed, one migration to b, then the verdict."""
    await ops.create_guest(spec, GUEST, SOURCE, mem_mb=mem_mb)
    before = (await ops.journal(spec, GUEST))["count"]
    doc = next(d for d in (await ops.status(spec))["domains"] if d["name"] == GUEST)
    typist = await Typist.over_tcp(spec.client_ns, (doc["ip"], 2323), PROMPT, period=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    extra: dict[str, Any] = {"point": case.point, "action": case.action, "on": case.on}
    # a resume failing midway ends the sessions of the services after the console's:
    # a VNC viewer (its greeting read) must learn at once, by an RST
    viewer = await _viewer(spec, doc["ip"]) if case.point == "resume_midway" else None
    try:
        await asyncio.sleep(0.5)
        await ops.call(spec, case.host(case.on), "POST", "/debug/fault",
                       json={"point": case.point, "action": case.action})
        try:
            trace = await ops.migrate(spec, GUEST, TARGET)
            extra["migration"] = "migrated"
            extra["settled"] = trace.get("settled")
        except KeeperError as exc:
            extra["migration"] = "failed"
            extra["error"] = str(exc)[:300]
        await asyncio.sleep(1.0)  # typing goes on wherever the pair is now
        want = case.host(case.ends_on)
        found: list[dict[str, Any]] = []
        for _ in range(40):  # a loaded machine may still be finishing a rollback
            found = await serving(spec)
            if [f["host"] for f in found] == [want]:
                break
            await asyncio.sleep(0.25)
        extra["serving"] = [f["host"] for f in found]
        if viewer is not None:
            extra["viewer"] = await _viewer_end(viewer)
    finally:
        stop.set()
        stats = await task
        typist.close()
    journal = (await ops.journal(spec, GUEST))["journal"][before:]
    verdict = compare(bytes(stats.sent), journal)
    extra.update(sent=len(stats.sent), duplicated=verdict["duplicated"],
                 reordered=verdict["reordered"], errors=stats.errors[:3])
    recovered = (extra["serving"] == [want] and not stats.errors
                 and verdict["duplicated"] == 0 and verdict["reordered"] == 0
                 and verdict["lost"] == 0 and len(stats.sent) > 0)
    return Row(case.name, sessions=1, lost=verdict["lost"], reconnects=0,
               recovered=recovered, extra=extra)


async def _viewer(spec: LabSpec, ip: str) -> socket.socket:
    with netns.entered(spec.client_ns):
        sock = socket.create_connection((ip, ports.VNC), timeout=10)
    sock.recv(12)  # "RFB 003.008\n": the session exists on Domain R
    return sock


async def _viewer_end(sock: socket.socket, wait: float = 5.0) -> str:
    """How the viewer's connection ended: "reset", "closed" (a FIN) or "open"."""
    sock.settimeout(0.0)
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), wait)
        return "closed" if data == b"" else "open"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    finally:
        sock.close()


async def fresh_session(spec: LabSpec, seconds: float = 1.5) -> dict[str, Any]:
    """A new console session to the guest, typing for `seconds`: what it lost."""
    before = (await ops.journal(spec, GUEST))["count"]
    doc = next(d for d in (await ops.status(spec))["domains"] if d["name"] == GUEST)
    typist = await Typist.over_tcp(spec.client_ns, (doc["ip"], 2323), PROMPT, period=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    stats = await task
    typist.close()
    journal = (await ops.journal(spec, GUEST))["journal"][before:]
    return {**compare(bytes(stats.sent), journal), "sent": len(stats.sent),
            "errors": stats.errors[:3]}


def _drill(case: Case) -> Drill:
    async def run() -> Row:
        return await in_lab("kw", case.name, lambda spec: run_case(spec, case))

    return Drill(case.name, run)


# Not a drill here: b's agent dying right after b's R served (a host crash after the
# hand-over) resets the sessions by design; tests/migrate/test_window.py pins it.
CASES: list[Drill] = [_drill(c) for c in WINDOW]
