"""SSH to the guest's console, out of band: asyncssh in Domain R, wired to the console
backend. A session is a terminal on the guest's serial console.

Several SSH sessions on one guest console behave like several terminals on one
serial line: what the guest prints goes to every session (and to raw console
sessions), and what any of them types goes to the guest, in arrival order. That is
what a serial console is; the alternative (one exclusive owner) would lock out the
operator who needs it most.

The application side is explicit callbacks (`ConsoleSession`), with its state in a
plain dataclass (`ConsoleSessionState`), because a coroutine-based process handler
cannot be moved to another process. Supported on a session channel: pty-req, shell,
window-change, env, signals (INT and break become Ctrl-C on the console), eof and
Ctrl-] (end the session with exit status 0). Not supported: exec, subsystems (sftp), forwarding
of ports, agents or X11.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from keeper import serial
from keeper.console.raw import RawSession
from keeper.errors import CheckpointError
from keeper.ssh import policy
from keeper.ssh.movable import MovableSession

LOGIN = "admin"
CTRL_C = b"\x03"
# Ctrl-]: ends this SSH session with exit status 0 (as virsh console does); the
# guest never sees it. `exit` cannot do this: the guest's shell does not know SSH.
DETACH = b"\x1d"
# Output waiting for the client's SSH window above which the console is held back:
# keeps Domain R's memory and its checkpoints small when a client reads slowly.
OUTPUT_BACKLOG = 64 * 1024


@dataclass(slots=True)
class ConsoleSessionState:
    """Our own state of one SSH session channel (the transport's is asyncssh's)."""

    console: RawSession  # the byte pipe to the guest console, as raw sessions have
    term_type: str = ""
    term_size: list[int] = field(default_factory=lambda: [80, 24, 0, 0])
    env: dict[str, str] = field(default_factory=dict)
    shell: bool = False


class Console:
    """What a session needs from Domain R: register to receive output, send input,
    say when its backlog drained."""

    attach: Callable[[ConsoleSession], None]
    detach: Callable[[ConsoleSession], None]
    input: Callable[[RawSession], None]
    drained: Callable[[], None]


class ConsoleSession(MovableSession):
    def __init__(self, console: Console, state: ConsoleSessionState) -> None:
        self.console = console
        self.state = state
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.server: ConsoleServer | None = None  # which connection it belongs to
        self._backed_up_since: float | None = None  # this process's clock, not state

    # -- moving (keeper.ssh.movable) -------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        return {"console": serial.to_plain(self.state)}

    @classmethod
    def restored(cls, console: Console, app: dict[str, Any]) -> ConsoleSession:
        if "console" not in app:  # from_plain would take a missing state for None
            raise CheckpointError(f"an SSH console session's state without 'console': "
                                  f"{sorted(map(str, app))}")
        return cls(console, serial.from_plain(ConsoleSessionState, app["console"]))

    def session_restored(self) -> None:
        self.console.attach(self)

    def session_released(self) -> None:
        self.console.detach(self)

    # -- asyncssh callbacks ---------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Any) -> bool:
        self.state.term_type = term_type
        self.state.term_size = list(term_size)
        return True

    def shell_requested(self) -> bool:
        self.state.shell = True
        return True

    def exec_requested(self, command: str) -> bool:
        return False  # the console is a terminal, not a command runner

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        if self.chan is not None:  # env requests arrive before the shell request
            self.state.env = {str(k): str(v) for k, v in self.chan.get_environment().items()}
        self.console.attach(self)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        data, detach, _ = data.partition(DETACH)
        if data:
            self.state.console.receive(data)
            self.console.input(self.state.console)
        if detach and self.chan is not None:
            self.chan.exit(0)  # the guest's console stays; this terminal goes

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        self.state.term_size = [width, height, pixwidth, pixheight]

    def signal_received(self, signal: str) -> None:
        if signal in ("INT", "SIGINT"):
            self._interrupt()

    def break_received(self, msec: int) -> bool:
        self._interrupt()  # a serial break: what the guest's console sees as ^C
        return True

    def eof_received(self) -> bool:
        if self.chan is not None:
            self.chan.exit(0)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.console.detach(self)
        if self.server is not None:
            self.server.sessions.discard(self)

    # -- from Domain R ------------------------------------------------------------------

    def _interrupt(self) -> None:
        self.state.console.receive(CTRL_C)
        self.console.input(self.state.console)

    def write(self, data: bytes) -> None:
        """Console output for this terminal."""
        if self.chan is not None and not self.chan.is_closing():
            self.chan.write(data)

    def backed_up(self) -> bool:
        """More than a little output waits for the client's window: hold the console."""
        return self.chan is not None and self.chan.get_write_buffer_size() > OUTPUT_BACKLOG

    def backed_up_since(self, now: float) -> float | None:
        """Since when this session has held the console back without a break (None:
        it does not now)."""
        if not self.backed_up():
            self._backed_up_since = None
        elif self._backed_up_since is None:
            self._backed_up_since = now
        return self._backed_up_since

    def resume_writing(self) -> None:  # asyncssh: the channel's buffer drained
        self._backed_up_since = None
        self.console.drained()


class ConsoleServer(asyncssh.SSHServer):
    """Public-key (and optionally password) authentication for the one login name."""

    def __init__(self, make_session: Callable[[], ConsoleSession], *, login: str = LOGIN,
                 password: str | None = None) -> None:
        self.make_session = make_session
        self.login = login
        self.password = password
        self._user_ok = False
        self.conn: asyncssh.SSHServerConnection | None = None
        self.sessions: set[ConsoleSession] = set()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        # Authorized keys are checked by asyncssh (authorized_client_keys), for any
        # user name; the login name is checked here by offering no method to others.
        self._user_ok = username == self.login
        return True

    def public_key_auth_supported(self) -> bool:
        return self._user_ok

    def password_auth_supported(self) -> bool:
        return self._user_ok and self.password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return username == self.login and self.password is not None and (
            password == self.password)

    def session_requested(self) -> ConsoleSession:
        if len(self.sessions) >= policy.MAX_SESSIONS:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"at most {policy.MAX_SESSIONS} sessions per connection")
        session = self.make_session()
        session.server = self
        self.sessions.add(session)
        return session
