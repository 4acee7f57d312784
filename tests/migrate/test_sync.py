"""The co-migration core (keeper.migrate.sync), driven in memory.

The property tests play the driver: they keep the actions in flight and let
hypothesis pick which one ends next, whether it fails, what ITERATE reports, and when
the driver cancels. Each Step is checked against the protocol as DESIGN.md §4 states
it, written here independently of the core's tables (BEFORE, MARKS, UNDOES). The
scripted tests below read like traces: event -> actions started | marks.
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from keeper import serial
from keeper.errors import KeeperError, ProtocolError
from keeper.migrate import sync
from keeper.migrate.sync import Action, Core, Outcome, Plan, Point, Step, SyncError

A = Action
POINTS = [p.value for p in Point]
ROLLBACK = {A.CANCEL_TARGET, A.UNPAUSE_U, A.RESTART_R}
FORWARD = set(Action) - ROLLBACK
# A rollback action undoes what any of these changed (issued, not necessarily done).
UNDOES = {A.CANCEL_TARGET: {A.CREATE_U, A.PREPARE_R}, A.UNPAUSE_U: {A.STOP_U},
          A.RESTART_R: {A.STOP_R}}
NO_RETURN = {Plan.COMIGRATION: A.RESUME_R, Plan.SOLO: A.RESUME_U, Plan.DOMR_MOVE: A.RESUME_R}
FORWARD_OF = {
    Plan.COMIGRATION: {A.CREATE_U, A.PREPARE_R, A.ITERATE, A.ASSOCIATE, A.STOP_R, A.STOP_U,
                       A.SAVE_LINKS, A.FINAL_COPY, A.LINK_U, A.RESTORE_R, A.RESUME_U,
                       A.RESUME_R, A.COMMIT},
    Plan.DOMR_MOVE: {A.PREPARE_R, A.STOP_R, A.RESTORE_R, A.RESUME_R, A.COMMIT},
    Plan.SOLO: {A.CREATE_U, A.ITERATE, A.STOP_SERVERS, A.STOP_U, A.FINAL_COPY, A.LINK_U,
                A.RESUME_U, A.START_SERVERS, A.COMMIT},
}
# What must have happened before each event ("converged": an ITERATE said so).
BEFORE: dict[Plan, dict[str, set[str]]] = {
    Plan.COMIGRATION: {
        "issue ITERATE": {"done CREATE_U"},
        "issue ASSOCIATE": {"done CREATE_U", "done PREPARE_R"},
        "mark S1": {"done ASSOCIATE"},
        "mark S2": {"mark S1", "converged"},
        "issue STOP_R": {"mark S2"},
        "mark S3": {"done STOP_R"},
        "issue STOP_U": {"mark S3"},
        "mark S4": {"done STOP_U"},
        "issue SAVE_LINKS": {"mark S4"},
        "mark S5": {"done SAVE_LINKS"},
        "issue FINAL_COPY": {"mark S5"},
        "issue LINK_U": {"done FINAL_COPY"},
        "mark S6": {"done LINK_U"},
        "mark S7": {"done FINAL_COPY", "mark S6"},
        "issue RESTORE_R": {"mark S7"},
        "issue RESUME_U": {"mark S6", "done RESTORE_R"},
        "issue RESUME_R": {"done RESUME_U"},
        "issue COMMIT": {"done RESUME_R"},
    },
    Plan.DOMR_MOVE: {
        "issue STOP_R": {"done PREPARE_R"},
        "issue RESTORE_R": {"done STOP_R"},
        "issue RESUME_R": {"done RESTORE_R"},
        "issue COMMIT": {"done RESUME_R"},
    },
    Plan.SOLO: {
        "issue ITERATE": {"done CREATE_U"},
        "issue STOP_U": {"converged"},
        "issue FINAL_COPY": {"done STOP_U"},
        "issue LINK_U": {"done FINAL_COPY"},
        "issue RESUME_U": {"done LINK_U"},
        "issue STOP_SERVERS": {"done RESUME_U"},  # the source's ran until now
        "issue START_SERVERS": {"done RESUME_U"},
        "issue COMMIT": {"done STOP_SERVERS", "done START_SERVERS"},
    },
}
# Each trace mark (besides "start", the points and the end marks) and the event that
# makes it: the issue of an action, or its completion.
MARKS: dict[Plan, dict[str, tuple[str, Action]]] = {
    Plan.COMIGRATION: {
        "U created on target": ("done", A.CREATE_U), "R created on target": ("done", A.PREPARE_R),
        "R stopped": ("issue", A.STOP_R), "U stopped": ("issue", A.STOP_U),
        "U resumed": ("done", A.RESUME_U), "R resumed": ("done", A.RESUME_R),
        "source released": ("done", A.COMMIT),
    },
    Plan.DOMR_MOVE: {
        "prepared": ("done", A.PREPARE_R), "quiesced": ("issue", A.STOP_R),
        "dumped": ("done", A.STOP_R), "resumed": ("done", A.RESUME_R),
        "source_released": ("done", A.COMMIT),
    },
    Plan.SOLO: {
        "U created on target": ("done", A.CREATE_U), "servers stopped": ("issue", A.STOP_SERVERS),
        "U stopped": ("issue", A.STOP_U), "final copy": ("done", A.FINAL_COPY),
        "U resumed": ("done", A.RESUME_U),
        "servers started": ("done", A.START_SERVERS), "source released": ("done", A.COMMIT),
    },
}
END_MARK = {Outcome.ROLLED_BACK: "rolled_back", Outcome.FAILED_AFTER_RESUME: "failed_after_resume"}
# Events until a run without failures ends, at the fewest rounds (one ITERATE).
SHORTEST = {Plan.COMIGRATION: 13, Plan.DOMR_MOVE: 5, Plan.SOLO: 9}
ROUND_CAP = 6  # the model's ITERATE converges by then, so that a run ends


# -- the driver model --------------------------------------------------------------------


@dataclass
class Model:
    """The driver's view of one run, checking every Step as it arrives."""

    plan: Plan
    log: list[str] = field(default_factory=list)
    in_flight: list[Action] = field(default_factory=list)
    issued: list[Action] = field(default_factory=list)  # ITERATE once per round
    marks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rounds_done: int = 0
    failed: bool = False
    past_no_return: bool = False  # the point of no return had completed at the first failure
    outcome: Outcome | None = None
    # this event, while its Step is checked
    expect_errors: list[str] = field(default_factory=list)
    done_now: Action | None = None

    def report(self, kind: str, action: Action | None = None, *, converged: bool = False,
               error: str = "") -> None:
        """Book an event on the driver's side before the core sees it."""
        assert self.outcome is None
        self.expect_errors, self.done_now = [], None
        if kind == "start":
            return
        if kind == "done":
            assert action is not None
            self.in_flight.remove(action)
            self.log.append(f"done {action.name}")
            self.done_now = action
            if action is A.ITERATE:
                self.rounds_done += 1
                if converged:
                    self.log.append("converged")
            return
        failing = [action] if kind == "fail" else list(self.in_flight)
        why = error if kind == "fail" else "cancelled"
        if not self.failed:
            self.failed = True
            self.past_no_return = f"done {NO_RETURN[self.plan].name}" in self.log or (
                kind == "cancel" and NO_RETURN[self.plan] in self.in_flight)  # cut midway
        if not failing:
            self.expect_errors.append("cancelled")
        for a in failing:
            assert a is not None
            self.in_flight.remove(a)
            self.log.append(f"fail {a.name}")
            self.expect_errors.append(f"{a.name}: {why}")
        self.errors += self.expect_errors

    def apply(self, step: Step, kind: str) -> None:
        assert step.errors == tuple(self.expect_errors)
        before = BEFORE[self.plan]
        for m in step.marks:
            self.check_mark(m, step, kind, before)
            self.marks.append(m)
            self.log.append(f"mark {m}")
        for a in step.start:
            self.check_issue(a, before)
            self.in_flight.append(a)
            self.issued.append(a)
            self.log.append(f"issue {a.name}")
        assert step.finished == (step.outcome is not None)
        if step.finished:
            self.outcome = step.outcome
            self.check_end()

    def check_mark(self, m: str, step: Step, kind: str, before: dict[str, set[str]]) -> None:
        assert m not in self.marks, f"{m} marked twice"
        assert before.get(f"mark {m}", set()) <= set(self.log), (m, self.log)
        if m in POINTS:
            assert self.plan is Plan.COMIGRATION
            assert not self.failed, f"{m} passed after a failure"
            passed = [x for x in self.marks if x in POINTS]
            assert [*passed, m] == POINTS[: len(passed) + 1], f"{m} after {passed}"
            if m == "S2":  # both go together: no round is still running
                assert A.ITERATE not in self.in_flight
        elif m == "start":
            assert kind == "start"
        elif m in END_MARK.values():
            assert step.finished and END_MARK[step.outcome] == m  # type: ignore[index]
        else:
            how, action = MARKS[self.plan][m]
            if how == "done":
                assert self.done_now is action, (m, self.done_now)
            else:
                assert action in step.start, (m, step.start)

    def check_issue(self, a: Action, before: dict[str, set[str]]) -> None:
        assert a not in self.in_flight, f"{a.name} issued while in flight"
        if a in FORWARD:
            assert a in FORWARD_OF[self.plan]
            assert not self.failed, f"forward {a.name} issued after a failure"
            assert a is A.ITERATE or a not in self.issued, f"{a.name} issued twice"
            assert before.get(f"issue {a.name}", set()) <= set(self.log), (a, self.log)
            if a is A.ITERATE:
                assert "mark S2" not in self.log and A.STOP_U not in self.issued
            if a is A.STOP_U:
                assert A.ITERATE not in self.in_flight
            return
        assert self.failed, f"rollback {a.name} without a failure"
        assert not self.past_no_return, f"rollback {a.name} after {NO_RETURN[self.plan].name}"
        assert not set(self.in_flight) & FORWARD, f"{a.name} while {self.in_flight} run"
        assert a not in self.issued, f"{a.name} issued twice"
        assert UNDOES[a] & set(self.issued), f"{a.name} undoes nothing"
        if a is A.RESTART_R and A.STOP_U in self.issued:
            assert {"done UNPAUSE_U", "fail UNPAUSE_U"} & set(self.log), "restart before U runs"
        if a is A.UNPAUSE_U and A.RESUME_U in self.issued:  # B's U gone before U runs here
            assert {"done CANCEL_TARGET", "fail CANCEL_TARGET"} & set(self.log), \
                "U unpaused before the target's copy was cancelled"

    def check_end(self) -> None:
        assert not self.in_flight, f"finished with {self.in_flight} in flight"
        rollback = [a for a in self.issued if a in ROLLBACK]
        if not self.failed:
            assert self.outcome is Outcome.MIGRATED
            assert set(self.issued) == FORWARD_OF[self.plan]
            expected = {"start", *MARKS[self.plan]} | (
                set(POINTS) if self.plan is Plan.COMIGRATION else set())
            assert sorted(self.marks) == sorted(expected)
            assert self.marks[0] == "start" and MARKS[self.plan][self.marks[-1]] == (
                "done", A.COMMIT)
            if self.plan is Plan.COMIGRATION:
                assert [m for m in self.marks if m in POINTS] == POINTS
        elif self.past_no_return:
            assert self.outcome is Outcome.FAILED_AFTER_RESUME
            assert rollback == []
        else:
            assert self.outcome is Outcome.ROLLED_BACK
            want = {u for u, undoes in UNDOES.items() if undoes & set(self.issued)}
            assert sorted(rollback, key=str) == sorted(want, key=str)
            assert f"done {NO_RETURN[self.plan].name}" not in self.log
        if self.failed:
            assert self.marks[-1] == END_MARK[self.outcome]  # type: ignore[index]
        for stop, resume in (("U stopped", "U resumed"), ("R stopped", "R resumed"),
                             ("quiesced", "resumed"), ("U resumed", "servers stopped")):
            if resume in self.marks:
                assert self.marks.index(stop) < self.marks.index(resume)


def drive(data: st.DataObject, plan: Plan, *, fail_at: int | None, cancel_at: int | None,
          more_failures: bool) -> tuple[Model, Core]:
    """One run. Event number `fail_at` fails, number `cancel_at` is a cancel; after the
    first failure, with `more_failures`, any action (rollback included) may fail too.
    After one event the core is swapped for its checkpoint: the state is all there."""
    checkpoint_at = data.draw(st.integers(0, SHORTEST[plan]), label="checkpoint_at")
    core, model = Core(plan), Model(plan)
    model.report("start")
    model.apply(core.start(), "start")
    n = 0
    while model.outcome is None:
        assert model.in_flight, "stuck: nothing in flight and not finished"
        if n == cancel_at:
            model.report("cancel")
            model.apply(core.cancel(), "cancel")
        else:
            action = data.draw(st.sampled_from(model.in_flight), label="next")
            if n == fail_at or (more_failures and model.failed and data.draw(
                    st.booleans(), label="fails")):
                model.report("fail", action, error=f"boom {n}")
                model.apply(core.failed(action, f"boom {n}"), "fail")
            elif action is A.ITERATE:
                converged = model.rounds_done + 1 >= ROUND_CAP or data.draw(
                    st.booleans(), label="converged")
                model.report("done", action, converged=converged)
                model.apply(core.done(action, converged), "done")
            else:
                model.report("done", action)
                model.apply(core.done(action), "done")
        if n == checkpoint_at:
            again = serial.loads("migrate.sync", serial.dumps("migrate.sync", core), Core)
            assert again == core
            core = again
        n += 1
    assert core.errors == model.errors
    assert core.outcome is model.outcome and core.running == []
    with pytest.raises(SyncError):  # nothing goes after the end
        core.cancel()
    return model, core


PLANS = pytest.mark.parametrize("plan, examples", [
    (Plan.COMIGRATION, 800), (Plan.SOLO, 300), (Plan.DOMR_MOVE, 100)])


@PLANS
def test_every_interleaving_with_failures_rolls_back_or_stops_after_resume(
        plan: Plan, examples: int) -> None:
    """Every example fails or cancels before the run could end (SHORTEST), so each one
    is an interleaving with a failure: 1,100 of those between COMIGRATION and SOLO."""

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def run(data: st.DataObject) -> None:
        last = SHORTEST[plan] - 1
        how = data.draw(st.sampled_from(["fail", "cancel", "both"]), label="how")
        fail_at = data.draw(st.integers(0, last), label="fail_at") if how != "cancel" else None
        cancel_at = data.draw(st.integers(0, last), label="cancel_at") if how != "fail" else None
        model, core = drive(data, plan, fail_at=fail_at, cancel_at=cancel_at,
                            more_failures=data.draw(st.booleans(), label="more_failures"))
        assert model.failed and core.outcome is not Outcome.MIGRATED
        event(f"{plan.value}: {core.outcome.value if core.outcome else None}")

    run()


@pytest.mark.parametrize("plan", list(Plan))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_interleaving_without_failures_migrates_with_the_full_trace(
        plan: Plan, data: st.DataObject) -> None:
    model, core = drive(data, plan, fail_at=None, cancel_at=None, more_failures=False)
    assert core.outcome is Outcome.MIGRATED and not model.failed


# -- scripted runs -----------------------------------------------------------------------


def play(plan: Plan, script: str) -> Core:
    """Each line: `event -> actions started [=OUTCOME] | marks, comma separated`.
    Events: start, done ACTION, done ITERATE converged|dirty, fail ACTION why,
    undecided ACTION why (a failure that may have taken effect), cancel.
    The core is checkpointed and restored after every line."""
    core = Core(plan)
    for line in filter(str.strip, textwrap.dedent(script).splitlines()):
        event_text, _, expect = line.partition("->")
        want_start, _, want_marks = expect.partition("|")
        words = event_text.split()
        errors: tuple[str, ...] = ()
        if words[0] == "start":
            step = core.start()
        elif words[0] == "cancel":
            errors = tuple(f"{a.name}: cancelled" for a in core.running) or ("cancelled",)
            step = core.cancel()
        elif words[0] == "done" and words[1] == "ITERATE":
            step = core.done(A.ITERATE, {"converged": True, "dirty": False}[words[2]])
        elif words[0] == "done":
            step = core.done(Action[words[1]])
        else:
            assert words[0] in ("fail", "undecided"), line
            why = " ".join(words[2:])
            errors = (f"{words[1]}: {why}",)
            step = core.failed(Action[words[1]], why, undecided=words[0] == "undecided")
        tokens = want_start.split()
        outcome = next((Outcome[t[1:]] for t in tokens if t.startswith("=")), None)
        want = Step(start=tuple(Action[t] for t in tokens if not t.startswith("=")),
                    marks=tuple(m.strip() for m in want_marks.split(",") if m.strip()),
                    finished=outcome is not None, outcome=outcome, errors=errors)
        assert step == want, f"after {event_text.strip()!r}"
        core = serial.loads("migrate.sync", serial.dumps("migrate.sync", core), Core)
    return core


def test_comigration_reads_like_the_design() -> None:
    """U converges before R is ready: MM_U keeps iterating; S2 waits for the round."""
    core = play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        done CREATE_U         -> ITERATE             | U created on target
        done ITERATE dirty    -> ITERATE             |
        done PREPARE_R        -> ASSOCIATE           | R created on target
        done ITERATE converged -> ITERATE            |
        done ASSOCIATE        ->                     | S1
        done ITERATE dirty    -> STOP_R              | S2, R stopped
        done STOP_R           -> STOP_U              | S3, U stopped
        done STOP_U           -> SAVE_LINKS          | S4
        done SAVE_LINKS       -> FINAL_COPY          | S5
        done FINAL_COPY       -> LINK_U              |
        done LINK_U           -> RESTORE_R           | S6, S7
        done RESTORE_R        -> RESUME_U            |
        done RESUME_U         -> RESUME_R            | U resumed
        done RESUME_R         -> COMMIT              | R resumed
        done COMMIT           -> =MIGRATED           | source released
    """)
    assert core.rounds == 3 and core.errors == [] and core.passed == list(Point)


def test_comigration_r_ready_first_goes_on_the_first_converged_round() -> None:
    play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        done PREPARE_R        ->                     | R created on target
        done CREATE_U         -> ITERATE ASSOCIATE   | U created on target
        done ASSOCIATE        ->                     | S1
        done ITERATE dirty    -> ITERATE             |
        done ITERATE converged -> STOP_R             | S2, R stopped
    """)


def test_a_failure_in_the_middle_of_stop_r_still_restarts_r() -> None:
    play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        done PREPARE_R        ->                     | R created on target
        done CREATE_U         -> ITERATE ASSOCIATE   | U created on target
        done ITERATE converged -> ITERATE            |
        done ASSOCIATE        ->                     | S1
        done ITERATE converged -> STOP_R             | S2, R stopped
        fail STOP_R checkpoint call timed out -> CANCEL_TARGET RESTART_R |
        done RESTART_R        ->                     |
        done CANCEL_TARGET    -> =ROLLED_BACK        | rolled_back
    """)


def test_cancel_in_the_middle_of_stop_u_unpauses_u_before_r_restarts() -> None:
    core = play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        done PREPARE_R        ->                     | R created on target
        done CREATE_U         -> ITERATE ASSOCIATE   | U created on target
        done ASSOCIATE        ->                     | S1
        done ITERATE converged -> STOP_R             | S2, R stopped
        done STOP_R           -> STOP_U              | S3, U stopped
        cancel                -> CANCEL_TARGET UNPAUSE_U |
        fail CANCEL_TARGET target unreachable ->     |
        done UNPAUSE_U        -> RESTART_R           |
        done RESTART_R        -> =ROLLED_BACK        | rolled_back
    """)
    assert core.errors == ["STOP_U: cancelled", "CANCEL_TARGET: target unreachable"]


def test_a_failure_waits_for_the_actions_in_flight_before_rolling_back() -> None:
    play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        fail PREPARE_R no twin namespace ->          |
        done CREATE_U         -> CANCEL_TARGET       | U created on target
        done CANCEL_TARGET    -> =ROLLED_BACK        | rolled_back
    """)
    play(Plan.COMIGRATION, """
        start                 -> CREATE_U PREPARE_R  | start
        done PREPARE_R        ->                     | R created on target
        done CREATE_U         -> ITERATE ASSOCIATE   | U created on target
        fail ASSOCIATE refused ->                    |
        done ITERATE converged -> CANCEL_TARGET      |
        done CANCEL_TARGET    -> =ROLLED_BACK        | rolled_back
    """)


def test_after_resume_r_has_completed_nothing_is_rolled_back() -> None:
    """A failing RESUME_U rolls back, B's copy cancelled before U runs here again; so
    does a failing RESUME_R (B's R fenced: it never served, U's run on B is invisible)
    though U already ran on B; once B's R serves (RESUME_R done), or when the driver
    cannot tell whether it does (undecided), nothing is rolled back."""
    head = """
        start                 -> CREATE_U PREPARE_R  | start
        done PREPARE_R        ->                     | R created on target
        done CREATE_U         -> ITERATE ASSOCIATE   | U created on target
        done ASSOCIATE        ->                     | S1
        done ITERATE converged -> STOP_R             | S2, R stopped
        done STOP_R           -> STOP_U              | S3, U stopped
        done STOP_U           -> SAVE_LINKS          | S4
        done SAVE_LINKS       -> FINAL_COPY          | S5
        done FINAL_COPY       -> LINK_U              |
        done LINK_U           -> RESTORE_R           | S6, S7
        done RESTORE_R        -> RESUME_U            |
    """
    play(Plan.COMIGRATION, head + """
        fail RESUME_U connection reset -> CANCEL_TARGET |
        done CANCEL_TARGET    -> UNPAUSE_U           |
        done UNPAUSE_U        -> RESTART_R           |
        done RESTART_R        -> =ROLLED_BACK        | rolled_back
    """)
    play(Plan.COMIGRATION, head + """
        done RESUME_U         -> RESUME_R            | U resumed
        fail RESUME_R fenced  -> CANCEL_TARGET       |
        done CANCEL_TARGET    -> UNPAUSE_U           |
        done UNPAUSE_U        -> RESTART_R           |
        done RESTART_R        -> =ROLLED_BACK        | rolled_back
    """)
    play(Plan.COMIGRATION, head + """
        done RESUME_U         -> RESUME_R            | U resumed
        cancel                -> =FAILED_AFTER_RESUME | failed_after_resume
    """)
    core = play(Plan.COMIGRATION, head + """
        done RESUME_U         -> RESUME_R            | U resumed
        undecided RESUME_R no answer -> =FAILED_AFTER_RESUME | failed_after_resume
    """)
    assert core.doubtful == [A.RESUME_R]
    with pytest.raises(SyncError, match="only the point of no return can be undecided"):
        play(Plan.COMIGRATION, head.replace("done RESTORE_R        -> RESUME_U            |",
                                            "undecided RESTORE_R lost ->"))
    play(Plan.COMIGRATION, head + """
        done RESUME_U         -> RESUME_R            | U resumed
        done RESUME_R         -> COMMIT              | R resumed
        fail COMMIT source agent gone -> =FAILED_AFTER_RESUME | failed_after_resume
    """)


def test_domr_move_reads_like_mm_r() -> None:
    play(Plan.DOMR_MOVE, """
        start                 -> PREPARE_R           | start
        done PREPARE_R        -> STOP_R              | prepared, quiesced
        done STOP_R           -> RESTORE_R           | dumped
        done RESTORE_R        -> RESUME_R            |
        done RESUME_R         -> COMMIT              | resumed
        done COMMIT           -> =MIGRATED           | source_released
    """)
    play(Plan.DOMR_MOVE, """
        start                 -> PREPARE_R           | start
        done PREPARE_R        -> STOP_R              | prepared, quiesced
        done STOP_R           -> RESTORE_R           | dumped
        fail RESTORE_R repair mode refused -> CANCEL_TARGET RESTART_R |
        done CANCEL_TARGET    ->                     |
        done RESTART_R        -> =ROLLED_BACK        | rolled_back
    """)
    play(Plan.DOMR_MOVE, """
        start                 -> PREPARE_R           | start
        done PREPARE_R        -> STOP_R              | prepared, quiesced
        done STOP_R           -> RESTORE_R           | dumped
        done RESTORE_R        -> RESUME_R            |
        fail RESUME_R link up timed out -> CANCEL_TARGET RESTART_R |
        done RESTART_R        ->                     |
        done CANCEL_TARGET    -> =ROLLED_BACK        | rolled_back
    """)
    play(Plan.DOMR_MOVE, """
        start                 -> PREPARE_R           | start
        done PREPARE_R        -> STOP_R              | prepared, quiesced
        done STOP_R           -> RESTORE_R           | dumped
        done RESTORE_R        -> RESUME_R            |
        done RESUME_R         -> COMMIT              | resumed
        fail COMMIT source gone -> =FAILED_AFTER_RESUME | failed_after_resume
    """)


def test_solo_reads_like_the_baseline() -> None:
    play(Plan.SOLO, """
        start                 -> CREATE_U            | start
        done CREATE_U         -> ITERATE             | U created on target
        done ITERATE dirty    -> ITERATE             |
        done ITERATE converged -> STOP_U             | U stopped
        done STOP_U           -> FINAL_COPY          |
        done FINAL_COPY       -> LINK_U              | final copy
        done LINK_U           -> RESUME_U            |
        done RESUME_U         -> STOP_SERVERS START_SERVERS | U resumed, servers stopped
        done STOP_SERVERS     ->                     |
        done START_SERVERS    -> COMMIT              | servers started
        done COMMIT           -> =MIGRATED           | source released
    """)
    play(Plan.SOLO, """
        start                 -> CREATE_U            | start
        done CREATE_U         -> ITERATE             | U created on target
        done ITERATE converged -> STOP_U             | U stopped
        fail STOP_U pause refused -> CANCEL_TARGET UNPAUSE_U |
        fail UNPAUSE_U still paused ->               |
        done CANCEL_TARGET    -> =ROLLED_BACK        | rolled_back
    """)


# -- illegal events ----------------------------------------------------------------------


def started(plan: Plan = Plan.COMIGRATION) -> Core:
    core = Core(plan)
    core.start()
    return core


MISUSES = [
    pytest.param(False, lambda c: c.done(A.CREATE_U), id="done-before-start"),
    pytest.param(False, lambda c: c.cancel(), id="cancel-before-start"),
    pytest.param(True, lambda c: c.start(), id="second-start"),
    pytest.param(True, lambda c: c.done(A.STOP_U), id="done-not-in-flight"),
    pytest.param(True, lambda c: c.failed(A.ASSOCIATE, "x"), id="failed-not-in-flight"),
    pytest.param(True, lambda c: c.done(A.CANCEL_TARGET), id="rollback-not-in-flight"),
    pytest.param(True, lambda c: c.done(A.CREATE_U, True), id="result-for-create"),
]


@pytest.mark.parametrize("start, misuse", MISUSES)
def test_an_illegal_event_raises_names_the_event_and_poisons(
        start: bool, misuse: Callable[[Core], Step]) -> None:
    core = Core(Plan.COMIGRATION)
    if start:
        core.start()
    with pytest.raises(SyncError) as raised:
        misuse(core)
    err = raised.value
    assert isinstance(err, ProtocolError) and isinstance(err, KeeperError) and err.fault == "us"
    assert str(err).startswith("driver sent ") and core.poison == str(err)
    with pytest.raises(SyncError, match="poisoned"):  # even a legal event, now
        core.done(A.CREATE_U) if start else core.start()


def test_iterate_needs_its_converged_flag_and_poisoning_changes_nothing_else() -> None:
    core = started()
    core.done(A.CREATE_U)
    before = serial.dumps("migrate.sync", core)
    with pytest.raises(SyncError, match="converged: bool"):
        core.done(A.ITERATE)
    assert core.poison
    assert serial.dumps("migrate.sync", dataclasses.replace(core, poison="")) == before
    with pytest.raises(SyncError, match="poisoned"):
        core.done(A.ITERATE, True)
    # the poison travels with the checkpoint
    again = serial.loads("migrate.sync", serial.dumps("migrate.sync", core), Core)
    with pytest.raises(SyncError, match="poisoned"):
        again.cancel()


@pytest.mark.parametrize("late", [
    pytest.param(lambda c: c.start(), id="start"),
    pytest.param(lambda c: c.cancel(), id="cancel"),
    pytest.param(lambda c: c.done(A.CANCEL_TARGET), id="done"),
    pytest.param(lambda c: c.failed(A.COMMIT, "late"), id="failed"),
])
def test_nothing_goes_after_the_end(late: Callable[[Core], Step]) -> None:
    core = started(Plan.DOMR_MOVE)
    core.failed(A.PREPARE_R, "no namespace")
    assert core.done(A.CANCEL_TARGET).outcome is Outcome.ROLLED_BACK
    with pytest.raises(SyncError, match="finished"):
        late(core)
    assert core.poison


def test_cancelled_actions_are_not_reported_again() -> None:
    core = started(Plan.DOMR_MOVE)
    step = core.cancel()
    assert step.start == (A.CANCEL_TARGET,) and step.errors == ("PREPARE_R: cancelled",)
    with pytest.raises(SyncError, match="PREPARE_R is not in flight"):
        core.done(A.PREPARE_R)


# -- plain data, pure module -------------------------------------------------------------


def test_the_state_round_trips_through_the_serialiser_mid_run() -> None:
    core = started()
    core.done(A.PREPARE_R)
    core.done(A.CREATE_U)
    core.failed(A.ASSOCIATE, "refused")
    blob = serial.dumps("migrate.sync", core)
    again = serial.loads("migrate.sync", blob, Core)
    assert again == core and again.phase is sync.Phase.DRAINING
    assert again.done(A.ITERATE, False) == core.done(A.ITERATE, False)


def test_the_core_imports_no_io_and_nothing_of_keeper_but_errors() -> None:
    tree = ast.parse(Path(sync.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "enum", "dataclasses", "keeper.errors"}, names
