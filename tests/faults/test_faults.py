"""``pytest -m faults``: each fault case as a test (slow: real CLI runs; not in ``make test``)."""

import pytest

from tests.faults.__main__ import all_cases

CASES = all_cases()


@pytest.mark.faults
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_case_holds(case, tmp_path):
    outcome = case.run(tmp_path)
    assert outcome.ok, outcome.detail
