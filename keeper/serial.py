"""One versioned serialiser for everything that goes into a checkpoint.

State is plain data: dataclasses of ints, bytes, str, bools, enums, lists, dicts and
nested dataclasses. `dumps` tags the payload with a kind and a format version;
`loads` refuses anything else. msgpack keeps bytes as bytes (no base64) and is fast
enough for megabytes of queued session data.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

import msgpack

from keeper.errors import CheckpointError

FORMAT = 1
T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """Dataclasses → dicts, enums → values, tuples → lists; everything else as is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(cls) if a is not type(None)]
        return from_plain(kinds[0], data) if len(kinds) == 1 else data
    if origin in (list, tuple):
        (item,) = typing.get_args(cls)[:1] or (Any,)
        out = [from_plain(item, v) for v in data]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        _, val = typing.get_args(cls)
        return {k: from_plain(val, v) for k, v in data.items()}
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**{k: from_plain(hints[k], v) for k, v in data.items()})
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return cls(data)
    return data


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
