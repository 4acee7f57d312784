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
    """Rebuild `cls` (a dataclass, enum, container or scalar type) from plain data."""
    if data is None:
        return None
    convert = _converter(cls)
    return data if convert is None else convert(data)


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


def _converter(cls: Any) -> Convert | None:
    """How to rebuild `cls` from plain non-None data; None: the data is used as is."""
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
    return data if convert is None or data is None else convert(data)


def _make_converter(cls: Any) -> Convert | None:
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(cls) if a is not type(None)]
        return _converter(kinds[0]) if len(kinds) == 1 else None
    if origin in (list, tuple):
        (item,) = typing.get_args(cls)[:1] or (Any,)
        each = _converter(item)
        if each is None:
            return tuple if origin is tuple else None
        if origin is tuple:
            return lambda data: tuple(None if v is None else each(v) for v in data)
        return lambda data: [None if v is None else each(v) for v in data]
    if origin is dict:
        _, val = typing.get_args(cls)
        each = _converter(val)
        if each is None:
            return None
        return lambda data: {k: None if v is None else each(v) for k, v in data.items()}
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return _dataclass_converter(cls)
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return cls
    return None


def _dataclass_converter(cls: type) -> Convert:
    hints = typing.get_type_hints(cls)
    known = frozenset(f.name for f in dataclasses.fields(cls))
    fields = {name: c for name in known if (c := _converter(hints[name])) is not None}

    def convert(data: Any) -> Any:
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        if fields:
            data = {k: v if v is None or k not in fields else fields[k](v)
                    for k, v in data.items()}
        return cls(**data)

    return convert


def dumps(kind: str, obj: Any) -> bytes:
    return msgpack.packb(
        {"format": FORMAT, "kind": kind, "body": to_plain(obj)}, use_bin_type=True
    )


def loads(kind: str, blob: bytes, cls: type[T] | None = None) -> T:
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CheckpointError(f"{kind}: not a keeper checkpoint: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") != kind:
        raise CheckpointError(
            f"expected a {kind!r} record of format {FORMAT}, got "
            f"{doc.get('kind') if isinstance(doc, dict) else type(doc).__name__!r}"
        )
    body = doc["body"]
    return from_plain(cls, body) if cls is not None else body
