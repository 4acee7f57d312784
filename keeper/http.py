"""A small JSON/bytes HTTP client for the agents' and Domain Rs' control APIs.

Over a Unix socket (local control) or TCP (agent to agent). Every call has a
timeout; a non-2xx answer raises with the server's own error text.
"""

from __future__ import annotations

import json as jsonlib
import ssl as ssl_mod
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from keeper.errors import KeeperError

DEFAULT_TIMEOUT = 15.0


class RemoteError(KeeperError):
    def __init__(self, where: str, status: int, message: str) -> None:
        super().__init__(f"{where}: {message} (HTTP {status})")
        self.status = status


class Http:
    def __init__(self, *, unix: str | None = None, base: str = "http://keeper",
                 timeout: float = DEFAULT_TIMEOUT, ssl: ssl_mod.SSLContext | None = None) -> None:
        self.unix, self.base, self.timeout = unix, base.rstrip("/"), timeout
        self.ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self.unix or self.base

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector | None = None
            if self.unix:
                connector = aiohttp.UnixConnector(path=self.unix)
            elif self.ssl is not None:
                connector = aiohttp.TCPConnector(ssl=self.ssl)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def request(self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
                      timeout: float | None = None) -> tuple[bytes, dict[str, str]]:
        session = self._get_session()
        to = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with session.request(method, self.base + path, json=json, data=data,
                                       timeout=to) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise self._error(method, path, resp.status, body)
                return body, dict(resp.headers)
        except TimeoutError as exc:
            raise KeeperError(f"{method} {self.where}{path}: no answer in "
                              f"{timeout or self.timeout:.0f} s") from exc
        except aiohttp.ClientError as exc:
            raise KeeperError(f"{method} {self.where}{path}: {exc}") from exc

    async def lines(self, method: str, path: str, *, json: Any = None,
                    timeout: float = 600.0) -> AsyncIterator[Any]:
        """A streamed answer, one JSON document per line."""
        session = self._get_session()
        to = aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.request(method, self.base + path, json=json,
                                       timeout=to) as resp:
                if resp.status >= 300:
                    raise self._error(method, path, resp.status, await resp.read())
                async for line in resp.content:
                    if line.strip():
                        yield jsonlib.loads(line)
        except TimeoutError as exc:
            raise KeeperError(f"{method} {self.where}{path}: no end in {timeout:.0f} s") from exc
        except aiohttp.ClientError as exc:
            raise KeeperError(f"{method} {self.where}{path}: {exc}") from exc

    def _error(self, method: str, path: str, status: int, body: bytes) -> RemoteError:
        """The server's own error text (our APIs answer {"error": ...})."""
        try:
            message = jsonlib.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace")[:500]
        return RemoteError(f"{method} {self.where}{path}", status, message)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        body, _ = await self.request(method, path, **kw)
        return jsonlib.loads(body) if body else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
