"""The one interface through which Domain R drives its servers (raw console, SSH, VNC).

A service owns its listener, its sessions and their sockets; Domain R owns the phase
machine and the devices, and calls every service in turn at each step. The order:

  source      bind → start → quiesce → checkpoint, then either
                release          the move succeeded: drop the sockets silently
                resume_in_place  rolled back (after quiesce or checkpoint): the sockets
                                 leave repair mode, the sessions serve again; then start
  target      bind → restore → prepare_resume → resume (or abandon) → start
              Bind first: a restored socket may share a port with a listener only
              while it is in repair mode.
  any time    status; close (idempotent)

The guest console's device is stopped before any service quiesces (S3: from then on
nobody touches the shared ring) and started after every service resumed.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

C = TypeVar("C")  # a service's part of the checkpoint: plain data (keeper.serial)


class Service(Protocol[C]):
    name: str  # "console", "ssh", "vnc": names its part of the checkpoint and of /status

    def bind(self) -> None:
        """Listen, not accepting yet. Idempotent."""

    def start(self) -> None:
        """Serve: accept; sessions read and write. Idempotent."""

    async def quiesce(self) -> list[str]:
        """Stop accepting, reading and writing; everything stays in state. Returns the
        sessions that cannot move, with the reason: they go on here until the end."""
        ...

    def checkpoint(self, left_behind: list[str]) -> C:
        """Dump every session with its TCP repair record (the link is down); sockets
        stay in repair mode. A session that cannot be dumped stays here and its
        reason goes into `left_behind`."""
        ...

    def resume_in_place(self) -> None:
        """Roll back a quiesce or a checkpoint: sockets leave repair mode, sessions
        serve again."""

    def release(self) -> None:
        """The move succeeded: drop every moved socket in repair mode (no FIN, no RST)
        and stop listening."""

    def restore(self, ckpt: C) -> None:
        """On the target: rebuild the sessions, sockets in repair mode, link still down.
        All or nothing: on failure, what this call restored is dropped silently."""

    async def prepare_resume(self) -> None:
        """The link is up, the sockets still in repair mode: do everything about the
        restored sessions that can fail, touching no socket. A failure here leaves
        nothing seen: the move rolls back."""

    async def resume(self) -> None:
        """Leave repair mode, serve the restored sessions. Past the point of no
        return: a session that cannot be served ends alone (an RST)."""

    def abandon(self) -> None:
        """Another step of the resume failed: the restored sessions this service has
        not served yet end, each with an RST, and none is left in repair mode."""

    async def close(self) -> None:
        """Idempotent: stop accepting, close the sessions (silently if in repair mode)."""

    def status(self) -> list[dict[str, object]]:
        """One entry per session, for Domain R's /status."""
        ...


class ConsoleFed(Protocol):
    """A service whose sessions are terminals on the guest's console (raw, SSH): the
    console backend hands it output and asks it to retry held input."""

    def broadcast(self, data: bytes) -> None:
        """Guest output for every session (terminals on one serial line)."""

    def retry_inputs(self) -> None:
        """The guest made room in its ring: sessions hand over the input they hold."""

    def may_output(self) -> bool:
        """False while a session is backed up: the console then holds the guest back."""
        ...
