"""Hostile input at each entry point of a running lab (root): the RFB server, the SSH
server, the target's checkpoint decoder and the APIs. Each case (keeper.lab.faults.
hostile, the same drills bench/faults.py runs): the hostile side gets a clear error,
an honest session typing meanwhile loses nothing, the guest is served as before."""

from __future__ import annotations

import pytest

from keeper.lab.faults import hostile
from keeper.lab.topology import LabSpec

pytestmark = pytest.mark.root


@pytest.mark.parametrize("case", list(hostile.HOSTILE))
async def test_hostile_input_harms_nothing_else(lab: LabSpec, case: str) -> None:
    row = await hostile.run_case(lab, case)
    print(row.doc())
    assert row.lost == 0, row.doc()
    assert row.recovered, row.doc()
