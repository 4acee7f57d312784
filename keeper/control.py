"""What the control APIs (host agent, Domain R) share: errors become JSON answers."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from keeper.errors import BadRequest, KeeperError, LabError

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A control or peer request's JSON body; bulk data (pages, checkpoints) is not JSON
# and has its own limits.
MAX_JSON_BODY = 1 << 20


class TooLarge(BadRequest):
    """A request body over the limit (a 413)."""


def guarded(log: logging.Logger | None = None) -> Callable[[Handler], Handler]:
    """Turn our errors into JSON: malformed request → 400, too large → 413, unknown
    thing → 404, refused in this state → 409; aiohttp's own refusals (a body over the
    application's limit) keep their status and say why in JSON too.
    Anything else is a bug and stays a 500 with a traceback in the log."""

    def wrap(fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if log is not None:
                log.info("%s %s", request.method, request.path)
            try:
                return await fn(request)
            except TooLarge as exc:
                return web.json_response({"error": str(exc)}, status=413)
            except web.HTTPClientError as exc:
                return web.json_response({"error": exc.text or exc.reason},
                                         status=exc.status)
            except BadRequest as exc:
                return web.json_response({"error": str(exc)}, status=400)
            except LabError as exc:
                return web.json_response({"error": str(exc)}, status=404)
            except KeeperError as exc:
                return web.json_response({"error": str(exc)}, status=409)

        return handler

    return wrap


async def body(request: web.Request, cls: type[T], *, limit: int = MAX_JSON_BODY) -> T:
    """The request's JSON body as dataclass `cls`, checked once: a missing field or a
    wrong type is a BadRequest naming it (a 400), never a KeyError (a 500). A body
    over `limit` bytes is refused (a 413) before more than that is read, whatever the
    application's own limit is (the peer API takes checkpoints of hundreds of MB)."""
    return parse(cls, await read_json(request, limit=limit))


async def read_json(request: web.Request, *, limit: int = MAX_JSON_BODY) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"a body of {request.content_length} bytes; at most {limit} here")
    raw = bytearray()
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            raise TooLarge(f"a body of more than {limit} bytes; at most {limit} here")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None


def parse(cls: type[T], doc: Any) -> T:
    if not isinstance(doc, dict):
        raise BadRequest(f"expected a JSON object for {cls.__name__}, got {type(doc).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(doc) - set(fields)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f"missing field {name!r}")
            continue
        out[name] = _check(name, hints[name], doc[name])
    return cls(**out)


def ipv4(field: str, value: str) -> None:
    """A BadRequest unless `value` is a unicast IPv4 address (a Domain R's own)."""
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(f"field {field!r} must be an IPv4 address, not {value[:60]!r}") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or value != str(addr) \
            or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise BadRequest(f"field {field!r}: {value} cannot be a Domain R's address")


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def mac(field: str, value: str) -> None:
    """A BadRequest unless `value` is a unicast Ethernet address, aa:bb:cc:dd:ee:ff."""
    if not _MAC.fullmatch(value):
        raise BadRequest(f"field {field!r} must be a MAC address (02:6b:70:00:00:01), "
                         f"not {value[:60]!r}")
    if int(value[:2], 16) & 1:
        raise BadRequest(f"field {field!r}: {value} is a multicast address")


def _check(name: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list):
            raise BadRequest(f"field {name!r} must be a list")
        (item,) = typing.get_args(kind) or (Any,)
        return [_check(name, item, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadRequest(f"field {name!r} must be an object")
        return value
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a number, not a boolean")
    if isinstance(kind, type) and not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value
