"""The project's one exception root and its main branches."""

from __future__ import annotations

import errno as _errno


class KeeperError(Exception):
    """Root of every error keeper raises on purpose."""


class ProtocolError(KeeperError):
    """A peer broke a protocol. `fault` names the side at fault ("client", "peer", "us")."""

    def __init__(self, message: str, *, fault: str = "client") -> None:
        super().__init__(message)
        self.fault = fault


class KernelError(KeeperError):
    """A kernel call failed; keeps the errno and the step that failed."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        text = f"{step}: {name} ({err})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
        self.step = step
        self.errno = err

    @classmethod
    def wrap(cls, step: str, exc: OSError, detail: str = "") -> KernelError:
        return cls(step, exc.errno or 0, detail or (exc.strerror or ""))


class NotMovable(KeeperError):
    """A session or socket is in a state that cannot be checkpointed; it stays where it is."""


class CheckpointError(KeeperError):
    """A checkpoint could not be read: wrong version, wrong kind, or damaged."""


class MigrationError(KeeperError):
    """A migration failed; the domains keep running on the source."""


class BadRequest(KeeperError):
    """A request to one of our APIs is malformed (a missing field, a wrong type): the
    caller's fault, answered with a 400 and the reason."""


class LabError(KeeperError):
    """The lab topology is missing or inconsistent."""
