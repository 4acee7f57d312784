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
  5. re-inject the receive queue, and the sent-but-unacknowledged part of the send
     queue (so snd_nxt is where the peer thinks it is: an ACK for data "not yet
     sent" would be dropped and the connection would stall);
  6. TCP_REPAIR_WINDOW last (the kernel checks it against rcv_nxt).
The socket stays in repair mode until `leave_repair`.

Where we differ from libsoccr: the never-sent part of the send queue is not sent
mid-restore with repair briefly off (the link is down then, so it would wait for a
retransmission timeout); it is handed back (`Restored.resend`) for the caller to
send once the link is up. Nothing here may run while packets can reach the socket:
the caller keeps the link down (libsoccr's own warning).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

from keeper.errors import KernelError, NotMovable
from keeper.net.tcpinfo import (
    TCP_STATES,
    TCPI_OPT_SACK,
    TCPI_OPT_TIMESTAMPS,
    TCPI_OPT_WSCALE,
    tcp_info,
)

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
_WINDOW = struct.Struct("=5I")
_OPT = struct.Struct("=II")
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
    """A restored socket (still in repair mode) and the never-sent bytes to send once live."""

    sock: socket.socket
    resend: bytes


def _set(sock: socket.socket, opt: int, value: int | bytes, step: str) -> None:
    if isinstance(value, int):  # sequence numbers use all 32 bits
        value = struct.pack("=I" if value >= 0 else "=i", value)
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
        return _INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
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
    try:
        info = tcp_info(sock)
        if info.state != TCP_ESTABLISHED:
            raise NotMovable(
                f"TCP connection in state {TCP_STATES.get(info.state, info.state)} "
                "cannot be moved (only ESTABLISHED is)"
            )
        inq_len = _ioctl_int(sock, SIOCINQ, "SIOCINQ")
        outq_len = _ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")
        unsent_len = _ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
        mss = _get_int(sock, socket.TCP_MAXSEG, "TCP_MAXSEG")
        timestamp = _get_int(sock, TCP_TIMESTAMP, "TCP_TIMESTAMP get") & 0xFFFFFFFF
        try:
            window = _WINDOW.unpack(
                sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)
            )
        except OSError as exc:
            raise KernelError.wrap("TCP_REPAIR_WINDOW get", exc) from exc
        inq_seq, inq = _peek_queue(sock, TCP_RECV_QUEUE, inq_len, "receive")
        outq_seq, outq = _peek_queue(sock, TCP_SEND_QUEUE, outq_len, "send")
        _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE none")
        local = sock.getsockname()
        peer = sock.getpeername()
        return TcpRepairRecord(
            family=sock.family,
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
            sack=bool(info.options & TCPI_OPT_SACK),
            wscale=bool(info.options & TCPI_OPT_WSCALE),
            timestamps=bool(info.options & TCPI_OPT_TIMESTAMPS),
            snd_wscale=info.snd_wscale,
            rcv_wscale=info.rcv_wscale,
            timestamp=timestamp,
            snd_wl1=window[0],
            snd_wnd=window[1],
            max_window=window[2],
            rcv_wnd=window[3],
            rcv_wup=window[4],
            sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            nodelay=bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
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


def restore(rec: TcpRepairRecord) -> Restored:
    """Re-create the connection in this thread's network namespace (repair mode on)."""
    sock = socket.socket(rec.family, socket.SOCK_STREAM)
    try:
        # Repair mode forces address reuse (SK_FORCE_REUSE): the socket may share its
        # port with the listener. Setting SO_REUSEADDR afterwards would undo that.
        enter_repair(sock)
        # A fresh socket's buffers may be smaller than the autotuned ones we saved;
        # the queues must fit before they are re-injected.
        if len(rec.inq) * 2 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(rec.rcvbuf, 2 * len(rec.inq)))
        if rec.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent_len = len(rec.outq) - rec.unsent_len
        if sent_len * 2 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(rec.sndbuf, 2 * sent_len))
        _set(sock, socket.TCP_MAXSEG, rec.mss, "TCP_MAXSEG")
        try:
            sock.bind((rec.local_addr, rec.local_port))
        except OSError as exc:
            raise KernelError.wrap("bind", exc, f"{rec.local_addr}:{rec.local_port}") from exc
        _set(sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE receive")
        _set(sock, TCP_QUEUE_SEQ, (rec.inq_seq - len(rec.inq)) % _SEQ_MOD, "TCP_QUEUE_SEQ receive")
        _set(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE send")
        _set(sock, TCP_QUEUE_SEQ, rec.snd_una, "TCP_QUEUE_SEQ send")
        try:
            sock.connect((rec.peer_addr, rec.peer_port))
        except OSError as exc:
            raise KernelError.wrap("connect", exc, f"{rec.peer_addr}:{rec.peer_port}") from exc
        opts = [_OPT.pack(TCPOPT_MAXSEG, rec.mss)]
        if rec.sack:
            opts.append(_OPT.pack(TCPOPT_SACK_PERM, 0))
        if rec.wscale:
            opts.append(_OPT.pack(TCPOPT_WINDOW, rec.snd_wscale | (rec.rcv_wscale << 16)))
        if rec.timestamps:
            opts.append(_OPT.pack(TCPOPT_TIMESTAMP, 0))
        _set(sock, TCP_REPAIR_OPTIONS, b"".join(opts), "TCP_REPAIR_OPTIONS")
        if rec.timestamps:
            _set(sock, TCP_TIMESTAMP, rec.timestamp, "TCP_TIMESTAMP set")
        if rec.inq:
            _set(sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE receive")
            _inject(sock, rec.inq, "re-inject receive queue")
        if sent_len:
            _set(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE send")
            _inject(sock, rec.outq[:sent_len], "re-inject send queue")
        _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE none")
        window = _WINDOW.pack(rec.snd_wl1, rec.snd_wnd, rec.max_window, rec.rcv_wnd, rec.rcv_wup)
        _set(sock, TCP_REPAIR_WINDOW, window, "TCP_REPAIR_WINDOW set")
        return Restored(sock=sock, resend=rec.outq[sent_len:])
    except BaseException:
        sock.close()  # still in repair mode: nothing goes on the wire
        raise


def release(sock: socket.socket) -> None:
    """Drop a socket that was dumped: in repair mode, close sends neither FIN nor RST."""
    sock.close()
