"""The agents' control and peer APIs and Domain R's control API, fuzzed while they
run (root): malformed JSON, wrong types, missing and unknown fields, hostile names,
huge and deeply nested bodies. Every answer is a 4xx with the reason or a success,
never a 500 or a dropped connection; a console session types through it all and
loses nothing."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper.lab import ops
from keeper.lab.faults import hostile as wire
from keeper.lab.topology import LabSpec
from keeper.lab.typist import Typist, compare

pytestmark = pytest.mark.root

GUEST = "guest1"
PROMPT = b"guest1:~$ "
HUGE = 2 << 20

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=30).filter(lambda s: s not in ("a", "b")))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
names = st.one_of(st.text(min_size=1, max_size=40).filter(lambda s: s not in (GUEST, "a", "b")),
                  st.sampled_from(["nosuch", "../../etc/passwd", "x" * 300, "g\x00", "-rf",
                                   "keeper-a", ".", "..", " "]))
near_valid = {
    "ip": st.sampled_from(["198.18.0.150", "0.0.0.0", "255.255.255.255", "::1",
                           "999.1.1.1", "198.18.0.101", "", "198.18.0.150/24"]),
    "mac": st.sampled_from(["02:00:00:00:00:99", "ff:ff:ff:ff:ff:ff", "zz", "",
                            "02:00:00:00:00:99:00", "02-00-00-00-00-99"]),
    "name": names,
    "to": st.text(max_size=5).filter(lambda s: s not in ("a", "b")),
    # a guest that does get made stays small (the lab shares the machine)
    "mem_mb": st.sampled_from([0, -1, 16, 65537, 1 << 70, "16", 1.5, None, True]),
    "mem_bytes": st.sampled_from([0, -1, 1 << 24, 1 << 70, "16", 1.5, None]),
}


def fields_of(*names_: str) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the route's field names (any of them, any type) and sometimes more."""
    optional = {n: near_valid[n] if n.startswith("mem") else
                (near_valid[n] | json_values) if n in near_valid else json_values
                for n in names_}
    return st.builds(lambda d, extra: {**d, **extra},
                     st.fixed_dictionaries({}, optional=optional),
                     st.dictionaries(st.text(max_size=8), json_values, max_size=2))


def encoded(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A body: the objects as JSON, or not JSON at all, or hostile on purpose."""
    return st.one_of(
        objects.map(lambda o: json.dumps(o).encode()),
        json_values.map(lambda o: json.dumps(o).encode()),
        st.binary(max_size=300),
        st.sampled_from([b"", b"{", b'{"name": ', b"\xff\xfe{}", b"[" * 100_000,
                         b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"NaN", b'"x"',
                         b'{"name": "x", "name": 1}', b"\x00" * 64,
                         b'{"name": "' + b"x" * HUGE + b'"}']),
    )


def url(template: str, name: str) -> str:
    return template.replace("{name}", urllib.parse.quote(name, safe=""))


def check(status: int, payload: bytes, where: str) -> None:
    assert status < 500, f"{where}: {status} {payload[:300]!r}"
    if status >= 400:
        assert payload.strip(), f"{where}: a {status} without a reason"
        if payload.startswith(b"{"):
            assert isinstance(json.loads(payload).get("error"), str), where


def fuzz(loop: asyncio.AbstractEventLoop, call: Callable[..., Awaitable[tuple[int, bytes]]],
         routes: st.SearchStrategy[tuple[str, str, bytes, str | None]], examples: int) -> int:
    """Run hypothesis in this (worker) thread; each request on the test's loop."""
    seen = [0]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(routes)
    def one(route: tuple[str, str, bytes, str | None]) -> None:
        method, path, body, ctype = route
        status, payload = asyncio.run_coroutine_threadsafe(
            call(method, path, body, ctype), loop).result(60)
        check(status, payload, f"{method} {path} {body[:120]!r}")
        seen[0] += 1

    one()
    return seen[0]


ctypes = st.sampled_from(["application/json", "text/plain", None, "application/json; x"])


def local_routes() -> st.SearchStrategy[tuple[str, str, bytes, str | None]]:
    with_body = [
        ("POST", "/domr", fields_of("name", "ip", "mac", "announce", "announce_schedule")),
        ("POST", "/domr/{name}/migrate", fields_of("to")),
        ("POST", "/domr/{name}/link", fields_of("up")),
        ("POST", "/guest", fields_of("name", "ip", "mac", "mem_mb", "event_delay_ms",
                                     "dirty_rate", "announce", "announce_schedule", "mode",
                                     "guest")),
        ("POST", "/guest/{name}/migrate", fields_of("to")),
        ("POST", "/vmm/config", fields_of("may_write").filter(
            lambda d: not isinstance(d.get("may_write"), bool))),
        ("POST", "/debug/fault", fields_of("point", "action")),
    ]
    bare = [("DELETE", "/domr/{name}"), ("POST", "/domr/{name}/announce"),
            ("DELETE", "/guest/{name}"), ("GET", "/guest/{name}/journal"),
            ("GET", "/guest/{name}/screen"), ("GET", "/status"), ("PUT", "/guest"),
            ("POST", "/nowhere/{name}")]
    options = [st.tuples(st.just(m), names.map(lambda n, p=p: url(p, n)), encoded(o), ctypes)
               for m, p, o in with_body]
    options += [st.tuples(st.just(m), names.map(lambda n, p=p: url(p, n)),
                          st.binary(max_size=50), ctypes) for m, p in bare]
    # the running guest itself: only what cannot change it
    options.append(st.tuples(st.sampled_from(["GET"]), st.sampled_from(
        [f"/guest/{GUEST}/journal", f"/guest/{GUEST}/screen", "/status"]),
        st.just(b""), ctypes))
    options.append(st.tuples(st.just("POST"), st.just(f"/guest/{GUEST}/migrate"),
                             encoded(fields_of("to")), ctypes))
    return st.one_of(options)


def peer_routes() -> st.SearchStrategy[tuple[str, str, bytes, str | None]]:
    from keeper.migrate.peer import Paths

    with_body = [
        (Paths.incoming("{name}"), fields_of("name", "mem_bytes", "kind", "event_delay_ms",
                                             "dirty_rate", "options")),
        (Paths.links("{name}"), fields_of("pairs", "state")),
        (Paths.solo_links("{name}"), fields_of("unbound", "xenstore")),
        (Paths.prepare_domr, fields_of("name", "ip", "mac", "announce", "announce_schedule",
                                       "guest", "kind")),
        (Paths.pages("{name}"), st.binary(max_size=200)),
        (Paths.restore_domr("{name}"), st.binary(max_size=200)),
    ]
    bare = [Paths.associate("{name}"), Paths.resume_guest("{name}"),
            Paths.cancel_guest("{name}"), Paths.baseline_server("{name}"),
            Paths.resume_domr("{name}"), Paths.cancel_domr("{name}")]
    options = [st.tuples(st.just("POST"), names.map(lambda n, p=p: url(p, n)),
                         encoded(o) if not isinstance(o, st.SearchStrategy) or p.endswith(
                             ("incoming", "links", "prepare")) else o, ctypes)
               for p, o in with_body]
    options += [st.tuples(st.just("POST"), names.map(lambda n, p=p: url(p, n)),
                          st.binary(max_size=50), ctypes) for p in bare]
    options.append(st.tuples(st.sampled_from(["GET", "DELETE"]), st.just(Paths.status),
                             st.just(b""), ctypes))
    return st.one_of(options)


def domr_routes() -> st.SearchStrategy[tuple[str, str, bytes, str | None]]:
    hold = encoded(fields_of("on")).filter(lambda b: b not in (b'{"on": true}', b'{"on": false}'))
    return st.one_of(
        st.tuples(st.just("POST"), st.just("/hold"), hold, ctypes),
        st.tuples(st.just("POST"), st.just("/restore"), st.binary(max_size=300), ctypes),
        st.tuples(st.just("GET"), st.just("/status"), st.just(b""), ctypes),
    )


async def clean_up(lab: LabSpec) -> None:
    """Remove whatever a valid fuzzed request made (Domain Rs, guests), but guest1."""
    for host in ("a", "b"):
        status = await ops.call(lab, host, "GET", "/status")
        for d in status.get("domrs", []):
            if d["name"] != GUEST:
                await wire.unix(lab.agent_socket(host), "DELETE", url("/domr/{name}", d["name"]))
        for g in status.get("guests", []):
            name = g["name"] if isinstance(g, dict) else g
            if name != GUEST:
                await wire.unix(lab.agent_socket(host), "DELETE", url("/guest/{name}", name))


async def test_control_peer_and_domr_apis_answer_every_hostile_request(lab: LabSpec) -> None:
    doc = await ops.create_guest(lab, GUEST, "a", mem_mb=16)
    before = (await ops.journal(lab, GUEST))["count"]
    typist = await Typist.over_tcp(lab.client_ns, (doc["ip"], 2323), PROMPT, period=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(typist.run(stop))
    loop = asyncio.get_running_loop()

    async def local(method: str, path: str, body: bytes, ctype: str | None) -> tuple[int, bytes]:
        return await wire.unix(lab.agent_socket("a"), method, path, body, ctype)

    async def peer(method: str, path: str, body: bytes, ctype: str | None) -> tuple[int, bytes]:
        return await wire.peer(lab, "a", "b", method, path, body, ctype)

    async def domr(method: str, path: str, body: bytes, ctype: str | None) -> tuple[int, bytes]:
        return await wire.unix(lab.domr_control(GUEST, "a"), method, path, body, ctype)

    try:
        counts = {}
        for what, call, routes, n in (("local", local, local_routes(), 250),
                                      ("peer", peer, peer_routes(), 200),
                                      ("domr", domr, domr_routes(), 80)):
            counts[what] = await asyncio.to_thread(fuzz, loop, call, routes, n)
        # a body over the limit is refused before it is read whole, on both APIs
        for call, path in ((local, "/guest"), (peer, "/peer/domr/prepare")):
            status, payload = await call("POST", path, b"[" + b"0," * HUGE + b"0]", None)
            assert status == 413 and b"at most" in payload, (path, status, payload[:200])
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        stats = await task
        typist.close()
    await clean_up(lab)
    journal = (await ops.journal(lab, GUEST))["journal"][before:]
    assert compare(bytes(stats.sent), journal) == {"lost": 0, "duplicated": 0, "reordered": 0}
    assert stats.errors == [], stats.errors
    assert (await ops.where(lab, GUEST)) == "a"
    status = await ops.call(lab, "b", "GET", "/status")
    assert status["host"] == "b"
    assert all(v > 0 for v in counts.values()), counts
