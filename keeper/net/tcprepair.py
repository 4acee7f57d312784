"""Dump an established TCP socket and bring it back elsewhere, with Linux TCP_REPAIR.

The state that matters and the order of calls follow CRIU's libsoccr (soccr/soccr.c);
the code is ours. The record is flat plain data, so it travels inside a checkpoint.

Dump (`dump`): repair on, then read TCP_INFO (state, options, window scales), the
queue lengths (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD), MSS, TCP_TIMESTAMP, TCP_REPAIR_WINDOW,
and for each queue its sequence (TCP_QUEUE_SEQ) and bytes (MSG_PEEK in repair mode).
The socket is left in repair mode: closing it then sends nothing (no FIN, no RST), and
`leave_repair` puts it back to work if the move is rolled back.

Restore (`restore`), into a socket of the calling thread's network namespace:
  1. socket, repair on, TCP_MAXSEG (so the MSS cache is right from connect on), bind
     to the saved local address (it must exist here);
  2. TCP_QUEUE_SEQ: receive = rcv_nxt - len(receive queue), send = snd_una.
     Re-queueing advances the sequence, hence next minus length (DESIGN.md §5);
  3. connect: no SYN in repair mode, the socket is ESTABLISHED at once;
  4. TCP_REPAIR_OPTIONS (SACK, window scale, timestamps, MSS), TCP_TIMESTAMP;
  5. re-inject the receive queue;
  6. TCP_REPAIR_WINDOW last (the kernel checks it against rcv_nxt).
The socket stays in repair mode until `leave_repair`.

Where we differ from libsoccr: the never-sent part of the send queue is not sent
mid-restore with repair briefly off (the link is down then); it is handed back
(`Restored.resend`) for the caller to send once the link is up, right after
`leave_repair`. And when the sent-but-unacknowledged part is small (it fits the
peer's window and a fresh socket's initial congestion window, as keys' echoes do),
it is handed back too instead of re-injected as sent: re-injected, a segment the
blackout lost would wait for the restored socket's retransmission timer, and a
fresh socket has no RTT sample, so its first RTO is 1 s (TCP_TIMEOUT_INIT). Sent as
new data it goes at once, and what the peer already had it drops as a duplicate.
Until it is sent, snd_nxt is behind what the peer may acknowledge and the kernel
drops such an ACK; since it all goes in one flight, the peer's next ACK is accepted.
A larger part is re-injected as sent (else the peer's ACKs, ahead of snd_nxt, would
be dropped while the congestion window waits for them: a stall). Nothing here may
run while packets can reach the socket: the caller keeps the link down (libsoccr's
own warning).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import socket
import struct
from dataclasses import dataclass

from keeper.errors import KernelError, NotMovable
from keeper.net.tcpinfo import (
    TCP_INFO,
    TCP_STATES,
    TCPI_OPT_SACK,
    TCPI_OPT_TIMESTAMPS,
    TCPI_OPT_WSCALE,
)

log = logging.getLogger("keeper.net")

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WINDOW_PROBE = 1, 0, -1
# TCP option kinds for TCP_REPAIR_OPTIONS
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
# ioctls: bytes in the receive queue, in the send queue, and not yet sent
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

TCP_ESTABLISHED = 1
INIT_CWND = 10  # segments: a new socket's congestion window (TCP_INIT_CWND)
_WINDOW = struct.Struct("=5I")
_OPT = struct.Struct("=II")
_INFO_HEAD = struct.Struct("=8B")  # struct tcp_info up to the window scales
_INT = struct.Struct("=i")
_SEQ_MOD = 1 << 32


@dataclass(slots=True)
class TcpRepairRecord:
    """Everything needed to bring one established TCP connection back (one flat record)."""

    family: int
    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    inq_seq: int  # rcv_nxt: next byte expected from the peer
    outq_seq: int  # write_seq: next byte we would queue
    inq: bytes  # received, not yet read by the application
    outq: bytes  # queued for the peer, not acknowledged (sent part first)
    unsent_len: int  # how much of outq was never sent
    mss: int
    sack: bool
    wscale: bool
    timestamps: bool
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    sndbuf: int
    rcvbuf: int
    nodelay: bool

    @property
    def snd_una(self) -> int:
        return (self.outq_seq - len(self.outq)) % _SEQ_MOD

    def describe(self) -> str:
        return (
            f"{self.local_addr}:{self.local_port}<->{self.peer_addr}:{self.peer_port} "
            f"inq={len(self.inq)} outq={len(self.outq)} (unsent {self.unsent_len})"
        )


@dataclass(slots=True)
class Restored:
    """A restored socket (still in repair mode) and the bytes to send once it is live."""

    sock: socket.socket
    resend: bytes  # the send queue's bytes to send once live (see the module's notes)


# Each move makes some 30 of these calls per socket, so they stay cheap (profiled): an
# int goes to setsockopt as an int (a bytes value first fails the int parse inside
# CPython, which costs an exception, ~2 us), and ioctls write into a bytearray.
_I32 = 1 << 31


def _set(sock: socket.socket, opt: int, value: int | bytes, step: str) -> None:
    if isinstance(value, int) and value >= _I32:  # sequence numbers use all 32 bits
        value -= _SEQ_MOD
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:
        raise KernelError.wrap(step, exc) from exc


def _get_int(sock: socket.socket, opt: int, step: str) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, opt)
    except OSError as exc:
        raise KernelError.wrap(step, exc) from exc


def _ioctl_int(sock: socket.socket, request: int, step: str) -> int:
    try:
        buf = bytearray(4)
        fcntl.ioctl(sock.fileno(), request, buf, True)
        return _INT.unpack(buf)[0]
    except OSError as exc:
        raise KernelError.wrap(step, exc) from exc


def enter_repair(sock: socket.socket) -> None:
    _set(sock, TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on")


def leave_repair(sock: socket.socket, *, window_probe: bool = True) -> None:
    """Back to normal operation. A window probe tells the peer at once where we are."""
    _set(sock, TCP_REPAIR, REPAIR_OFF if window_probe else REPAIR_OFF_NO_WINDOW_PROBE,
         "TCP_REPAIR off")


def _peek_queue(sock: socket.socket, queue: int, length: int, name: str) -> tuple[int, bytes]:
    _set(sock, TCP_REPAIR_QUEUE, queue, f"TCP_REPAIR_QUEUE {name}")
    seq = _get_int(sock, TCP_QUEUE_SEQ, f"TCP_QUEUE_SEQ {name}") % _SEQ_MOD
    data = b""
    if length:
        try:
            data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError as exc:
            raise KernelError.wrap(f"peek {name} queue", exc) from exc
        if len(data) != length:
            raise KernelError(f"peek {name} queue", errno.EIO,
                              f"read {len(data)} of {length} bytes")
    return seq, data


def dump(sock: socket.socket) -> TcpRepairRecord:
    """Checkpoint an ESTABLISHED socket. Leaves it in repair mode.

    Refuses (NotMovable, socket left as it was) any other state: a half-closed
    connection carries a FIN in its sequence space that only a raw packet could
    re-create, so it is not moved.
    """
    enter_repair(sock)
    get, tcp = sock.getsockopt, socket.IPPROTO_TCP
    step = "TCP_INFO"
    try:
        try:
            # only the head of tcp_info: state, options, window scales
            state, _, _, _, _, options, wscales, _ = _INFO_HEAD.unpack_from(
                get(tcp, TCP_INFO, _INFO_HEAD.size))
            if state != TCP_ESTABLISHED:
                raise NotMovable(
                    f"TCP connection in state {TCP_STATES.get(state, state)} "
                    "cannot be moved (only ESTABLISHED is)"
                )
            inq_len = _ioctl_int(sock, SIOCINQ, "SIOCINQ")
            outq_len = _ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")
            unsent_len = _ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
            step = "TCP_MAXSEG"
            mss = get(tcp, socket.TCP_MAXSEG)
            step = "TCP_TIMESTAMP get"
            timestamp = get(tcp, TCP_TIMESTAMP) & 0xFFFFFFFF
            step = "TCP_REPAIR_WINDOW get"
            window = _WINDOW.unpack(get(tcp, TCP_REPAIR_WINDOW, _WINDOW.size))
            step = "socket addresses and buffers"
            local = sock.getsockname()
            peer = sock.getpeername()
            sndbuf = get(socket.SOL_SOCKET, socket.SO_SNDBUF)
            rcvbuf = get(socket.SOL_SOCKET, socket.SO_RCVBUF)
            nodelay = bool(get(tcp, socket.TCP_NODELAY))
        except OSError as exc:
            raise KernelError.wrap(step, exc) from exc
        inq_seq, inq = _peek_queue(sock, TCP_RECV_QUEUE, inq_len, "receive")
        outq_seq, outq = _peek_queue(sock, TCP_SEND_QUEUE, outq_len, "send")
        # (the send queue stays selected: it matters only in repair mode, and a dumped
        # socket is either closed or leaves repair mode)
        return TcpRepairRecord(
            # from the address: the socket's own `family` converts to an enum (slow)
            family=socket.AF_INET6 if ":" in local[0] else socket.AF_INET,
            local_addr=local[0],
            local_port=local[1],
            peer_addr=peer[0],
            peer_port=peer[1],
            inq_seq=inq_seq,
            outq_seq=outq_seq,
            inq=inq,
            outq=outq,
            unsent_len=unsent_len,
            mss=mss,
            sack=bool(options & TCPI_OPT_SACK),
            wscale=bool(options & TCPI_OPT_WSCALE),
            timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
            snd_wscale=wscales & 0x0F,
            rcv_wscale=wscales >> 4,
            timestamp=timestamp,
            snd_wl1=window[0],
            snd_wnd=window[1],
            max_window=window[2],
            rcv_wnd=window[3],
            rcv_wup=window[4],
            sndbuf=sndbuf,
            rcvbuf=rcvbuf,
            nodelay=nodelay,
        )
    except BaseException:
        # Not moved: hand the socket back to normal operation untouched.
        leave_repair(sock, window_probe=False)
        raise


def _inject(sock: socket.socket, data: bytes, step: str) -> None:
    """Send `data` into the selected repair queue, halving chunks if the kernel balks."""
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            sent = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS) and chunk > 1024:
                chunk //= 2
                continue
            raise KernelError.wrap(step, exc, f"{len(view)} bytes left") from exc
        view = view[sent:]


def _seq(value: int) -> int:
    """A 32-bit sequence number as the C int setsockopt takes."""
    value %= _SEQ_MOD
    return value - _SEQ_MOD if value >= _I32 else value


def restore(rec: TcpRepairRecord) -> Restored:
    """Re-create the connection in this thread's network namespace (repair mode on).

    The steps are inline calls (no helper per call): with a thousand sockets in one
    move, each Python call here costs a measurable part of the pause."""
    sock = socket.socket(rec.family, socket.SOCK_STREAM)
    put, tcp = sock.setsockopt, socket.IPPROTO_TCP
    sent_len = len(rec.outq) - rec.unsent_len
    if sent_len <= min(rec.snd_wnd, INIT_CWND * rec.mss):
        sent_len = 0  # sent again as new data, at once (see the module's notes)
    step = "TCP_REPAIR on"
    try:
        try:
            # Repair mode forces address reuse (SK_FORCE_REUSE): the socket may share
            # its port with the listener. Setting SO_REUSEADDR afterwards would undo that.
            put(tcp, TCP_REPAIR, REPAIR_ON)
            # A fresh socket's buffers may be smaller than the autotuned ones we saved;
            # the queues must fit before they are re-injected.
            step = "socket buffers"
            if rec.inq and len(rec.inq) * 2 > sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_RCVBUF):
                put(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(rec.rcvbuf, 2 * len(rec.inq)))
            if sent_len and sent_len * 2 > sock.getsockopt(socket.SOL_SOCKET,
                                                           socket.SO_SNDBUF):
                put(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(rec.sndbuf, 2 * sent_len))
            step = "TCP_NODELAY"
            if rec.nodelay:
                put(tcp, socket.TCP_NODELAY, 1)
            step = "TCP_MAXSEG"
            put(tcp, socket.TCP_MAXSEG, rec.mss)
            step = f"bind {rec.local_addr}:{rec.local_port}"
            sock.bind((rec.local_addr, rec.local_port))
            # the send queue first, so that the receive queue stays selected for its
            # re-injection below
            step = "TCP_QUEUE_SEQ send"
            put(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            put(tcp, TCP_QUEUE_SEQ, _seq(rec.snd_una))
            step = "TCP_QUEUE_SEQ receive"
            put(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            put(tcp, TCP_QUEUE_SEQ, _seq(rec.inq_seq - len(rec.inq)))
            step = f"connect {rec.peer_addr}:{rec.peer_port}"
            sock.connect((rec.peer_addr, rec.peer_port))
            step = "TCP_REPAIR_OPTIONS"
            opts = [_OPT.pack(TCPOPT_MAXSEG, rec.mss)]
            if rec.sack:
                opts.append(_OPT.pack(TCPOPT_SACK_PERM, 0))
            if rec.wscale:
                opts.append(_OPT.pack(TCPOPT_WINDOW, rec.snd_wscale | (rec.rcv_wscale << 16)))
            if rec.timestamps:
                opts.append(_OPT.pack(TCPOPT_TIMESTAMP, 0))
            put(tcp, TCP_REPAIR_OPTIONS, b"".join(opts))
            if rec.timestamps:
                step = "TCP_TIMESTAMP set"
                put(tcp, TCP_TIMESTAMP, _seq(rec.timestamp))
        except OSError as exc:
            raise KernelError.wrap(step, exc) from exc
        if rec.inq:  # the receive queue is selected
            _inject(sock, rec.inq, "re-inject receive queue")
        if sent_len:
            _set(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE send")
            _inject(sock, rec.outq[:sent_len], "re-inject send queue")
        # (a queue stays selected: it matters only in repair mode, and the socket
        # leaves repair mode before it sends anything)
        window = _WINDOW.pack(rec.snd_wl1, rec.snd_wnd, rec.max_window, rec.rcv_wnd, rec.rcv_wup)
        _set(sock, TCP_REPAIR_WINDOW, window, "TCP_REPAIR_WINDOW set")
        return Restored(sock=sock, resend=rec.outq[sent_len:])
    except BaseException:
        sock.close()  # still in repair mode: nothing goes on the wire
        raise


def release(sock: socket.socket) -> None:
    """Drop a socket that was dumped: in repair mode, close sends neither FIN nor RST."""
    sock.close()


def go_live(sock: socket.socket, what: str, *, window_probe: bool = True) -> bool:
    """Leave repair mode past the point of no return (the target's resume): if the
    kernel refuses, the connection cannot go back to its old host either, so it is
    reset (`reset`) and False returned; `what` names it in the log."""
    try:
        leave_repair(sock, window_probe=window_probe)
    except KernelError as exc:
        log.error("%s cannot leave repair mode, reset: %s", what, exc)
        reset(sock)
        return False
    return True


def reset(sock: socket.socket) -> None:
    """Abort a restored connection that will not be served, so that its peer learns
    at once (an RST from where the connection stands) instead of waiting on a
    connection nobody holds. Out of repair mode first: there, close is silent."""
    with contextlib.suppress(OSError, KernelError):
        leave_repair(sock, window_probe=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
