"""One versioned serialiser for everything that goes into a checkpoint.

State is plain data: dataclasses of ints, bytes, str, bools, enums, lists, dicts and
nested dataclasses. `dumps` tags the payload with a kind and a format version;
`loads` refuses anything else. msgpack keeps bytes as bytes (no base64) and is fast
enough for megabytes of queued session data.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

import msgpack

from keeper.errors import CheckpointError

FORMAT = 1
T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """Dataclasses → dicts, enums → values, tuples → lists; everything else as is."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    names = _field_names(kind)
    if names is not None:
        return {name: to_plain(getattr(obj, name)) for name in names}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


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
    """Work out now what rebuilding `cls` takes (its types' hints and fields): a
    restoring Domain R does it while it waits, not in the pause (profiled: ~30 ms for
    a Domain R checkpoint on a loaded machine, paid at the first decode)."""
    _converter(cls)


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

    def sequence(data: Any) -> Any:
        if not isinstance(data, list | tuple):
            raise _Bad(f"expected a list, got {_kind(data)}")
        out = data if each is None else [_item(i, each, v) for i, v in enumerate(data)]
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

    def mapping(data: Any) -> dict[Any, Any]:
        if not isinstance(data, dict):
            raise _Bad(f"expected a map, got {_kind(data)}")
        if key is None and val is None:
            return data
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


def _dataclass_converter(cls: type) -> Convert:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    known = frozenset(f.name for f in fields)
    required = frozenset(f.name for f in fields if f.init and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
    exact = {f.name: t for f in fields if (t := _exact_types(hints[f.name])) is not None}
    convs = {f.name: c for f in fields
             if f.name not in exact and (c := _converter(hints[f.name])) is not None}

    def convert(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Bad(f"expected a {cls.__name__} (a map), got {_kind(data)}")
        names = data.keys()
        if not names <= known:
            raise _Bad(f"unknown fields {sorted(map(str, names - known))} in {cls.__name__}")
        if not required <= names:
            raise _Bad(f"missing fields {sorted(required - names)} of {cls.__name__}")
        out = dict(data)
        for k, v in data.items():
            allowed = exact.get(k)
            if allowed is not None:
                if type(v) not in allowed:
                    exc = _Bad(f"expected {_type_name(hints[k])}, got {_kind(v)}")
                    exc.path.append(f".{k}")
                    raise exc
                continue
            c = convs.get(k)
            if c is None:
                continue
            try:
                out[k] = c(v)
            except _Bad as exc:
                exc.path.append(f".{k}")
                raise
        try:
            return cls(**out)
        except (TypeError, ValueError) as exc:  # a __post_init__ that refuses
            raise _Bad(f"{cls.__name__}: {exc}") from None

    return convert


def dumps(kind: str, obj: Any) -> bytes:
    return msgpack.packb(
        {"format": FORMAT, "kind": kind, "body": to_plain(obj)}, use_bin_type=True
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
    body = doc["body"]
    return from_plain(cls, body) if cls is not None else body
