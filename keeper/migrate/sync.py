"""The co-migration core: S1..S7 between two managers as a pure state machine.

Nothing here does I/O or waits. Events go in (`start`, `done`, `failed`, `cancel`);
each returns a `Step` that says which actions to launch now, which trace marks to
record (in order) and whether the migration has finished, and how (the shape of
etcd-io/raft's `Step`/`Ready`; the asyncio driver around it does all the work).
The whole state is plain data (`Core`), so it round-trips through `keeper.serial`
and every interleaving of the two managers can be tried in a test.

COMIGRATION (DESIGN.md §4, paper §4.5). The two managers' steps, top to bottom in
time; an arrow is one manager waiting on the other; "…" marks the trace.

    MM_U (Domain U)                            MM_R (Domain R)
    CREATE_U  (empty incoming U on B)          PREPARE_R  (empty twin R on B)
      … U created on target                      … R created on target
      └───────────── U exists on B ──────────► ASSOCIATE  (U becomes R's managed domain)
    ITERATE, ITERATE, … until converged    S1  ASSOCIATE done: R is ready
    (converged, R not ready yet: the rounds      │
     go on; a running round is never cut)        │
    S2 ◄───────────── both ready ─────────────►  S2
                                               STOP_R  quiesce, link down, dump
                                                 … R stopped
    S3 ◄──────────── R has stopped ──────────────┘
    STOP_U  (pause U)  … U stopped
       └──────────── U has stopped ─────────► S4 SAVE_LINKS  (event-channel pairs)
    S5 ◄──────────── links are saved ────────────┘
    FINAL_COPY  (dirty + may-write pages, vCPU)
    LINK_U  (B binds U's channels to the same ports)
    S6  U may not resume before this
       └──────── U's memory complete on B ──► S7 RESTORE_R  (re-map R's pages, sockets)
    RESUME_U ◄──────── R is restored ─────────────┘
      … U resumed  ───────────────────────────► RESUME_R  (link up, ARP, serve)
                                                 … R resumed  ← the point of no return
                                               COMMIT  (release the source copies)
                                                 … source released

S7 is gated on S6 as well as on the final copy so that the points pass strictly in
order; in §8's QEMU mapping LINK_U is "the target QEMU's device sockets are ready",
RESTORE_R connects R's links to them and RESUME_U is `cont`, so R's links are up
before the VM runs on B either way.

DOMR_MOVE (a Domain R alone, no U): PREPARE_R … prepared → STOP_R
… quiesced (at issue) / dumped (at completion) → RESTORE_R → RESUME_R … resumed →
COMMIT … source_released. The driver may add "link_down" inside STOP_R itself.
Its point of no return is RESUME_R's completion: then B serves with R's IP and MAC.

SOLO (the conventional baseline, in the paper's order): CREATE_U … U created on
target → ITERATE until converged → STOP_U … U stopped → FINAL_COPY … final copy →
LINK_U → RESUME_U … U resumed → STOP_SERVERS … servers stopped, and alongside
START_SERVERS … servers started → COMMIT … source released. The source's servers (Dom0's) run
through all of it: they keep reading clients' input into the stopped U's devices
until the source domain is destroyed, and whatever they read after the final copy
is lost. Point of no return: RESUME_U's completion (the servers never stopped
before it, so a rollback only unpauses U).

Marks. A "stopped"/"quiesced" mark comes with the action that stops (the driver
records a Step's marks before it launches the Step's actions, so the mark is the
moment the pause begins); a "created"/"resumed"/"released" mark comes with the
completion. Every plan starts with "start"; a rollback ends with "rolled_back", a
failure after the point of no return with "failed_after_resume". The summary's
downtimes are the spans "U stopped" → "U resumed" and "R stopped" → "R resumed".

ITERATE's result `converged` means "MM_U is ready for the stop-and-copy": the
driver's policy says so (few dirty pages left, or too many rounds / too much sent).
Once converged, MM_U stays ready; later rounds only shrink what the final copy
sends.

Rollback, which cannot be skipped:
  1. The core counts an action as having changed the world when it *issues* it, not
     when it completes, so a failure or cancellation in the middle of STOP_R still
     yields RESTART_R, in the middle of STOP_U UNPAUSE_U, in the middle of
     CREATE_U/PREPARE_R CANCEL_TARGET.
  2. On the first failure (or `cancel`) no forward action is issued any more. The
     core waits until every in-flight action has reported (done or failed).
  3. If the point of no return has not completed, it then issues every rollback
     action that applies, each exactly once:
        CANCEL_TARGET    if CREATE_U or PREPARE_R was issued (B's half-made pair)
        UNPAUSE_U        if STOP_U was issued; if RESUME_U was issued (U may run on B),
                         only after CANCEL_TARGET has reported
        RESTART_R        if STOP_R was issued, after UNPAUSE_U has reported
     R comes back after U runs again because a stopped QEMU guest drops the input
     it would pass on (the same reason RESUME_R follows RESUME_U). Otherwise
     CANCEL_TARGET runs alongside, so nothing waits for an unreachable target. A
     failing rollback action is recorded in `errors` and does not stop the others;
     when all have reported the core finishes ROLLED_BACK.
  4. Once the point of no return has completed, nothing is rolled back: the core
     finishes FAILED_AFTER_RESUME. In COMIGRATION that point is RESUME_R, not
     RESUME_U: Domain U has no outside effect but through its Domain R, and B's R
     sends nothing before it leaves repair mode, so a U that already ran on B is
     still discarded (CANCEL_TARGET) before U runs here again. A failure of
     RESUME_R means, by its contract, that B's R of this epoch is fenced and will
     never serve (keeper.migrate.domr settles it with the target); when the driver
     cannot learn that, it reports the failure `undecided` and the core finishes
     FAILED_AFTER_RESUME with every source copy kept (docs/design.md, the window).

Driver contract, in this order:
  1. `core = Core(plan)`; `step = core.start()`.
  2. For every Step: record `step.marks` (timestamped, in order), then launch every
     action in `step.start`. Several may be in flight at once.
  3. When an action ends, report it: `done(action)` (`done(Action.ITERATE,
     converged)` for a round) or `failed(action, "why")`; a timeout is a failure.
     Each report returns the next Step. Stop when `step.finished`.
  4. `cancel()` is for the driver's own cancellation, after it has cancelled and
     awaited every in-flight action: they all count as failed and are not reported
     again. The rollback it yields must still be run (under its own deadline).
  5. Rollback actions are idempotent and must cope with a forward action that did
     half its work.
Any other event (a report for an action not in flight, a second `start`, anything
after the end) raises `SyncError` and poisons the core: every later call raises.
Everything in a Step is new since the previous Step; `Core.errors` keeps them all,
the cause first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from keeper.errors import ProtocolError


class SyncError(ProtocolError):
    """The driver broke the core's protocol (an event illegal in the core's state)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, fault="us")


class Plan(enum.Enum):
    COMIGRATION = "comigration"  # MM_U + MM_R, the seven points
    DOMR_MOVE = "domr_move"  # a Domain R alone
    SOLO = "solo"  # the baseline: U alone, its servers end here with it, start there


class Point(enum.Enum):
    S1 = "S1"
    S2 = "S2"
    S3 = "S3"
    S4 = "S4"
    S5 = "S5"
    S6 = "S6"
    S7 = "S7"


class Action(enum.Enum):
    # forward
    CREATE_U = "CREATE_U"  # target: empty incoming Domain U
    ITERATE = "ITERATE"  # one pre-copy round / one poll; done(ITERATE, converged)
    STOP_U = "STOP_U"  # pause U at a clean point
    FINAL_COPY = "FINAL_COPY"  # what is still dirty (+ may-write), vCPU state
    LINK_U = "LINK_U"  # target: U's event channels / device links, same ports
    RESUME_U = "RESUME_U"  # target: U runs
    PREPARE_R = "PREPARE_R"  # target: empty twin Domain R (same IP/MAC, link down)
    ASSOCIATE = "ASSOCIATE"  # target: U is the new R's managed domain
    STOP_R = "STOP_R"  # quiesce R, link down, dump
    SAVE_LINKS = "SAVE_LINKS"  # save the event-channel pairs / device-link state
    RESTORE_R = "RESTORE_R"  # target: re-map R's pages, restore its sockets
    RESUME_R = "RESUME_R"  # target: R's link up, gratuitous ARP, serve
    STOP_SERVERS = "STOP_SERVERS"  # SOLO: the source's servers end with it (cut off)
    START_SERVERS = "START_SERVERS"  # SOLO: fresh servers on the target
    COMMIT = "COMMIT"  # release the source copies
    # rollback
    CANCEL_TARGET = "CANCEL_TARGET"  # remove the target's half-made pair
    UNPAUSE_U = "UNPAUSE_U"  # source: U runs again
    RESTART_R = "RESTART_R"  # source: R's link up, sockets out of repair, serve


class Outcome(enum.Enum):
    MIGRATED = "migrated"
    ROLLED_BACK = "rolled_back"
    FAILED_AFTER_RESUME = "failed_after_resume"


class Fact(enum.Enum):
    U_READY = "U_READY"  # ITERATE has reported converged, and no round is running


class Phase(enum.Enum):
    IDLE = "idle"  # made, not started
    FORWARD = "forward"
    DRAINING = "draining"  # a failure: waiting for the in-flight actions to report
    ROLLING_BACK = "rolling_back"
    FINISHED = "finished"


# A precondition: an Action has completed, a Point has passed, or a Fact holds.
Cond = Action | Point | Fact


@dataclass(frozen=True)
class Rule:
    """A forward action: issued once all of `after` hold (and not yet issued). With
    `until`, issued again after each completion for as long as `until` does not hold."""

    action: Action
    after: frozenset[Cond] = frozenset()
    until: Cond | None = None
    on_issue: tuple[str, ...] = ()
    on_done: tuple[str, ...] = ()


@dataclass(frozen=True)
class Undo:
    """A rollback action: applies if any of `if_issued` was issued; runs once the
    rollback actions in `after` that apply have reported, and — for each (X, Y) of
    `after_if` — once Y has reported if X was issued."""

    action: Action
    if_issued: frozenset[Action]
    after: frozenset[Action] = frozenset()
    after_if: tuple[tuple[Action, Action], ...] = ()


@dataclass(frozen=True)
class Table:
    points: tuple[tuple[Point, frozenset[Cond]], ...]  # in the order they pass
    rules: tuple[Rule, ...]  # in the order they are issued when several become ready
    undo: tuple[Undo, ...]
    no_return: Action  # once it has completed, nothing is rolled back
    last: Action  # its completion ends the migration


def _rule(action: Action, *after: Cond, until: Cond | None = None,
          on_issue: tuple[str, ...] = (), on_done: tuple[str, ...] = ()) -> Rule:
    return Rule(action, frozenset(after), until, on_issue, on_done)


def _undo(action: Action, *if_issued: Action, after: tuple[Action, ...] = (),
          after_if: tuple[tuple[Action, Action], ...] = ()) -> Undo:
    return Undo(action, frozenset(if_issued), frozenset(after), after_if)


A, P = Action, Point

TABLES: dict[Plan, Table] = {
    Plan.COMIGRATION: Table(
        points=(
            (P.S1, frozenset({A.ASSOCIATE})),
            (P.S2, frozenset({P.S1, Fact.U_READY})),
            (P.S3, frozenset({A.STOP_R})),
            (P.S4, frozenset({A.STOP_U})),
            (P.S5, frozenset({A.SAVE_LINKS})),
            (P.S6, frozenset({A.LINK_U})),
            (P.S7, frozenset({A.FINAL_COPY, P.S6})),
        ),
        rules=(
            _rule(A.CREATE_U, on_done=("U created on target",)),  # MM_U
            _rule(A.PREPARE_R, on_done=("R created on target",)),  # MM_R
            _rule(A.ITERATE, A.CREATE_U, until=P.S2),
            _rule(A.ASSOCIATE, A.CREATE_U, A.PREPARE_R),  # → S1
            _rule(A.STOP_R, P.S2, on_issue=("R stopped",)),  # → S3
            _rule(A.STOP_U, P.S3, on_issue=("U stopped",)),  # → S4
            _rule(A.SAVE_LINKS, P.S4),  # → S5
            _rule(A.FINAL_COPY, P.S5),
            _rule(A.LINK_U, A.FINAL_COPY),  # → S6, then S7
            _rule(A.RESTORE_R, P.S7),
            _rule(A.RESUME_U, P.S6, A.RESTORE_R, on_done=("U resumed",)),
            _rule(A.RESUME_R, A.RESUME_U, on_done=("R resumed",)),
            _rule(A.COMMIT, A.RESUME_R, on_done=("source released",)),
        ),
        undo=(
            _undo(A.CANCEL_TARGET, A.CREATE_U, A.PREPARE_R),
            # if RESUME_U was issued and failed, B's U must be gone before U runs here
            _undo(A.UNPAUSE_U, A.STOP_U, after_if=((A.RESUME_U, A.CANCEL_TARGET),)),
            _undo(A.RESTART_R, A.STOP_R, after=(A.UNPAUSE_U,)),
        ),
        # Not RESUME_U: U has no outside effect but through R, and B's R sends
        # nothing before it leaves repair mode (RESUME_R), so until then B's run of U
        # is invisible and the copies kept here are exact (docs/design.md, the window)
        no_return=A.RESUME_R,
        last=A.COMMIT,
    ),
    Plan.DOMR_MOVE: Table(
        points=(),
        rules=(
            _rule(A.PREPARE_R, on_done=("prepared",)),
            _rule(A.STOP_R, A.PREPARE_R, on_issue=("quiesced",), on_done=("dumped",)),
            _rule(A.RESTORE_R, A.STOP_R),
            _rule(A.RESUME_R, A.RESTORE_R, on_done=("resumed",)),
            _rule(A.COMMIT, A.RESUME_R, on_done=("source_released",)),
        ),
        undo=(
            _undo(A.CANCEL_TARGET, A.PREPARE_R),
            _undo(A.RESTART_R, A.STOP_R),
        ),
        no_return=A.RESUME_R,
        last=A.COMMIT,
    ),
    Plan.SOLO: Table(
        points=(),
        rules=(
            _rule(A.CREATE_U, on_done=("U created on target",)),
            _rule(A.ITERATE, A.CREATE_U, until=Fact.U_READY),
            # the source's servers go on reading input into the stopped U's devices
            # until the source domain is destroyed: what they read after the final
            # copy is lost (the paper's baseline, §5.1)
            _rule(A.STOP_U, Fact.U_READY, on_issue=("U stopped",)),
            _rule(A.FINAL_COPY, A.STOP_U, on_done=("final copy",)),
            _rule(A.LINK_U, A.FINAL_COPY),
            _rule(A.RESUME_U, A.LINK_U, on_done=("U resumed",)),
            # the target runs U: the source domain is destroyed, its servers with it
            # (their clients cut off), while fresh ones start on the target
            _rule(A.STOP_SERVERS, A.RESUME_U, on_issue=("servers stopped",)),
            _rule(A.START_SERVERS, A.RESUME_U, on_done=("servers started",)),
            _rule(A.COMMIT, A.STOP_SERVERS, A.START_SERVERS, on_done=("source released",)),
        ),
        undo=(
            _undo(A.CANCEL_TARGET, A.CREATE_U),
            # if RESUME_U was issued and failed, B's U must be gone before U runs here
            _undo(A.UNPAUSE_U, A.STOP_U, after_if=((A.RESUME_U, A.CANCEL_TARGET),)),
        ),
        no_return=A.RESUME_U,
        last=A.COMMIT,
    ),
}
del A, P

ROLLBACK: frozenset[Action] = frozenset(
    u.action for t in TABLES.values() for u in t.undo)

_END_MARK = {Outcome.ROLLED_BACK: "rolled_back",
             Outcome.FAILED_AFTER_RESUME: "failed_after_resume"}


@dataclass(frozen=True)
class Step:
    """What one event produced; everything in it is new since the previous Step."""

    start: tuple[Action, ...] = ()  # launch these now (after recording the marks)
    marks: tuple[str, ...] = ()  # trace marks, in order, points included ("S1")
    finished: bool = False
    outcome: Outcome | None = None  # set when finished
    errors: tuple[str, ...] = ()  # errors recorded by this event ("STOP_R: why")


class _Out:
    """What an event produces while it is being handled (not part of the state)."""

    def __init__(self, marks: tuple[str, ...] = ()) -> None:
        self.start: list[Action] = []
        self.marks: list[str] = list(marks)
        self.errors: list[str] = []

    def step(self, core: Core) -> Step:
        return Step(tuple(self.start), tuple(self.marks), core.phase is Phase.FINISHED,
                    core.outcome, tuple(self.errors))


@dataclass
class Core:
    """One migration's protocol state. Lists, never sets: the order is part of the
    record, and the state round-trips through `keeper.serial` as it is."""

    plan: Plan
    phase: Phase = Phase.IDLE
    issued: list[Action] = field(default_factory=list)  # each once, in issue order
    running: list[Action] = field(default_factory=list)  # in flight
    completed: list[Action] = field(default_factory=list)  # reported done (once each)
    failures: list[Action] = field(default_factory=list)  # reported failed / cancelled
    passed: list[Point] = field(default_factory=list)
    converged: bool = False  # an ITERATE has reported converged
    rounds: int = 0  # ITERATE rounds issued
    errors: list[str] = field(default_factory=list)  # the cause first
    outcome: Outcome | None = None
    doubtful: list[Action] = field(default_factory=list)  # failed undecided (may have run)
    poison: str = ""  # why the core refuses every event; "" while healthy

    # -- events ------------------------------------------------------------------------

    def start(self) -> Step:
        self._check("start()", self.phase is Phase.IDLE, "already started")
        self.phase = Phase.FORWARD
        out = _Out(("start",))
        self._advance(out)
        return out.step(self)

    def done(self, action: Action, result: bool | None = None) -> Step:
        """`action` completed; for ITERATE `result` says whether MM_U converged."""
        event = f"done({action.name})"
        self._check_report(event, action)
        if action is Action.ITERATE:
            self._check(event, isinstance(result, bool), "ITERATE reports converged: bool")
        else:
            self._check(event, result is None, f"{action.name} carries no result")
        out = _Out()
        self.running.remove(action)
        if action not in self.completed:
            self.completed.append(action)
        if action is Action.ITERATE and result:
            self.converged = True
        rule = self._rule(action)
        if rule is not None:
            out.marks.extend(rule.on_done)
        if action is self._table.last and self.phase is Phase.FORWARD:
            self._finish(Outcome.MIGRATED, out)
        self._advance(out)
        return out.step(self)

    def failed(self, action: Action, error: str, *, undecided: bool = False) -> Step:
        """`action` failed (or timed out, or the driver cancelled it). `undecided`: the
        driver cannot tell whether it took effect (only for the point of no return:
        then it may have, and nothing is rolled back)."""
        event = f"failed({action.name})"
        self._check_report(event, action)
        self._check(event, not undecided or action is self._table.no_return,
                    "only the point of no return can be undecided")
        out = _Out()
        if undecided:
            self.doubtful.append(action)
        self._fail(action, error, out)
        self._advance(out)
        return out.step(self)

    def cancel(self) -> Step:
        """The driver is cancelled: every in-flight action counts as failed."""
        self._check("cancel()", self.phase in _LIVE, f"nothing to cancel ({self.phase.value})")
        out = _Out()
        if not self.running:
            self._error("cancelled", out)
        for action in list(self.running):
            if action is self._table.no_return:  # cut midway: it may have taken effect
                self.doubtful.append(action)
            self._fail(action, "cancelled", out)
        if self.phase is Phase.FORWARD:
            self.phase = Phase.DRAINING
        self._advance(out)
        return out.step(self)

    # -- the engine --------------------------------------------------------------------

    @property
    def _table(self) -> Table:
        return TABLES[self.plan]

    def _rule(self, action: Action) -> Rule | None:
        return next((r for r in self._table.rules if r.action is action), None)

    def _holds(self, cond: Cond) -> bool:
        if isinstance(cond, Action):
            return cond in self.completed
        if isinstance(cond, Point):
            return cond in self.passed
        # Fact.U_READY
        return self.converged and Action.ITERATE not in self.running

    def _ready(self, rule: Rule) -> bool:
        if rule.action in self.running:
            return False
        if rule.until is None:
            if rule.action in self.issued:
                return False
        elif self._holds(rule.until):
            return False
        return all(self._holds(c) for c in rule.after)

    def _issue(self, action: Action, out: _Out) -> None:
        if action not in self.issued:  # recorded before the driver awaits anything
            self.issued.append(action)
        if action is Action.ITERATE:
            self.rounds += 1
        self.running.append(action)
        out.start.append(action)

    def _fail(self, action: Action, error: str, out: _Out) -> None:
        self.running.remove(action)
        self.failures.append(action)
        self._error(f"{action.name}: {error}", out)
        if self.phase is Phase.FORWARD:
            self.phase = Phase.DRAINING

    def _error(self, text: str, out: _Out) -> None:
        self.errors.append(text)
        out.errors.append(text)

    def _finish(self, outcome: Outcome, out: _Out) -> None:
        self.phase, self.outcome = Phase.FINISHED, outcome
        if outcome in _END_MARK:
            out.marks.append(_END_MARK[outcome])

    def _advance(self, out: _Out) -> None:
        """Issue whatever the new state allows, to a fixed point."""
        table = self._table
        if self.phase is Phase.FORWARD:
            changed = True
            while changed:
                changed = False
                for point, needs in table.points:  # points first: S2 must beat a new round
                    if point not in self.passed and all(self._holds(c) for c in needs):
                        self.passed.append(point)
                        out.marks.append(point.value)
                        changed = True
                for rule in table.rules:
                    if self._ready(rule):
                        out.marks.extend(rule.on_issue)
                        self._issue(rule.action, out)
                        changed = True
            return
        if self.phase is Phase.DRAINING:
            if self.running:
                return
            if table.no_return in self.completed or table.no_return in self.doubtful:
                self._finish(Outcome.FAILED_AFTER_RESUME, out)
                return
            self.phase = Phase.ROLLING_BACK
        if self.phase is Phase.ROLLING_BACK:
            due = [u for u in table.undo if self._applies(u)]
            for u in due:
                if u.action not in self.issued and all(
                        self._reported(d.action) for d in due if d.action in u.after) and all(
                        self._reported(y) for x, y in u.after_if if x in self.issued):
                    self._issue(u.action, out)
            if all(self._reported(u.action) for u in due):
                self._finish(Outcome.ROLLED_BACK, out)

    def _applies(self, undo: Undo) -> bool:
        return any(a in self.issued for a in undo.if_issued)

    def _reported(self, action: Action) -> bool:
        return action in self.completed or action in self.failures

    # -- refusing ----------------------------------------------------------------------

    def _check_report(self, event: str, action: Action) -> None:
        self._check(event, self.phase in _LIVE, f"the core is {self.phase.value}")
        self._check(event, action in self.running, f"{action.name} is not in flight")

    def _check(self, event: str, ok: bool, why: str) -> None:
        if self.poison:
            raise SyncError(f"{event}: the core was poisoned earlier: {self.poison}")
        if not ok:
            running = ", ".join(a.name for a in self.running) or "nothing"
            self.poison = (f"driver sent {event} but {why} ({self.plan.value}, "
                           f"{self.phase.value}, in flight: {running})")
            raise SyncError(self.poison)


_LIVE = (Phase.FORWARD, Phase.DRAINING, Phase.ROLLING_BACK)

__all__ = ["ROLLBACK", "TABLES", "Action", "Core", "Outcome", "Plan", "Point", "Step",
           "SyncError"]
