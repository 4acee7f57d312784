"""The window after Domain U resumed on the target (docs/design.md, "The window"):
each process killed or failed at each point; afterwards exactly one Domain R serves
the guest, on the host the design says, and the console session typing through it
went on with nothing lost (root, whole lab: real namespaces, agents, TCP repair)."""

from __future__ import annotations

import pytest

from keeper.lab.faults import window
from keeper.lab.topology import LabSpec

pytestmark = pytest.mark.root


@pytest.mark.parametrize("case", window.WINDOW, ids=[c.name for c in window.WINDOW])
async def test_one_domain_r_serves_and_nothing_is_lost(lab: LabSpec,
                                                       case: window.Case) -> None:
    row = await window.run_case(lab, case)
    where = "a" if case.ends_on == "source" else "b"
    assert row.extra["serving"] == [where], row.doc()
    assert (row.lost, row.extra["duplicated"], row.extra["reordered"]) == (0, 0, 0), row.doc()
    assert row.extra["errors"] == [] and row.extra["sent"] > 20, row.doc()
    assert row.recovered, row.doc()
    if case.ends_on == "source":
        assert row.extra["migration"] == "failed" and "stays on a" in row.extra["error"]
    elif case.on == "target" and case.action == "fail":  # the answer was lost, yet the
        # source learnt that b serves
        assert row.extra["migration"] == "migrated" and row.extra["settled"] == "resumed"
        if case.point == "resume_midway":  # forward: the services after the console's
            assert row.extra["viewer"] == "reset", row.doc()  # end, with an RST
    elif case.action == "mute":  # the source gave up undecided; b took over, released it
        assert row.extra["migration"] == "failed" and "after the guest resumed" in \
            row.extra["error"]


async def test_target_host_dies_after_its_domain_r_served_the_guest_goes_on_at_the_source(
        lab: LabSpec) -> None:
    """The one case the design cannot make lossless (docs/design.md, the window): b's
    agent dies in the instant after b's Domain R left repair mode, before settling.
    b's R was not confirmed, so it died with its agent (its sessions reset); the
    source rolls back, and the guest goes on at a from its final copy, with exactly
    one Domain R, which serves a new session."""
    case = window.Case("window/target-agent-crash/resumed", "target", "resumed", "crash",
                       "source")
    row = await window.run_case(lab, case)
    assert row.extra["serving"] == ["a"], row.doc()
    assert row.extra["migration"] == "failed" and "stays on a" in row.extra["error"]
    assert row.extra["duplicated"] == 0, row.doc()
    fresh = await window.fresh_session(lab)
    assert fresh["lost"] == 0 and fresh["sent"] > 20 and fresh["errors"] == [], fresh
