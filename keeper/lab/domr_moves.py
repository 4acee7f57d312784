"""A stand-alone Domain R (echo service, no guest) moved back and forth with live sessions.

Creates Domain R `r1` on the first host, opens sessions from the client namespace
(typists sending a few bytes every 50 ms, like the paper's §5.1 workload, and one
bulk stream), moves r1 A→B→A… and checks every echoed byte. `bench/move.py` runs it.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from typing import Any

from keeper import ports
from keeper.lab import ops
from keeper.lab.client import EchoClient
from keeper.lab.topology import LabSpec
from keeper.migrate.trace import longest_wait

DOM = "r1"


async def run_moves(spec: LabSpec, *, moves: int, typists: int = 3, bulk: bool = True,
                    interval: float = 1.0, period: float = 0.05,
                    say: Any = print) -> dict[str, Any]:
    """Create r1 on the first host, run sessions through `moves` moves; return a summary."""
    first, second = spec.hosts[0].name, spec.hosts[1].name
    doc = await ops.create_domr(spec, DOM, first)
    addr = (doc["ip"], ports.CONSOLE)
    say(f"Domain R {DOM} on host {first}: {doc['ip']} {doc['mac']}")
    say(f"  watch it:  ip netns exec {spec.client_ns} nc {doc['ip']} {ports.CONSOLE}"
        "   (type; it echoes)")
    clients = [EchoClient(spec.client_ns, addr, i) for i in range(typists)]
    if bulk:
        clients.append(EchoClient(spec.client_ns, addr, 100))
    await asyncio.gather(*(c.connect() for c in clients))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run_typing(stop, chunk=4, period=period))
             for c in clients[:typists]]
    if bulk:
        tasks.append(asyncio.create_task(clients[-1].run_typing(stop, chunk=16 << 10,
                                                                period=0.02)))
    per_move: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(interval)
        for i in range(moves):
            target = second if i % 2 == 0 else first
            retrans_before = sum(c.retransmits() for c in clients)
            server_before = await ops.server_retransmits(spec)
            trace = await ops.migrate(spec, DOM, target)
            await asyncio.sleep(interval)
            # The pause a user saw: the longest wait of any write whose round trip
            # overlapped the frozen window (quiesce .. resumed on the target).
            pause = longest_wait(trace, (s for c in clients for s in c.stats.samples),
                                 "quiesced", "resumed")
            restore = trace.get("restore", {})
            sessions = max(1, trace["sessions"])
            transfer_ms = (trace["pause_ms"] - trace["dump_ms"] - restore.get("restore_call_ms", 0)
                           - restore.get("link_up_ms", 0) - restore.get("resume_ms", 0))
            item = {
                "move": i + 1, "from": trace["source"], "to": trace["target"],
                "sessions": trace["sessions"], "pause_ms_server": trace["pause_ms"],
                "pause_ms_client": round(pause, 3),
                "retransmits_client": sum(c.retransmits() for c in clients) - retrans_before,
                "retransmits_server": server_before,
                "dump_ms_per_socket": trace["dump_ms"] / sessions,
                "restore_ms_per_socket": restore.get("restore_ms", 0.0) / sessions,
                "transfer_ms": transfer_ms, "checkpoint_bytes": trace["checkpoint_bytes"],
                "queued_in": trace["queued_in"], "queued_out": trace["queued_out"],
                "marks": trace["marks"],
            }
            per_move.append(item)
            say(f"move {i + 1:3d}: {item['from']} -> {item['to']}  pause server "
                f"{item['pause_ms_server']:6.1f} ms, client {item['pause_ms_client']:6.1f} ms, "
                f"retransmits {item['retransmits_client']}, queued in/out "
                f"{item['queued_in']}/{item['queued_out']} B")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    server_last = await ops.server_retransmits(spec)
    for c in clients:
        c.close()
    # retransmits of the restored sockets are read before the next move; shift by one
    for a, b in itertools.pairwise(per_move):
        a["retransmits_server"] = b["retransmits_server"]
    if per_move:
        per_move[-1]["retransmits_server"] = server_last
    stats = [c.stats for c in clients]
    pauses = [m["pause_ms_client"] for m in per_move] or [0.0]
    return {
        "moves": len(per_move),
        "sessions": len(clients),
        "bytes_sent": sum(s.sent for s in stats),
        "bytes_received": sum(s.received for s in stats),
        "lost": sum(max(0, s.sent - s.received) for s in stats),
        "corrupted": sum(s.corrupted for s in stats),
        "reconnects": sum(1 for s in stats if s.errors),
        "errors": [e for s in stats for e in s.errors],
        "pause_ms_median": statistics.median(pauses),
        "pause_ms_max": max(pauses),
        "pause_ms_server_median": statistics.median(m["pause_ms_server"] for m in per_move)
        if per_move else 0.0,
        "retransmits_client": sum(m["retransmits_client"] for m in per_move),
        "retransmits_server": sum(m["retransmits_server"] for m in per_move),
        "per_move": per_move,
    }


def ok(summary: dict[str, Any]) -> bool:
    return (summary["corrupted"] == 0 and summary["reconnects"] == 0 and summary["lost"] == 0
            and summary["bytes_received"] > 0)
