"""The checkpoint decoder on the target refuses truncated, oversized and forged
records with an error that says what is wrong, before anything is restored."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper import serial
from keeper.console.raw import RawSession
from keeper.console.service import RawCheckpoint, RawConsoleCheckpoint
from keeper.domr import checkpoint as ck
from keeper.errors import CheckpointError
from keeper.net.tcprepair import TcpRepairRecord

IP = "198.18.0.101"


def record(i: int = 0, **kw: object) -> TcpRepairRecord:
    doc: dict[str, object] = dict(
        family=2, local_addr=IP, local_port=2323, peer_addr="198.18.0.10",
        peer_port=40000 + i, inq_seq=1000, outq_seq=2000, inq=b"typed", outq=b"echo",
        unsent_len=2, mss=1448, sack=True, wscale=True, timestamps=True, snd_wscale=7,
        rcv_wscale=7, timestamp=5, snd_wl1=999, snd_wnd=64240, max_window=64240,
        rcv_wnd=64240, rcv_wup=1000, sndbuf=46080, rcvbuf=131072, nodelay=True)
    doc.update(kw)
    return TcpRepairRecord(**doc)  # type: ignore[arg-type]


def checkpoint(*records: TcpRepairRecord) -> ck.DomrCheckpoint:
    sessions = [RawCheckpoint(session=RawSession(id=i + 1, pending_in=b"x"), tcp=r)
                for i, r in enumerate(records or (record(),))]
    return ck.DomrCheckpoint(name="guest1", ip=IP, mac="02:6b:70:00:00:01",
                             console=RawConsoleCheckpoint(next_session_id=9, sessions=sessions))


def body(c: ck.DomrCheckpoint) -> dict[str, object]:
    return msgpack.unpackb(ck.encode(c), raw=False)  # type: ignore[no-any-return]


def positions(path: tuple[object, ...]) -> list[object]:
    """A path of field names and list indices in a DomrCheckpoint, as the positions
    it has in the record (a dataclass travels as the list of its field values)."""
    out: list[object] = []
    kind: object = ck.DomrCheckpoint
    for step in path:
        if isinstance(step, str):
            assert dataclasses.is_dataclass(kind)
            names = [f.name for f in dataclasses.fields(kind)]
            out.append(names.index(step))
            kind = typing.get_type_hints(kind)[step]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if typing.get_origin(kind) is not list and len(args) == 1:
                kind = args[0]  # X | None
        else:
            out.append(step)
            (kind,) = typing.get_args(kind)
    return out


def node_at(doc: dict[str, object], path: tuple[object, ...]) -> tuple[list[object], object]:
    """The list holding the last step of `path` in a record's body, and that step."""
    steps = positions(path)
    node: object = doc["body"]
    for step in steps[:-1]:
        node = node[step]  # type: ignore[index]
    return node, steps[-1]  # type: ignore[return-value]


def forge(doc: dict[str, object]) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


def test_a_good_checkpoint_round_trips() -> None:
    c = checkpoint(record(0), record(1))
    assert ck.decode(ck.encode(c)) == c


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_truncated_is_refused(cut: int) -> None:
    blob = ck.encode(checkpoint())
    with pytest.raises(CheckpointError, match="not a keeper checkpoint"):
        ck.decode(blob[:cut])


def test_oversized_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = ck.encode(checkpoint())
    monkeypatch.setattr(ck, "MAX_BYTES", len(blob) - 1)
    with pytest.raises(CheckpointError, match=f"a record of {len(blob)} bytes"):
        ck.decode(blob)


def test_a_queue_bigger_than_allowed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "MAX_QUEUE", 3)
    with pytest.raises(CheckpointError, match=r"console.sessions\[0\].tcp .*queues of 5"):
        ck.decode(ck.encode(checkpoint()))


@pytest.mark.parametrize(("path", "value", "error"), [
    (("console", "sessions", 0, "tcp", "local_port"), "2323",
     r"DomrCheckpoint.console.sessions\[0\].tcp.local_port: expected int, got str"),
    (("console", "sessions", 0, "tcp", "inq"), "typed", r"\.tcp\.inq: expected bytes, got str"),
    (("console", "sessions", 0, "tcp", "sack"), 1, r"\.tcp\.sack: expected bool, got int"),
    (("console", "sessions", 0, "tcp", "mss"), None, r"\.tcp\.mss: expected int, got nil"),
    (("console", "sessions", 0, "session"), {"id": 1},
     r"\.session: expected a RawSession \(a list of its 6 fields\), got dict"),
    (("console", "sessions", 0, "session"), [1, 2], r"\.session: expected the 6 fields"),
    (("console", "sessions"), {"0": 1}, r"console\.sessions: expected a list, got dict"),
    (("console",), None, r"DomrCheckpoint\.console: expected a RawConsoleCheckpoint"),
    (("left_behind",), [b"x"], r"left_behind\[0\]: expected str, got bytes"),
])
def test_wrong_types_are_refused_with_the_place(path: tuple[object, ...], value: object,
                                                error: str) -> None:
    doc = body(checkpoint())
    node, last = node_at(doc, path)
    node[last] = value  # type: ignore[index]
    with pytest.raises(CheckpointError, match=error):
        ck.decode(forge(doc))


def test_missing_and_extra_fields_are_refused() -> None:
    doc = body(checkpoint())
    node, last = node_at(doc, ("console", "sessions", 0, "tcp", "peer_port"))
    del node[last]  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError, match=r"tcp: expected the 25 fields of TcpRepairRecord, "
                                              r"got 24"):
        ck.decode(forge(doc))
    doc = body(checkpoint())
    node, _ = node_at(doc, ("console", "sessions", 0, "tcp", "peer_port"))
    node.append(1)
    with pytest.raises(CheckpointError, match=r"tcp: expected the 25 fields of TcpRepairRecord, "
                                              r"got 26"):
        ck.decode(forge(doc))


def test_a_checkpoint_of_another_layout_is_refused() -> None:
    doc = body(checkpoint())
    doc["layout"] = "0123456789abcdef"
    with pytest.raises(CheckpointError, match="written for another layout of DomrCheckpoint"):
        ck.decode(forge(doc))


@pytest.mark.parametrize(("field", "value", "error"), [
    ("local_addr", "198.18.0.102", "is not this Domain R's"),
    ("peer_addr", "not-an-ip", "is not an IPv4 address"),
    ("peer_addr", IP, "cannot be a TCP peer"),
    ("peer_addr", "224.0.0.1", "cannot be a TCP peer"),
    ("family", 10, "not IPv4"),
    ("local_port", 0, "is not a port"),
    ("peer_port", 70000, "is not a port"),
    ("inq_seq", 1 << 32, "not a 32-bit value"),
    ("outq_seq", -1, "not a 32-bit value"),
    ("mss", 0, "mss 0"),
    ("snd_wscale", 15, "more than 14"),
    ("unsent_len", 5, "unsent_len 5 for a send queue of 4"),
])
def test_forged_tcp_state_is_refused(field: str, value: object, error: str) -> None:
    c = checkpoint(dataclasses.replace(record(), **{field: value}))
    with pytest.raises(CheckpointError, match=error):
        ck.decode(ck.encode(c))


def test_the_same_connection_twice_is_refused() -> None:
    with pytest.raises(CheckpointError, match="is there twice"):
        ck.decode(ck.encode(checkpoint(record(3), record(3))))


def test_another_kind_or_format_is_refused() -> None:
    doc = body(checkpoint())
    doc["kind"] = "domr-checkpoint/1"
    with pytest.raises(CheckpointError, match="expected a 'domr-checkpoint/2' record"):
        ck.decode(forge(doc))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_is_refused_or_decodes_to_plain_data(data: st.DataObject) -> None:
    """Flip, cut or insert bytes anywhere: decode raises CheckpointError and nothing
    else, or (a harmless change, e.g. in a queued byte) gives a valid checkpoint."""
    blob = bytearray(ck.encode(checkpoint(record(0), record(1))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[pos:pos + data.draw(st.integers(1, 8))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not blob:
            blob = bytearray(b"\x00")
    try:
        c = ck.decode(bytes(blob))
    except CheckpointError:
        return
    assert isinstance(c, ck.DomrCheckpoint)
    ck.check(c)
    assert ck.decode(ck.encode(c)) == c


def test_serial_checks_fixed_tuples_and_enums() -> None:
    from keeper.vnc.server import VncHostCheckpoint

    good = VncHostCheckpoint(sessions=[], orphaned=[[("key", 30, 1)]])
    assert serial.loads("v", serial.dumps("v", good), VncHostCheckpoint) == good
    for bad, error in ([["key", 30]], r"orphaned\[0\]\[0\]: expected 3 items"), \
                      ([["key", "30", 1]], r"orphaned\[0\]\[0\]\[1\]: expected int"):
        blob = msgpack.packb({"format": serial.FORMAT, "kind": "v",
                              "layout": serial.layout(VncHostCheckpoint),
                              "body": [[], [bad]]}, use_bin_type=True)
        with pytest.raises(CheckpointError, match=error):
            serial.loads("v", blob, VncHostCheckpoint)
