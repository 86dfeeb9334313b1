"""The group's state table and restart policy, as plain objects (no processes).

Behaviours covered:
- only the moves in TRANSITIONS are legal; anything else raises InvalidTransition, and
  every state can be stopped;
- the root cause of a failed call is its first death, else its first error;
- a raised error with every rank finished resumes; a death, or ranks still running
  after the grace, restarts while restarts are left and fails after;
- kt.distributed imports without torch (torch is an optional extra).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kt.core.errors import InvalidTransition
from kt.distributed.state import (
    TRANSITIONS,
    Decision,
    GroupState,
    RankFailure,
    check_transition,
    decide,
    root_cause,
)


def test_transition_table() -> None:
    check_transition("g", GroupState.STARTING, GroupState.RUNNING)
    check_transition("g", GroupState.RECOVERING, GroupState.STARTING)
    for state in GroupState:
        if state is not GroupState.STOPPED:
            assert (state, GroupState.STOPPED) in TRANSITIONS
    with pytest.raises(InvalidTransition, match="no transition from failed to running"):
        check_transition("g", GroupState.FAILED, GroupState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition("g", GroupState.STOPPED, GroupState.STARTING)


def test_root_cause_prefers_the_first_death() -> None:
    err1 = RankFailure(rank=0, died=False, arrival=0)
    death3 = RankFailure(rank=3, died=True, arrival=1)
    death2 = RankFailure(rank=2, died=True, arrival=2)
    assert root_cause([err1, death3, death2]) is death3
    assert root_cause([err1, RankFailure(1, False, 1)]) is err1
    with pytest.raises(ValueError):
        root_cause([])


def test_decide() -> None:
    raised, died = RankFailure(1, False, 0), RankFailure(1, True, 0)
    assert decide(cause=raised, all_finished=True, restarts_left=0) is Decision.RESUME
    assert decide(cause=raised, all_finished=False, restarts_left=1) is Decision.RESTART
    assert decide(cause=raised, all_finished=False, restarts_left=0) is Decision.FAIL
    assert decide(cause=died, all_finished=True, restarts_left=1) is Decision.RESTART
    assert decide(cause=died, all_finished=True, restarts_left=0) is Decision.FAIL


def test_kt_distributed_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import kt, kt.distributed\n"
        "assert kt.distributed.collective_group and kt.distributed.SpmdGroup\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
