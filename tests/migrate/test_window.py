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
    elif case.on == "target":  # the answer was lost, yet the source learnt B serves
        assert row.extra["migration"] == "migrated" and row.extra["settled"] == "resumed"
