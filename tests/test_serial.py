from dataclasses import dataclass, field

import pytest

from keeper import serial
from keeper.console.raw import RawSession
from keeper.errors import CheckpointError


@dataclass
class Inner:
    data: bytes
    n: int


@dataclass
class Outer:
    name: str
    items: list[Inner] = field(default_factory=list)
    maybe: Inner | None = None


def test_round_trip_nested_dataclasses_keeps_bytes() -> None:
    obj = Outer("x", [Inner(b"\x00\xff" * 1000, 7)], Inner(b"", 0))
    assert serial.loads("t", serial.dumps("t", obj), Outer) == obj


def test_slots_dataclass_round_trip() -> None:
    s = RawSession(id=3, pending_in=b"ab", pending_out=b"cd", received=9, sent=4)
    assert serial.loads("s", serial.dumps("s", s), RawSession) == s


@pytest.mark.parametrize("blob", [b"", b"\xc1", b"garbage", serial.dumps("other", 1)])
def test_refuses_wrong_or_damaged_records(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        serial.loads("t", blob, Outer)


def test_refuses_unknown_fields() -> None:
    blob = serial.dumps("t", {"data": b"", "n": 1, "extra": 2})
    with pytest.raises(CheckpointError, match="unknown fields"):
        serial.loads("t", blob, Inner)
