"""Sans-I/O core of one raw console session: a byte pipe with two holding areas.

`pending_in` holds bytes read from the client that the device has not taken yet;
`pending_out` holds bytes for the client that the kernel has not taken yet. Both
are part of a checkpoint, so nothing read or produced is ever lost in a move. The
core never touches a socket; the asyncio adapter in keeper.console.service drives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from keeper.errors import ProtocolError

# Above this much unsent output the adapter stops reading from the client
# (backpressure), so a checkpoint stays bounded.
OUTPUT_HIGH_WATER = 256 * 1024
# Above this much input the device has not taken yet (a full ring), likewise.
INPUT_HIGH_WATER = 64 * 1024


@dataclass(slots=True)
class RawSession:
    id: int
    pending_in: bytes = b""
    pending_out: bytes = b""
    received: int = 0  # bytes read from the client in total
    sent: int = 0  # bytes handed to the kernel in total
    peer_eof: bool = False

    def receive(self, data: bytes) -> None:
        if self.peer_eof:
            raise ProtocolError("data after end of stream", fault="client")
        if not data:
            self.peer_eof = True
            return
        self.pending_in += data
        self.received += len(data)

    def take_input(self, limit: int | None = None) -> bytes:
        """The device takes up to `limit` bytes of the client's input."""
        if limit is None or limit >= len(self.pending_in):
            data, self.pending_in = self.pending_in, b""
        else:
            data, self.pending_in = self.pending_in[:limit], self.pending_in[limit:]
        return data

    def queue_output(self, data: bytes) -> None:
        self.pending_out += data

    def unqueue_front(self, data: bytes) -> None:
        """Put bytes back at the head of the output (the restored kernel send queue)."""
        self.pending_out = data + self.pending_out

    def data_to_send(self) -> bytes:
        return self.pending_out

    def sent_bytes(self, n: int) -> None:
        self.pending_out = self.pending_out[n:]
        self.sent += n

    @property
    def wants_input(self) -> bool:
        return (len(self.pending_out) < OUTPUT_HIGH_WATER
                and len(self.pending_in) < INPUT_HIGH_WATER and not self.peer_eof)

    @property
    def finished(self) -> bool:
        # with an echo device pending_in drains at once; with a guest console the
        # client may close before its last bytes reached the ring: those still go
        return self.peer_eof and not self.pending_in and not self.pending_out
