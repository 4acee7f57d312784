"""What the control APIs (host agent, Domain R) share: errors become JSON answers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from keeper.errors import KeeperError, LabError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(log: logging.Logger | None = None) -> Callable[[Handler], Handler]:
    """Turn our errors into JSON: unknown thing → 404, refused in this state → 409.
    Anything else is a bug and stays a 500 with a traceback in the log."""

    def wrap(fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if log is not None:
                log.info("%s %s", request.method, request.path)
            try:
                return await fn(request)
            except LabError as exc:
                return web.json_response({"error": str(exc)}, status=404)
            except KeeperError as exc:
                return web.json_response({"error": str(exc)}, status=409)

        return handler

    return wrap
