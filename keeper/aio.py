"""Small asyncio helpers the project shares."""

from __future__ import annotations

import asyncio


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
