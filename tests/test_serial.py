from dataclasses import dataclass, field

import msgpack
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


def forged(kind: str, cls: type, body: object) -> bytes:
    """A record that claims the right kind, format and layout around any body."""
    return msgpack.packb({"format": serial.FORMAT, "kind": kind, "layout": serial.layout(cls),
                          "body": body}, use_bin_type=True)


def test_a_dataclass_travels_as_its_field_values_in_order() -> None:
    blob = serial.dumps("t", Outer("x", [Inner(b"ab", 7)]))
    assert msgpack.unpackb(blob)["body"] == ["x", [[b"ab", 7]], None]


@pytest.mark.parametrize(("body", "error"), [
    ([b"", 1, 2], r"Inner: expected the 2 fields of Inner, got 3"),
    ([b""], r"Inner: expected the 2 fields of Inner, got 1"),
    ({"data": b"", "n": 1}, r"Inner: expected a Inner \(a list of its 2 fields\), got dict"),
    ([b"", "1"], r"Inner.n: expected int, got str"),
    ([b"", True], r"Inner.n: expected int, got bool"),
    (["", 1], r"Inner.data: expected bytes, got str"),
])
def test_refuses_fields_too_many_too_few_or_of_the_wrong_type(body: object, error: str) -> None:
    with pytest.raises(CheckpointError, match=error):
        serial.loads("t", forged("t", Inner, body), Inner)


def test_nested_errors_name_the_place() -> None:
    blob = forged("t", Outer, ["x", [[b"", 1], [b"", None]], None])
    with pytest.raises(CheckpointError, match=r"Outer.items\[1\].n: expected int, got nil"):
        serial.loads("t", blob, Outer)


def test_refuses_a_record_of_another_layout() -> None:
    """Same kind, same values, but a type whose fields differ (another keeper's
    version): refused by its layout, not read into the wrong fields."""

    @dataclass
    class Inner:  # same name, fields swapped
        n: int
        data: bytes

    assert serial.layout(Inner) != serial.layout(globals()["Inner"])
    blob = serial.dumps("t", Inner(7, b"ab"))
    with pytest.raises(CheckpointError, match="written for another layout of Inner"):
        serial.loads("t", blob, globals()["Inner"])
    with pytest.raises(CheckpointError, match="written for another layout"):
        serial.loads("t", serial.dumps("t", {"data": b"", "n": 1}), globals()["Inner"])
