"""Small asyncio helpers the project shares."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[object]) -> BaseException | None:
    """Cancel `task`, wait for it, and return the error it ended with (None if it
    finished or was cancelled). If *we* are being cancelled meanwhile, that
    cancellation propagates: it is never swallowed."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception as exc:
        return exc
    return None


async def uninterrupted(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end even if we are cancelled meanwhile, then let the
    cancellation through. For request/answer exchanges on a stream (a guest's control
    socket): cut in the middle, the next request would read this one's answer."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise
