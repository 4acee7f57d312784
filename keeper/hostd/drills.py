"""Failure drills: one-shot faults armed through the control API (tests, operators).

`POST /debug/fault {"point": P, "action": "fail"|"crash"}` arms point P once: the
next time the agent passes it, the request fails (a clean error, the migration rolls
back) or the agent process dies on the spot (exit 70), as a crashed host would.
`"kill_guest"` kills the guest's QEMU there (a QEMU guest, at associate, evtchns or
guest_resume on the target) and carries on; `"kill_domr"` kills the Domain R
process there (SIGKILL: at link_up or resumed on the target) and carries on.
`{"point": ACTION, "action": "cancel"}` (ACTION one of keeper.migrate.sync.Action's
names) cancels the next migration run from this host just after it launched that
action: the rollback a cancelled migration must do, drilled at every step. On the
source, `{"point": ACTION, "action": "crash" | "kill_domr"}` kills this agent, or the
migrating guest's Domain R here, just after the run launched ACTION (the window
after Domain U resumed on the target, docs/design.md). `"mute"` (at settle, on the
target) fails every settle request from the source until disarmed, as a target the
source cannot hear from would: the source gives up undecided. `"fail"` at
`resume_prepare` (on the target) makes its Domain R's resume fail after its first
service prepared, all sockets still in repair mode (the move rolls back); at
`resume_midway`, after its first service left repair mode, as a service whose
resume raises would (past the point of no return: the other services' sessions end,
the first one's serve on the target).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

from keeper.errors import BadRequest, KeeperError
from keeper.migrate.sync import Action

log = logging.getLogger("keeper.hostd")

ACTIONS = ("fail", "crash", "cancel", "kill_guest", "kill_domr", "mute")
# where the agent checks for an armed fault, in the order a migration passes them
POINTS = ("incoming", "prepare", "associate", "pages", "evtchns", "restore", "restored",
          "guest_resume", "guest_resumed", "link_up", "resume_prepare", "resume_midway",
          "resumed", "settle")
STEPS = tuple(a.name for a in Action)
AT_STEP = ("cancel", "crash", "kill_domr")  # what a source's drill at a step may do
# on a target, at the point "checkpoint": the checkpoint damaged as it arrives (Drills.damaged)
DAMAGES = ("truncate", "forge")


@dataclass
class Drills:
    armed: dict[str, str] = field(default_factory=dict)  # point -> action

    def arm(self, point: str, action: str) -> dict[str, str]:
        if action in DAMAGES:  # the checkpoint as it arrives on the target (hostile input)
            if point != "checkpoint":
                raise BadRequest(f"{action} is a drill of the point 'checkpoint', not {point!r}")
            self.armed[point] = action
            return dict(self.armed)
        if action not in ACTIONS:
            raise BadRequest(f"fault action must be one of {', '.join(ACTIONS)}, not {action!r}")
        points = STEPS if action == "cancel" else POINTS
        if point in STEPS and action in AT_STEP:
            points = STEPS
        if point not in points:
            raise BadRequest(f"unknown fault point {point!r} for {action}; points: "
                             f"{', '.join(points)}")
        self.armed[point] = action
        return dict(self.armed)

    def damaged(self, blob: bytes) -> bytes:
        """A checkpoint as a broken or hostile source would send it, if a damage drill
        is armed at "checkpoint" (once): `truncate` cuts it in half, `forge` puts one
        of its sockets on another address (a checkpoint that still decodes)."""
        action = self.armed.pop("checkpoint", None)
        if action == "truncate":
            log.warning("fault drill: the checkpoint cut to %d of %d bytes", len(blob) // 2,
                        len(blob))
            return blob[: len(blob) // 2]
        if action == "forge":
            from keeper import serial
            from keeper.domr import checkpoint as ck

            doc = serial.loads(ck.KIND, blob, ck.DomrCheckpoint)  # not checked: as is
            for session in doc.console.sessions[:1]:
                session.tcp.local_addr = "127.0.0.1"
            log.warning("fault drill: a console socket of the checkpoint moved to 127.0.0.1")
            return ck.encode(doc)
        return blob

    def take_cancel(self, action: str) -> bool:
        """True (once) if a cancel drill is armed at migration step `action`."""
        return self.take_step(action) == "cancel"

    def take_step(self, action: str) -> str | None:
        """The drill armed at migration step `action` (once), if any."""
        if self.armed.get(action) in AT_STEP:
            return self.armed.pop(action)
        return None

    def check(self, point: str, *, guest_pid: int | None = None,
              domr_pid: int | None = None) -> None:
        """Pass `point`: fail or crash if a drill is armed there (once); `kill_guest`
        kills the guest's QEMU (`guest_pid`) and goes on, as a crashed VM would;
        `kill_domr` likewise Domain R's process (`domr_pid`)."""
        if self.armed.get(point) == "mute":  # stays armed
            raise KeeperError(f"fault drill: no answer at {point}")
        action = self.armed.pop(point, None)
        if action == "kill_guest" and guest_pid is not None:
            log.warning("fault drill: killing the guest (QEMU %d) at %s", guest_pid, point)
            os.kill(guest_pid, signal.SIGKILL)
        if action == "kill_domr" and domr_pid is not None:
            log.warning("fault drill: killing Domain R (%d) at %s", domr_pid, point)
            kill(domr_pid)
        if action == "crash":
            log.warning("fault drill: crashing at %s", point)
            os._exit(70)
        if action == "fail":
            raise KeeperError(f"fault drill: failing at {point}")


def kill(pid: int) -> None:
    """SIGKILL a process of ours and wait until it is gone (a crash, not a stop)."""
    import time

    from keeper.hostd import procs

    if not procs.is_ours(pid):
        return
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not procs.alive(pid):
            return
        time.sleep(0.01)
