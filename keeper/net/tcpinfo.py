"""Read `struct tcp_info` (linux/tcp.h) from a socket: the counters a migration reports."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP_INFO = 11
_HEAD = struct.Struct("=8B")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

# TCP states (include/net/tcp_states.h)
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4


@dataclass(frozen=True, slots=True)
class TcpInfo:
    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    rto_us: int
    snd_mss: int
    unacked: int
    lost: int
    retrans: int
    rtt_us: int
    snd_cwnd: int
    total_retrans: int
    bytes_acked: int
    bytes_received: int

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, str(self.state))


def tcp_info(sock: socket.socket) -> TcpInfo:
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256)
    head = _HEAD.unpack_from(raw, 0)

    def u32(i: int) -> int:
        return _U32.unpack_from(raw, 8 + 4 * i)[0]

    def u64(off: int) -> int:
        return _U64.unpack_from(raw, off)[0] if len(raw) >= off + 8 else 0

    return TcpInfo(
        state=head[0],
        options=head[5],
        snd_wscale=head[6] & 0x0F,
        rcv_wscale=head[6] >> 4,
        rto_us=u32(0),
        snd_mss=u32(2),
        unacked=u32(4),
        lost=u32(6),
        retrans=u32(7),
        rtt_us=u32(15),
        snd_cwnd=u32(18),
        total_retrans=u32(23),
        bytes_acked=u64(120),
        bytes_received=u64(128),
    )
