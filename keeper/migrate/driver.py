"""The asyncio side of the co-migration core (keeper.migrate.sync): runs its actions.

`drive` feeds the core and does what each Step says: it records the Step's marks in
the trace, launches its actions as tasks (several at once: the two managers run side
by side), and reports each one's end back to the core, a timeout or an exception
being a failure. Every action has a deadline. When the driver itself is cancelled
it cancels and awaits what is in flight, tells the core, runs the rollback the core
asks for under the rollback deadlines, and is then still cancelled: cancellation is
never swallowed, and rollback is never skipped. Once the point of no return is in
flight (the target may already run the guest) a cancel waits: the migration is
finished forward, and the driver is cancelled after that.

An action that cannot tell whether it took effect raises `Undecided`; for the point
of no return so does its timeout (it may have run on the target): the core then
keeps every source copy and rolls nothing back (keeper.migrate.sync, rule 4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keeper.errors import MigrationError
from keeper.migrate.sync import ROLLBACK, TABLES, Action, Core, Outcome, Step
from keeper.migrate.trace import Trace

log = logging.getLogger("keeper.migrate")

ActionFn = Callable[[], Awaitable[Any]]
DEFAULT_DEADLINE = 60.0
ROLLBACK_DEADLINE = 15.0


class Undecided(MigrationError):
    """The action may or may not have taken effect (its answer was lost)."""


@dataclass
class Result:
    outcome: Outcome
    errors: list[str] = field(default_factory=list)


async def drive(core: Core, actions: Mapping[Action, ActionFn], trace: Trace, *,
                deadlines: Mapping[Action, float] | None = None,
                on_step: Callable[[Step], None] | None = None) -> Result:
    """Run `core` to its end; return how it ended. Raises CancelledError (after the
    rollback) if cancelled."""
    deadlines = deadlines or {}
    tasks: dict[asyncio.Task[Any], Action] = {}

    def limit(action: Action) -> float:
        return deadlines.get(action, ROLLBACK_DEADLINE if action in ROLLBACK
                             else DEFAULT_DEADLINE)

    async def run(action: Action) -> Any:
        fn = actions.get(action)
        if fn is None:
            raise NotImplementedError(f"no {action.name} for this migration")
        try:
            return await asyncio.wait_for(fn(), limit(action))
        except TimeoutError:
            raise TimeoutError(f"{action.name} took more than {limit(action):.0f} s") from None

    def apply(step: Step) -> None:
        for mark in step.marks:
            trace.mark(mark)
        for err in step.errors:
            log.warning("%s %s: %s", trace.kind, trace.domain, err)
        if on_step is not None:
            on_step(step)
        for action in step.start:
            tasks[asyncio.create_task(run(action), name=action.name)] = action

    def report(task: asyncio.Task[Any]) -> Step:
        action = tasks.pop(task)
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is not None:
            no_return = TABLES[core.plan].no_return
            undecided = action is no_return and isinstance(exc, Undecided | TimeoutError)
            return core.failed(action, _why(exc), undecided=undecided)
        return core.done(action, bool(task.result()) if action is Action.ITERATE else None)

    step = core.start()
    apply(step)
    try:
        while not step.finished:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: t.get_name()):  # deterministic order
                step = report(task)
                apply(step)
    except asyncio.CancelledError:
        no_return = TABLES[core.plan].no_return
        if no_return in core.running or no_return in core.completed:
            # Past the point where stopping is safe (the target may already run the
            # guest): the only way out is forward. Finish, then stay cancelled.
            log.warning("%s %s: cancelled at the point of no return; finishing first",
                        trace.kind, trace.domain)
            while not step.finished:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.get_name()):
                    step = report(task)
                    apply(step)
            raise
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()
        step = core.cancel()
        apply(step)
        while not step.finished:  # the rollback, each step under its own deadline
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                step = report(task)
                apply(step)
        raise
    assert core.outcome is not None
    return Result(core.outcome, list(core.errors))


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return str(exc) or type(exc).__name__
