"""The SPMD group's states and its restart policy: pure decisions, no I/O.

Who calls it: `kt.distributed.group.SpmdGroup`, whose agent thread carries the decisions
out (kills ranks, starts a new attempt). Kept apart so that the policy is tested as a
plain object (`tests/distributed/test_state.py`), like dask's worker state machine.

Theory of operation (torchrun semantics, REFERENCES.md): a rank that dies takes the whole
group down, and the group comes back as a new *attempt* (new processes, new store, new
MASTER_PORT, TORCHELASTIC_RESTART_COUNT + 1) while `max_restarts` allows. kt adds one
refinement because its rank processes outlive a call: a rank whose method merely *raised*
is still a healthy process, so when every other rank of that call also finishes within
the grace period, nothing is stuck and the group carries on as it is. Only when some
rank is still running after the grace (blocked in a collective with the failed rank) is
the group stopped and restarted, as torchrun would.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kt.core.errors import check_move


class GroupState(str, enum.Enum):
    """STARTING -> RUNNING -> RECOVERING -> RUNNING | STARTING | FAILED; any -> STOPPED.

    Also STARTING -> FAILED (an attempt could not be placed) and RUNNING -> FAILED (its
    agent store failed).

    STARTING: an attempt's agents and ranks are being placed; calls wait.
    RUNNING: calls go to the ranks.
    RECOVERING: a rank failed; the policy is waiting for the rest of that call; calls wait.
    FAILED: no restarts left (or an attempt could not be placed); calls raise at once.
    STOPPED: torn down; calls raise at once.
    """

    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    FAILED = "failed"
    STOPPED = "stopped"


_S = GroupState
TRANSITIONS: frozenset[tuple[GroupState, GroupState]] = frozenset(
    {
        (_S.STARTING, _S.RUNNING),
        (_S.STARTING, _S.FAILED),
        (_S.RUNNING, _S.RECOVERING),
        (_S.RUNNING, _S.FAILED),
        (_S.RECOVERING, _S.RUNNING),
        (_S.RECOVERING, _S.STARTING),
        (_S.RECOVERING, _S.FAILED),
        *((s, _S.STOPPED) for s in GroupState if s is not _S.STOPPED),
    }
)


def check_transition(subject: str, start: GroupState, finish: GroupState) -> None:
    """Raises InvalidTransition when the table has no move from `start` to `finish`."""
    check_move(TRANSITIONS, subject, start, finish)


class Decision(str, enum.Enum):
    """What the group does after a failed call."""

    RESUME = "resume"  # every rank finished: keep the processes, raise the error only
    RESTART = "restart"  # stop every rank, start attempt N+1
    FAIL = "fail"  # stop every rank; no restarts left


@dataclass(frozen=True)
class RankFailure:
    """One rank's failed call: `died` when its process is gone (ActorDiedError)."""

    rank: int
    died: bool
    arrival: int  # order of arrival within the call: the root cause is chosen by it


def root_cause(failures: list[RankFailure]) -> RankFailure:
    """The failure to report: the first death, else the first error to arrive.

    A dead rank makes its peers' collectives fail too (gloo raises on the closed socket),
    and those errors can race the death's report; the death is the cause, not them.
    """
    if not failures:
        raise ValueError("root_cause needs at least one failure")
    deaths = [f for f in failures if f.died]
    return min(deaths or failures, key=lambda f: f.arrival)


def decide(*, cause: RankFailure, all_finished: bool, restarts_left: int) -> Decision:
    """Resume, restart or fail, given the root cause and whether every rank finished."""
    if not cause.died and all_finished:
        return Decision.RESUME
    return Decision.RESTART if restarts_left > 0 else Decision.FAIL
