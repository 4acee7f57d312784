"""Co-migration of a guest and its Domain R with a console session typing through it
(root, whole lab: real namespaces, TLS between agents, real TCP repair)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keeper.errors import KeeperError
from keeper.hostd import procs
from keeper.lab import ops
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare
from keeper.vmm.hypercall import HypercallClient

pytestmark = pytest.mark.root

GUEST = "guest1"
PROMPT = b"guest1:~$ "


async def start(lab: LabSpec, **kw: Any) -> tuple[Typist, asyncio.Event, asyncio.Task[Any], int]:
    doc = await ops.create_guest(lab, GUEST, "a", **kw)
    before = (await ops.journal(lab, GUEST))["count"]
    typist = await Typist.over_tcp(lab.client_ns, (doc["ip"], 2323), PROMPT, period=0.02)
    stop = asyncio.Event()
    return typist, stop, asyncio.create_task(typist.run(stop)), before


async def finish(lab: LabSpec, typist: Typist, stop: asyncio.Event,
                 task: asyncio.Task[Any], before: int) -> dict[str, int]:
    stop.set()
    stats = await task
    typist.close()
    journal = (await ops.journal(lab, GUEST))["journal"][before:]
    return {**compare(bytes(stats.sent), journal), "sent": len(stats.sent),
            "errors": len(stats.errors)}


async def test_console_session_survives_migrations_back_and_forth(lab: LabSpec) -> None:
    typist, stop, task, before = await start(lab, dirty_rate=500)
    await asyncio.sleep(0.5)
    traces = []
    for target in ("b", "a", "b", "a"):
        traces.append(await ops.migrate(lab, GUEST, target))
        await asyncio.sleep(0.3)
    result = await finish(lab, typist, stop, task, before)
    assert result == {"lost": 0, "duplicated": 0, "reordered": 0, "sent": result["sent"],
                      "errors": 0}, typist.stats.errors
    assert result["sent"] > 50
    for t in traces:
        # every synchronisation point, in order, in every trace
        assert t["sync_points"] == ["S1", "S2", "S3", "S4", "S5", "S6", "S7"]
        assert t["trace_ok"]
    # event-channel port numbers are the same after every migration
    assert len({tuple(map(tuple, t["evtchn_pairs"])) for t in traces}) == 1
    info = (await ops.journal(lab, GUEST))["info"]
    assert info["ring_init_count"] == 1  # the frontend never re-initialised its ring
    assert info["boot_count"] == 1  # nor did the guest boot again
    # the agents count what happened, for Prometheus
    http = ops.agent(lab, "b")
    try:
        body, _ = await http.request("GET", "/metrics")
    finally:
        await http.close()
    text = body.decode()
    assert 'keeper_hostd_migrations_total{result="ok"} 2.0' in text
    assert 'keeper_hostd_domains{kind="U"} 0.0' in text  # guest1 is back on a


async def test_domain_r_cannot_map_another_guests_memory(lab: LabSpec) -> None:
    await ops.create_guest(lab, GUEST, "a", mem_mb=16)
    await ops.create_guest(lab, "guest2", "a", mem_mb=16)
    status = await ops.call(lab, "a", "GET", "/status")
    other = next(g["domid"] for g in status["guests"] if g["name"] == "guest2")
    mine = next(g["domid"] for g in status["guests"] if g["name"] == GUEST)
    hc = HypercallClient(lab.rundir / f"hc-{GUEST}-r-a.sock")
    try:
        _, fds = hc.call("map", domid=mine, pfn=1, writable=True)
        assert len(fds) == 1
        with pytest.raises(KeeperError, match="may not map pages of domain"):
            hc.call("map", domid=other, pfn=1, writable=True)
    finally:
        hc.close()


async def migrate_until_loss(lab: LabSpec, tries: int) -> tuple[int, dict[str, int]]:
    """Type with a slow guest (200 ms per event) and migrate until keys are lost."""
    typist, stop, task, before = await start(lab, mem_mb=16, event_delay_ms=200)
    typist.period = 0.05
    for host in "ab":
        await ops.call(lab, host, "POST", "/vmm/config", json={"may_write": False})
    await asyncio.sleep(0.5)
    where, done = "a", 0
    for _ in range(tries):
        where = "b" if where == "a" else "a"
        await ops.migrate(lab, GUEST, where)
        done += 1
        await asyncio.sleep(0.5)
        journal = (await ops.journal(lab, GUEST))["journal"][before:]
        if task.done() or compare(bytes(typist.stats.sent[: len(journal)]), journal)["lost"]:
            break
    return done, await finish(lab, typist, stop, task, before)


async def test_without_may_write_keys_in_the_ring_are_lost(lab: LabSpec) -> None:
    """The paper's ablation (§5.1): extension off, 200 ms event delay: loss happens."""
    done, result = await migrate_until_loss(lab, tries=12)
    assert result["lost"] > 0, f"no loss in {done} migrations without the may-write bitmap"


async def test_with_may_write_the_same_run_loses_nothing(lab: LabSpec) -> None:
    typist, stop, task, before = await start(lab, mem_mb=16, event_delay_ms=200)
    typist.period = 0.05
    await asyncio.sleep(0.5)
    where = "a"
    for _ in range(6):
        where = "b" if where == "a" else "a"
        await ops.migrate(lab, GUEST, where)
        await asyncio.sleep(0.5)
    result = await finish(lab, typist, stop, task, before)
    assert (result["lost"], result["duplicated"], result["reordered"]) == (0, 0, 0)
    assert result["errors"] == 0 and result["sent"] > 30


@pytest.mark.parametrize("point", ["incoming", "prepare", "associate", "pages", "evtchns",
                                   "restore", "guest_resume"])
async def test_destination_agent_dies_and_everything_goes_on_at_the_source(
    lab: LabSpec, point: str
) -> None:
    typist, stop, task, before = await start(lab, mem_mb=32)
    await asyncio.sleep(0.3)
    await ops.call(lab, "b", "POST", "/debug/fault", json={"point": point, "action": "crash"})
    with pytest.raises(KeeperError, match="stays on a"):
        await ops.migrate(lab, GUEST, "b")
    await asyncio.sleep(0.5)  # typing goes on, on host a
    hosts: list[str] = []
    for _ in range(20):  # on a loaded machine host a may still be finishing its rollback
        status = await ops.status(lab)
        hosts = [d["host"] for d in status["domains"] if d["name"] == GUEST]
        if hosts:
            break
        await asyncio.sleep(0.5)
    assert hosts == ["a"]
    result = await finish(lab, typist, stop, task, before)
    assert result == {"lost": 0, "duplicated": 0, "reordered": 0, "sent": result["sent"],
                      "errors": 0}, typist.stats.errors
    # the target's half-made domains died with their agent
    for label in (f"domr-{GUEST}-b", f"domu-{GUEST}-b"):
        pidfile = lab.rundir / "pids" / f"{label}.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text())
            for _ in range(100):
                if not procs.alive(pid):
                    break
                await asyncio.sleep(0.02)
            assert not procs.alive(pid), label


BEFORE_NO_RETURN = ["CREATE_U", "PREPARE_R", "ITERATE", "ASSOCIATE", "STOP_R", "STOP_U",
                    "SAVE_LINKS", "FINAL_COPY", "LINK_U", "RESTORE_R", "RESUME_U"]


async def test_cancelled_at_every_step_the_pair_serves_on_at_the_source(lab: LabSpec) -> None:
    """The source's migration task is cancelled just after it launches each action in
    turn (in the middle of that action): every time, the rollback runs, the pair goes
    on at a, and nothing typed is lost — RESUME_U included: a U that ran on b is
    discarded, its Domain R never served. Cancelled once b's Domain R may serve
    (RESUME_R in flight), the migration finishes forward instead."""
    typist, stop, task, before = await start(lab, mem_mb=32)
    await asyncio.sleep(0.3)
    for action in BEFORE_NO_RETURN:
        await ops.call(lab, "a", "POST", "/debug/fault",
                       json={"point": action, "action": "cancel"})
        with pytest.raises(KeeperError, match=f"cancelled at {action} .*stays on a"):
            await ops.migrate(lab, GUEST, "b")
        assert await ops.where(lab, GUEST) == "a", action
        await asyncio.sleep(0.2)  # typing goes on, on host a
    await ops.call(lab, "a", "POST", "/debug/fault",
                   json={"point": "RESUME_R", "action": "cancel"})
    with pytest.raises(KeeperError, match="cancelled"):
        await ops.migrate(lab, GUEST, "b")
    for _ in range(20):
        if await ops.where(lab, GUEST) == "b":
            break
        await asyncio.sleep(0.2)
    assert await ops.where(lab, GUEST) == "b"  # finished forward, not half-way
    trace = await ops.migrate(lab, GUEST, "a")  # and it moves on normally
    assert trace["trace_ok"]
    result = await finish(lab, typist, stop, task, before)
    assert result == {"lost": 0, "duplicated": 0, "reordered": 0, "sent": result["sent"],
                      "errors": 0}, typist.stats.errors
    assert result["sent"] > 50


async def test_malformed_requests_get_a_400_with_the_reason(lab: LabSpec) -> None:
    from keeper.http import RemoteError

    cases = [("/guest", {"name": "g2", "ip": "198.18.0.120"}, "missing field 'mac'"),
             ("/guest", {"name": "g2", "ip": 1, "mac": "x"}, "field 'ip' must be str"),
             ("/guest", {"name": "g2", "ip": "198.18.0.120", "mac": "02:00:00:00:00:09",
                         "mem_mb": "lots"}, "field 'mem_mb' must be int"),
             ("/debug/fault", {"point": "nowhere", "action": "crash"}, "unknown fault point"),
             ("/domr/x/migrate", {"too": "b"}, "unknown field"),
             ("/vmm/config", [1, 2], "expected a JSON object")]
    for path, body, why in cases:
        with pytest.raises(RemoteError, match=why) as info:
            await ops.call(lab, "a", "POST", path, json=body)
        assert info.value.status == 400, (path, body)
