"""One versioned serialiser for everything that goes into a checkpoint.

State is plain data: dataclasses of ints, bytes, str, bools, enums, lists, dicts and
nested dataclasses. `dumps` tags the payload with a kind, a format version and the
layout of its type; `loads` refuses anything else. msgpack keeps bytes as bytes (no
base64) and is fast enough for megabytes of queued session data.

A dataclass travels as the list of its fields' values, in their order: no field
names in the record. A Domain R checkpoint of 1,000 sessions is then 0.78 MB instead
of 1.25, and encoding plus decoding it takes a little over half the time (measured,
the part of a move's pause that is ours). The names are not lost: they come from the
type, and the record carries `layout`, a digest of every dataclass it holds (fields,
order, types), so a record from a keeper whose types differ is refused as such
instead of being read into the wrong fields.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import operator
import types
import typing
from typing import Any, TypeVar

import msgpack

from keeper.errors import CheckpointError

FORMAT = 2  # 2: dataclasses as lists of field values, and a layout digest
T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """Dataclasses → lists of their field values, enums → values, tuples → lists;
    everything else as is."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    try:
        encode = _encoders[kind]
    except KeyError:
        encode = _encoders[kind] = _make_encoder(kind)
    return encode(obj)


_encoders: dict[type, typing.Callable[[Any], Any]] = {}


def _make_encoder(kind: type) -> typing.Callable[[Any], Any]:
    """How to flatten one type, worked out once (a checkpoint holds thousands of
    objects of a few types; one attrgetter call reads all of a record's fields)."""
    scalars = _SCALARS
    names = _field_names(kind)
    if names is not None:
        if not names:
            return lambda obj: []
        if len(names) == 1:
            one = operator.attrgetter(names[0])
            return lambda obj: [to_plain(one(obj))]
        every = operator.attrgetter(*names)

        def fields(obj: Any) -> list[Any]:
            values = every(obj)
            if set(map(type, values)) <= scalars:  # all scalars: one C-level pass
                return list(values)
            return [v if type(v) in scalars else to_plain(v) for v in values]
        return fields
    if issubclass(kind, enum.Enum):
        return lambda obj: obj.value
    if issubclass(kind, list | tuple):
        return lambda obj: [v if type(v) in scalars else to_plain(v) for v in obj]
    if issubclass(kind, dict):
        return lambda obj: {k if type(k) in scalars else to_plain(k):
                            v if type(v) in scalars else to_plain(v) for k, v in obj.items()}
    return lambda obj: obj


def from_plain(cls: Any, data: Any) -> Any:
    """Rebuild `cls` (a dataclass, enum, container or scalar type) from plain data.

    The data is checked against the type as it is rebuilt: a missing field, an
    unknown one, a wrong type or a None where the type has none is a CheckpointError
    that names the place (`DomrCheckpoint.ssh.sessions[0].tcp.local_port: expected
    int, got str`). Nothing is half-built: a checkpoint from a damaged or forged
    record is refused before any of it is used."""
    if data is None:
        return None
    convert = _converter(cls)
    if convert is None:
        return data
    try:
        return convert(data)
    except _Bad as exc:
        name = getattr(cls, "__name__", str(cls))
        raise CheckpointError(f"{name}{''.join(reversed(exc.path))}: {exc.reason}") from None


class _Bad(Exception):
    """Data that does not fit its type; `path` grows as it travels up (innermost
    first)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


def _type_name(cls: Any) -> str:
    if typing.get_origin(cls) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(cls))
    return "nil" if cls is type(None) else getattr(cls, "__name__", str(cls))


def _kind(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


# A checkpoint holds thousands of sessions of a few types: what each type needs is
# worked out once (type hints, fields), not per object (profiled: get_type_hints per
# object cost ~0.9 ms a session).
_SCALARS = frozenset({int, str, bytes, bool, float, type(None)})
Convert = typing.Callable[[Any], Any]


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    """A dataclass type's field names, in order; None for anything else."""
    if dataclasses.is_dataclass(kind):
        return tuple(f.name for f in dataclasses.fields(kind))
    return None


_converters: dict[Any, Convert | None] = {}


def prepare(cls: Any) -> None:
    """Work out now what writing and rebuilding `cls` take (its types' hints, fields
    and layout): a Domain R does it when it starts, not in the pause (profiled: ~30 ms
    for a Domain R checkpoint on a loaded machine, paid at the first decode)."""
    _converter(cls)
    layout(cls)


@functools.cache
def layout(cls: Any) -> str:
    """A digest of the shape of `cls`: every dataclass and enum reachable from it, its
    fields in order and their types. Two keepers read each other's records only if
    they agree on it (records are positional)."""
    parts: list[str] = []
    seen: set[Any] = set()

    def walk(t: Any) -> None:
        if typing.get_origin(t) is not None:
            for arg in typing.get_args(t):
                walk(arg)
            return
        if not isinstance(t, type) or t in seen:
            return
        seen.add(t)
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            fields = dataclasses.fields(t)
            parts.append(f"{t.__module__}.{t.__qualname__}("
                         + ", ".join(f"{f.name}: {hints[f.name]!r}" for f in fields) + ")")
            for f in fields:
                walk(hints[f.name])
        elif issubclass(t, enum.Enum):
            parts.append(f"{t.__module__}.{t.__qualname__}"
                         f"{sorted((m.name, repr(m.value)) for m in t)}")

    parts.append(repr(cls))
    walk(cls)
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


def _converter(cls: Any) -> Convert | None:
    """How to check and rebuild `cls` from plain data (None included: refused
    unless the type admits it); None: anything goes (Any, an unknown class)."""
    try:
        return _converters[cls]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation: work it out each time
        return _make_converter(cls)
    # a placeholder while a (self-referencing) dataclass's fields are worked out
    _converters[cls] = lambda data: _call(_converters[cls], data)
    try:
        made = _converters[cls] = _make_converter(cls)
    except BaseException:
        del _converters[cls]
        raise
    return made


def _call(convert: Convert | None, data: Any) -> Any:
    return data if convert is None else convert(data)


def _none_ok(convert: Convert | None) -> Convert | None:
    if convert is None:
        return None
    return lambda data: None if data is None else convert(data)


def _make_converter(cls: Any) -> Convert | None:
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(cls)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            one = _converter(kinds[0])
            return _none_ok(one) if type(None) in args else one
        return _union_converter(cls, kinds, type(None) in args)
    if origin in (list, tuple):
        return _sequence_converter(cls, origin)
    if origin is dict:
        return _dict_converter(cls)
    if cls in _SCALARS:
        return _scalar_converter(cls)
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return _dataclass_converter(cls)
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        def enum_value(data: Any) -> Any:
            try:
                return cls(data)
            except ValueError:
                raise _Bad(f"{data!r} is no {cls.__name__}") from None
        return enum_value
    return None


def _scalar_converter(kind: type) -> Convert:
    if kind is type(None):
        def nil(data: Any) -> None:
            if data is not None:
                raise _Bad(f"expected nil, got {_kind(data)}")
        return nil
    if kind is float:
        def real(data: Any) -> float:
            if isinstance(data, bool) or not isinstance(data, int | float):
                raise _Bad(f"expected float, got {_kind(data)}")
            return float(data)
        return real
    if kind is int:
        def integer(data: Any) -> int:
            if isinstance(data, bool) or not isinstance(data, int):
                raise _Bad(f"expected int, got {_kind(data)}")
            return data
        return integer

    def exact(data: Any) -> Any:
        if not isinstance(data, kind):
            raise _Bad(f"expected {kind.__name__}, got {_kind(data)}")
        return data
    return exact


def _union_converter(cls: Any, kinds: list[Any], nil: bool) -> Convert | None:
    each = [_converter(k) for k in kinds]
    if any(c is None for c in each):
        return None  # one of them takes anything

    def one_of(data: Any) -> Any:
        if data is None:
            if nil:
                return None
            raise _Bad(f"expected {_type_name(cls)}, got nil")
        for convert in each:
            try:
                return convert(data)  # type: ignore[misc]
            except _Bad:
                continue
        raise _Bad(f"expected {_type_name(cls)}, got {_kind(data)}")
    return one_of


def _sequence_converter(cls: Any, origin: Any) -> Convert:
    args = typing.get_args(cls)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        parts = [_converter(a) for a in args]  # a fixed shape: (str, int, int)

        def fixed(data: Any) -> tuple[Any, ...]:
            if not isinstance(data, list | tuple) or len(data) != len(parts):
                raise _Bad(f"expected {len(parts)} items, got "
                           f"{len(data) if isinstance(data, list | tuple) else _kind(data)}")
            return tuple(_item(i, c, v) for i, (c, v) in enumerate(zip(parts, data, strict=True)))
        return fixed
    each = _converter(args[0]) if args else None
    same = _fast_types(args[0]) if args else None

    def sequence(data: Any) -> Any:
        if not isinstance(data, list | tuple):
            raise _Bad(f"expected a list, got {_kind(data)}")
        if each is None or (same is not None and set(map(type, data)) <= same):
            out = data  # scalars of the right types (one C-level pass), or anything goes
        else:
            out = [_item(i, each, v) for i, v in enumerate(data)]
        return tuple(out) if origin is tuple else list(out)
    return sequence


def _item(i: int, convert: Convert | None, v: Any) -> Any:
    if convert is None:
        return v
    try:
        return convert(v)
    except _Bad as exc:
        exc.path.append(f"[{i}]")
        raise


def _dict_converter(cls: Any) -> Convert:
    args = typing.get_args(cls)
    key, val = (_converter(args[0]), _converter(args[1])) if args else (None, None)
    keys, vals = (_fast_types(args[0]), _fast_types(args[1])) if args else (None, None)

    def mapping(data: Any) -> dict[Any, Any]:
        if not isinstance(data, dict):
            raise _Bad(f"expected a map, got {_kind(data)}")
        if key is None and val is None:
            return data
        if (key is None or (keys is not None and set(map(type, data)) <= keys)) and \
                (val is None or (vals is not None and set(map(type, data.values())) <= vals)):
            return dict(data)  # scalar keys and values of the right types: checked in C
        out = {}
        for k, v in data.items():
            try:
                out[_call(key, k)] = _call(val, v)
            except _Bad as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out
    return mapping


def _exact_types(cls: Any) -> frozenset[type] | None:
    """The exact types a scalar (or optional scalar) field admits: checked inline,
    without a call per field (a checkpoint has tens of thousands of them)."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls) if origin in (typing.Union, types.UnionType) else (cls,)
    if not all(a in _SCALARS for a in args):
        return None
    out = set(args)
    if float in out:
        out.add(int)
    return frozenset(out)


def _fast_types(cls: Any) -> frozenset[type] | None:
    """The exact types of a scalar (or optional scalar) item that needs no conversion
    (float does: an int becomes a float), so that a container of thousands of them is
    checked by the set of its items' types."""
    exact = _exact_types(cls)
    return None if exact is None or float in exact else exact


def _dataclass_converter(cls: type) -> Convert:
    """A dataclass from the list of its fields' values (to_plain's form). The
    fields that admit exactly one scalar type (most of them: a TCP record has 25)
    are checked together, one C-level pass over their types; the rest one by one."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    n, names = len(fields), [f.name for f in fields]
    one: list[tuple[int, type]] = []  # (position, the one type it admits)
    some: list[tuple[int, frozenset[type]]] = []  # several scalar types (int | None)
    convs: list[tuple[int, Convert]] = []  # nested: their own converter
    for i, f in enumerate(fields):
        exact = _exact_types(hints[f.name])
        if exact is not None and len(exact) == 1:
            one.append((i, next(iter(exact))))
        elif exact is not None:
            some.append((i, exact))
        elif (c := _converter(hints[f.name])) is not None:
            convs.append((i, c))
    want = tuple(t for _, t in one)
    if len(one) > 1:
        pick = operator.itemgetter(*(i for i, _ in one))
    else:
        pick = (lambda data: (data[one[0][0]],)) if one else (lambda data: ())

    def bad_field(i: int, reason: str) -> _Bad:
        exc = _Bad(reason)
        exc.path.append(f".{names[i]}")
        return exc

    def convert(data: Any) -> Any:
        if type(data) is not list and type(data) is not tuple:
            raise _Bad(f"expected a {cls.__name__} (a list of its {n} fields), "
                       f"got {_kind(data)}")
        if len(data) != n:
            raise _Bad(f"expected the {n} fields of {cls.__name__}, got {len(data)}")
        if tuple(map(type, pick(data))) != want:
            for (i, t), v in zip(one, pick(data), strict=True):
                if type(v) is not t:
                    raise bad_field(i, f"expected {_type_name(t)}, got {_kind(v)}")
        for i, allowed in some:
            if type(data[i]) not in allowed:
                raise bad_field(i, f"expected {_type_name(hints[names[i]])}, "
                                   f"got {_kind(data[i])}")
        if convs:
            data = list(data)
            for i, c in convs:
                try:
                    data[i] = c(data[i])
                except _Bad as exc:
                    exc.path.append(f".{names[i]}")
                    raise
        try:
            return cls(*data)
        except (TypeError, ValueError) as exc:  # a __post_init__ that refuses
            raise _Bad(f"{cls.__name__}: {exc}") from None

    return convert


def dumps(kind: str, obj: Any) -> bytes:
    return msgpack.packb(
        {"format": FORMAT, "kind": kind, "layout": layout(type(obj)), "body": to_plain(obj)},
        use_bin_type=True,
    )


def loads(kind: str, blob: bytes, cls: type[T] | None = None, *,
          max_bytes: int | None = None) -> T:
    """Decode a record of `kind` (as `cls`, checked: see from_plain). `max_bytes`
    refuses a bigger record before a byte of it is parsed."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise CheckpointError(f"{kind}: a record of {len(blob)} bytes, more than the "
                              f"{max_bytes} allowed")
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise CheckpointError(f"{kind}: not a keeper checkpoint: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") != kind:
        raise CheckpointError(
            f"expected a {kind!r} record of format {FORMAT}, got "
            f"{doc.get('kind') if isinstance(doc, dict) else type(doc).__name__!r}"
        )
    if "body" not in doc:
        raise CheckpointError(f"{kind}: a record without a body")
    if cls is not None and doc.get("layout") != layout(cls):
        raise CheckpointError(
            f"{kind}: written for another layout of {getattr(cls, '__name__', cls)} "
            f"({doc.get('layout')!r}, here {layout(cls)!r}): a keeper of another version?")
    body = doc["body"]
    return from_plain(cls, body) if cls is not None else body
