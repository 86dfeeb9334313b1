"""The driver's view of one actor: what was asked for, where it lives, and what to do
when it dies.

An `ActorSpec` is to an `Actor` as a class is to an object: the spec is frozen (the
pickled class and init arguments, the request, the restart budget) and is used again
for every restart; the `Actor` is this incarnation (its pod slot, its state).

`decide(actor, cause)` is the restart policy, a pure function: it returns what to do
and never does it. The driver (`kt.actors.driver`) carries it out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kt.actors.scheduler import PodSlot, Pool, Request
from kt.core.compute import Compute
from kt.core.errors import ActorDiedError, InvalidTransition
from kt.core.serialization import Parts

if TYPE_CHECKING:
    from kt.actors.handle import ActorHandle


class ActorState(str, enum.Enum):
    """PLACING -> ALIVE -> (RESTARTING -> PLACING) | DEAD; PLACING -> DEAD.

    DEAD is final: killed, out of restarts, or never placeable.
    """

    PLACING = "placing"
    ALIVE = "alive"
    RESTARTING = "restarting"
    DEAD = "dead"


_MOVES = {
    (ActorState.PLACING, ActorState.ALIVE),
    (ActorState.PLACING, ActorState.DEAD),
    (ActorState.ALIVE, ActorState.RESTARTING),
    (ActorState.ALIVE, ActorState.DEAD),
    (ActorState.RESTARTING, ActorState.PLACING),
    (ActorState.RESTARTING, ActorState.DEAD),
}


@dataclass(frozen=True)
class ActorSpec:
    actor_id: str
    cls_name: str
    header: dict[str, Any]
    parts: Parts
    compute: Compute
    request: Request
    max_restarts: int
    placement_timeout: float
    detached: bool


@dataclass
class Actor:
    spec: ActorSpec
    handle: ActorHandle
    state: ActorState = ActorState.PLACING
    restarts: int = 0
    pool: Pool | None = None
    slot: PodSlot | None = None
    history: list[str] = field(default_factory=list)

    def move(self, to: ActorState, cause: str) -> None:
        if (self.state, to) not in _MOVES:
            raise InvalidTransition(f"actor {self.spec.actor_id}", self.state.value, to.value)
        self.history.append(f"{self.state.value}->{to.value}: {cause}")
        self.state = to


class Decision(str, enum.Enum):
    RESTART = "restart"
    GIVE_UP = "give_up"
    IGNORE = "ignore"


def decide(actor: Actor, cause: ActorDiedError) -> Decision:
    """What to do when `actor` died of `cause`."""
    if actor.state is not ActorState.ALIVE:
        return Decision.IGNORE  # already dead (killed) or already being restarted
    if "kt.kill" in cause.reason:
        return Decision.GIVE_UP
    if actor.restarts < actor.spec.max_restarts:
        return Decision.RESTART
    return Decision.GIVE_UP
