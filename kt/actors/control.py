"""The driver's control plane as a pure state machine: the pods of its pools, the actors
on them, and what to do when either changes.

Who calls it: `kt.actors.driver.Driver`, its thin async shell, which feeds it events --
from the scheduler (a pod launched, up, failed), the provider's watch (a pod lost), the
runtime (a DIED frame, a broken link, a CREATE acknowledged), the API (create, kill) and
a ticker (`IdleTick`, which brings the time) -- and carries out the instructions
`handle` returns. Nothing here does I/O, takes a lock or reads a clock: a test drives it
with event sequences alone (`validate` checks its invariants after each step).

Every event gets an id (`e17`) and every instruction it causes carries it, so a log line
can always say why something was done. Events that arrive late (a DIED frame for an
incarnation already replaced, a lost pod nothing lives on any more) are ignored, never
errors: the shell's inputs race, the tables do not.

    actor: PLACING -> CREATING -> ALIVE -> DEAD
           PLACING -> DEAD (placement failed, killed)     CREATING -> DEAD
           CREATING | ALIVE -> PLACING (restart: the death's cause allows it)
    pod:   LAUNCHING -> READY -> SUSPECT -> READY | LOST;  READY -> LOST | DELETED
           LAUNCHING -> FAILED;  SUSPECT -> DELETED
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from kt.core.errors import ActorDiedError, DeathCause, check_move, seconds


class ActorPhase(str, enum.Enum):
    PLACING = "placing"  # waiting for room (or for its pod to come up)
    CREATING = "creating"  # CREATE_ACTOR sent, not acknowledged yet
    ALIVE = "alive"
    DEAD = "dead"  # final


class PodPhase(str, enum.Enum):
    LAUNCHING = "launching"
    READY = "ready"
    SUSPECT = "suspect"  # its link broke: is it still there?
    LOST = "lost"  # final
    DELETED = "deleted"  # final
    FAILED = "failed"  # final: its launch failed


ACTOR_MOVES = {
    (ActorPhase.PLACING, ActorPhase.CREATING),
    (ActorPhase.PLACING, ActorPhase.DEAD),
    (ActorPhase.CREATING, ActorPhase.ALIVE),
    (ActorPhase.CREATING, ActorPhase.DEAD),
    (ActorPhase.CREATING, ActorPhase.PLACING),
    (ActorPhase.ALIVE, ActorPhase.DEAD),
    (ActorPhase.ALIVE, ActorPhase.PLACING),
}
POD_MOVES = {
    (PodPhase.LAUNCHING, PodPhase.READY),
    (PodPhase.LAUNCHING, PodPhase.FAILED),
    (PodPhase.READY, PodPhase.SUSPECT),
    (PodPhase.READY, PodPhase.LOST),
    (PodPhase.READY, PodPhase.DELETED),
    (PodPhase.SUSPECT, PodPhase.READY),
    (PodPhase.SUSPECT, PodPhase.LOST),
    (PodPhase.SUSPECT, PodPhase.DELETED),
}
_GONE = (PodPhase.LOST, PodPhase.DELETED, PodPhase.FAILED)
_LIVE = (PodPhase.LAUNCHING, PodPhase.READY, PodPhase.SUSPECT)
_ON_POD = (ActorPhase.CREATING, ActorPhase.ALIVE)


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class ActorSubmitted(Event):
    actor: str
    max_restarts: int = 0  # -1: restart for ever


@dataclass(frozen=True)
class ActorReserved(Event):
    """The scheduler holds room for the actor on `pod`; its code and image are being
    brought there (the pod is busy, not idle)."""

    actor: str
    pod: str


@dataclass(frozen=True)
class ActorPlaced(Event):
    actor: str
    pod: str


@dataclass(frozen=True)
class PlacementFailed(Event):
    actor: str
    error: BaseException


@dataclass(frozen=True)
class ActorCreated(Event):
    actor: str
    pod: str


@dataclass(frozen=True)
class ActorDied(Event):
    actor: str
    pod: str
    error: ActorDiedError


@dataclass(frozen=True)
class KillRequested(Event):
    actor: str


@dataclass(frozen=True)
class PoolOpened(Event):
    pool: str
    min_replicas: int = 0
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class PodStarted(Event):
    pod: str
    pool: str = ""


@dataclass(frozen=True)
class PodReady(Event):
    pod: str


@dataclass(frozen=True)
class PodFailed(Event):
    pod: str
    reason: str


@dataclass(frozen=True)
class LinkBroken(Event):
    pod: str


@dataclass(frozen=True)
class PodReachable(Event):
    pod: str


@dataclass(frozen=True)
class PodLost(Event):
    pod: str
    reason: str
    oom: bool = False  # the pod went over its memory limit (its processes are dead)


@dataclass(frozen=True)
class IdleTick(Event):
    """The time (monotonic seconds): pods idle for their pool's idle_timeout go."""

    now: float


@dataclass(frozen=True)
class PodDeleted(Event):
    """The scheduler forgot it (a lost pod dropped, a pool torn down): nothing may live on
    it."""

    pod: str


# -- instructions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    cause: str  # the id of the event that led here


@dataclass(frozen=True)
class Place(Instruction):
    actor: str


@dataclass(frozen=True)
class SendCreate(Instruction):
    actor: str
    pod: str


@dataclass(frozen=True)
class BindHandle(Instruction):
    actor: str
    pod: str


@dataclass(frozen=True)
class HoldHandle(Instruction):
    """Calls wait in the handle's backlog (a restart, or a pod under suspicion)."""

    actor: str


@dataclass(frozen=True)
class FailHandle(Instruction):
    actor: str
    error: BaseException


@dataclass(frozen=True)
class Release(Instruction):
    """Give the actor's slice of its pod back to the pool."""

    actor: str


@dataclass(frozen=True)
class CheckPod(Instruction):
    """Ask the provider whether the pod is still there: PodReachable or PodLost."""

    pod: str


@dataclass(frozen=True)
class DeletePod(Instruction):
    """Forget the pod and make sure the provider deletes it (lost, or idle)."""

    pod: str
    reason: str


@dataclass(frozen=True)
class FailLink(Instruction):
    """Fail the calls in flight to the pod (it is known to be gone)."""

    pod: str
    reason: str
    oom: bool = False  # they fail with ActorDiedError(oom=True), not PodLostError


# -- records -----------------------------------------------------------------------------
@dataclass
class ActorRecord:
    id: str
    max_restarts: int
    phase: ActorPhase = ActorPhase.PLACING
    pod: str | None = None
    restarts: int = 0
    death: DeathCause | None = None
    history: list[str] = field(default_factory=list)


@dataclass
class PodRecord:
    name: str
    pool: str = ""
    phase: PodPhase = PodPhase.LAUNCHING
    actors: set[str] = field(default_factory=set)
    reserved: set[str] = field(default_factory=set)
    """Actors PLACING with room held here (their code or image on its way)."""
    idle_since: float | None = None
    """The first tick that saw it READY with no actors or reservations; None while it has."""


@dataclass
class PoolRecord:
    name: str
    min_replicas: int = 0
    idle_timeout: float = 60.0


def may_restart(record: ActorRecord, cause: DeathCause) -> bool:
    """The restart policy: never after kt.kill, else while restarts are left."""
    if cause is DeathCause.KILLED:
        return False
    return record.max_restarts < 0 or record.restarts < record.max_restarts


class ControlPlane:
    """The tables, and `handle(event) -> instructions`."""

    def __init__(self) -> None:
        self.actors: dict[str, ActorRecord] = {}
        self.pods: dict[str, PodRecord] = {}
        self.pools: dict[str, PoolRecord] = {}
        self._ids = itertools.count(1)
        self._cause = ""
        self._out: list[Instruction] = []

    def handle(self, event: Event) -> list[Instruction]:
        self._cause = f"e{next(self._ids)}"
        self._out = []
        handler = getattr(self, f"_on_{type(event).__name__}")
        handler(event)
        return self._out

    @property
    def last_cause(self) -> str:
        return self._cause

    # -- moves -----------------------------------------------------------------------------
    def _emit(self, cls: type[Instruction], **fields: Any) -> None:
        self._out.append(cls(cause=self._cause, **fields))

    def _move_actor(self, rec: ActorRecord, to: ActorPhase, why: str) -> None:
        check_move(ACTOR_MOVES, f"actor {rec.id}", rec.phase, to)
        rec.history.append(f"{self._cause} {rec.phase.value}->{to.value}: {why}")
        rec.phase = to

    def _move_pod(self, pod: PodRecord, to: PodPhase) -> None:
        check_move(POD_MOVES, f"pod {pod.name}", pod.phase, to)
        pod.phase = to

    def _leave_pod(self, rec: ActorRecord) -> None:
        if rec.pod is not None and rec.pod in self.pods:
            self.pods[rec.pod].actors.discard(rec.id)
        rec.pod = None

    def _died(self, rec: ActorRecord, error: ActorDiedError) -> None:
        """An actor on a pod is gone: restart it, or it is dead for good."""
        self._emit(Release, actor=rec.id)
        self._leave_pod(rec)
        if may_restart(rec, error.cause):
            rec.restarts += 1
            self._move_actor(rec, ActorPhase.PLACING, f"restart {rec.restarts}: {error}")
            self._emit(HoldHandle, actor=rec.id)
            self._emit(Place, actor=rec.id)
            return
        rec.death = error.cause
        self._move_actor(rec, ActorPhase.DEAD, str(error))
        self._emit(FailHandle, actor=rec.id, error=error)

    def _pod_gone(self, pod: PodRecord, to: PodPhase, reason: str, oom: bool = False) -> None:
        self._move_pod(pod, to)
        pod.reserved.clear()  # their placements fail on the pod and are placed again
        if to is PodPhase.LOST:
            self._emit(FailLink, pod=pod.name, reason=reason, oom=oom)
            self._emit(DeletePod, pod=pod.name, reason=f"lost: {reason}")  # make sure of it
        why = f"its pod was lost ({reason})" if to is PodPhase.LOST else reason
        cause = DeathCause.OOM if oom else DeathCause.POD_LOST
        for actor in sorted(pod.actors):
            rec = self.actors[actor]
            error = ActorDiedError(actor, pod.name, oom=oom, reason=why, cause=cause)
            self._died(rec, error)

    # -- actors ----------------------------------------------------------------------------
    def _on_ActorSubmitted(self, e: ActorSubmitted) -> None:
        if e.actor in self.actors:
            return
        self.actors[e.actor] = ActorRecord(e.actor, e.max_restarts)
        self._emit(Place, actor=e.actor)

    def _unreserve(self, actor: str) -> None:
        for pod in self.pods.values():
            pod.reserved.discard(actor)

    def _on_ActorReserved(self, e: ActorReserved) -> None:
        rec = self.actors.get(e.actor)
        pod = self.pods.get(e.pod)
        if rec is not None and rec.phase is ActorPhase.PLACING and pod is not None:
            if pod.phase is PodPhase.READY:
                pod.reserved.add(e.actor)
                pod.idle_since = None

    def _on_ActorPlaced(self, e: ActorPlaced) -> None:
        self._unreserve(e.actor)
        rec = self.actors.get(e.actor)
        pod = self.pods.get(e.pod)
        if rec is None or rec.phase is not ActorPhase.PLACING:
            self._emit(Release, actor=e.actor)  # killed while it was being placed
            return
        if pod is None or pod.phase is not PodPhase.READY:
            self._emit(Release, actor=e.actor)  # its pod went away meanwhile: again
            self._emit(Place, actor=e.actor)
            return
        rec.pod = e.pod
        pod.actors.add(e.actor)
        pod.idle_since = None
        self._move_actor(rec, ActorPhase.CREATING, f"placed on {e.pod}")
        self._emit(SendCreate, actor=e.actor, pod=e.pod)
        self._emit(BindHandle, actor=e.actor, pod=e.pod)  # calls queue behind CREATE

    def _on_PlacementFailed(self, e: PlacementFailed) -> None:
        self._unreserve(e.actor)
        rec = self.actors.get(e.actor)
        if rec is None or rec.phase is not ActorPhase.PLACING:
            return
        rec.death = DeathCause.UNKNOWN
        self._move_actor(rec, ActorPhase.DEAD, f"placement failed: {e.error}")
        self._emit(FailHandle, actor=e.actor, error=e.error)

    def _on_ActorCreated(self, e: ActorCreated) -> None:
        rec = self.actors.get(e.actor)
        if rec is not None and rec.phase is ActorPhase.CREATING and rec.pod == e.pod:
            self._move_actor(rec, ActorPhase.ALIVE, f"created on {e.pod}")

    def _on_ActorDied(self, e: ActorDied) -> None:
        rec = self.actors.get(e.actor)
        if rec is None or rec.phase not in _ON_POD or rec.pod != e.pod:
            return  # dead already (killed), or an older incarnation's death
        self._died(rec, e.error)

    def _on_KillRequested(self, e: KillRequested) -> None:
        self._unreserve(e.actor)
        rec = self.actors.get(e.actor)
        if rec is None or rec.phase is ActorPhase.DEAD:
            return
        if rec.pod is not None:
            self._emit(Release, actor=rec.id)
        self._leave_pod(rec)
        rec.death = DeathCause.KILLED
        self._move_actor(rec, ActorPhase.DEAD, "kt.kill")

    # -- pods ------------------------------------------------------------------------------
    def _on_PoolOpened(self, e: PoolOpened) -> None:
        self.pools[e.pool] = PoolRecord(e.pool, e.min_replicas, e.idle_timeout)

    def _on_PodStarted(self, e: PodStarted) -> None:
        self.pods.setdefault(e.pod, PodRecord(e.pod, e.pool))

    def _on_PodReady(self, e: PodReady) -> None:
        pod = self.pods.setdefault(e.pod, PodRecord(e.pod))
        if pod.phase is PodPhase.LAUNCHING:
            self._move_pod(pod, PodPhase.READY)

    def _on_PodFailed(self, e: PodFailed) -> None:
        pod = self.pods.get(e.pod)
        if pod is not None and pod.phase is PodPhase.LAUNCHING:
            self._move_pod(pod, PodPhase.FAILED)

    def _on_LinkBroken(self, e: LinkBroken) -> None:
        pod = self.pods.get(e.pod)
        if pod is None or pod.phase is not PodPhase.READY:
            return
        if not pod.actors:
            return  # nothing to hold; the watch or the next call will tell
        self._move_pod(pod, PodPhase.SUSPECT)
        for actor in sorted(pod.actors):
            self._emit(HoldHandle, actor=actor)
        self._emit(CheckPod, pod=e.pod)

    def _on_PodReachable(self, e: PodReachable) -> None:
        pod = self.pods.get(e.pod)
        if pod is None or pod.phase is not PodPhase.SUSPECT:
            return
        self._move_pod(pod, PodPhase.READY)
        for actor in sorted(pod.actors):
            self._emit(BindHandle, actor=actor, pod=e.pod)

    def _on_PodLost(self, e: PodLost) -> None:
        pod = self.pods.get(e.pod)
        if pod is None or pod.phase not in (PodPhase.READY, PodPhase.SUSPECT):
            return
        self._pod_gone(pod, PodPhase.LOST, e.reason, e.oom)

    def _on_PodDeleted(self, e: PodDeleted) -> None:
        pod = self.pods.get(e.pod)
        if pod is None or pod.phase not in (PodPhase.READY, PodPhase.SUSPECT):
            return
        self._pod_gone(pod, PodPhase.DELETED, "kt deleted its pod")

    def _on_IdleTick(self, e: IdleTick) -> None:
        """Delete the pods idle for their pool's idle_timeout, longest idle first, while
        the pool keeps min_replicas pods (launching ones count)."""
        for pool in self.pools.values():
            pods = [p for p in self.pods.values() if p.pool == pool.name and p.phase in _LIVE]
            idle: list[PodRecord] = []
            for pod in pods:
                if pod.phase is not PodPhase.READY or pod.actors or pod.reserved:
                    pod.idle_since = None
                elif pod.idle_since is None:
                    pod.idle_since = e.now
                elif e.now - pod.idle_since >= pool.idle_timeout:
                    idle.append(pod)
            idle.sort(key=lambda p: (p.idle_since, p.name))
            for pod in idle[: max(0, len(pods) - pool.min_replicas)]:
                self._move_pod(pod, PodPhase.DELETED)
                self._emit(DeletePod, pod=pod.name, reason=f"idle for {seconds(pool.idle_timeout)}")

    # -- invariants --------------------------------------------------------------------------
    def validate(self) -> None:
        """Assert the tables' invariants (tests call it after every step)."""
        for rec in self.actors.values():
            if rec.phase in _ON_POD:
                assert rec.pod is not None, f"{rec.id} is {rec.phase.value} on no pod"
                pod = self.pods.get(rec.pod)
                assert pod is not None, f"{rec.id} is on unknown pod {rec.pod}"
                assert pod.phase in (PodPhase.READY, PodPhase.SUSPECT), (
                    f"{rec.id} is {rec.phase.value} on {pod.phase.value} pod {pod.name}"
                )
                assert rec.id in pod.actors, f"{pod.name} does not list {rec.id}"
            else:
                assert rec.pod is None, f"{rec.id} is {rec.phase.value} but holds {rec.pod}"
            assert (rec.phase is ActorPhase.DEAD) == (rec.death is not None), rec
            assert rec.restarts >= 0
            assert rec.max_restarts < 0 or rec.restarts <= rec.max_restarts, rec
        for pod in self.pods.values():
            if pod.phase in _GONE or pod.phase is PodPhase.LAUNCHING:
                assert not pod.actors, f"{pod.phase.value} pod {pod.name} holds {pod.actors}"
            if pod.actors or pod.reserved:
                assert pod.idle_since is None, f"{pod.name} is busy but counts as idle"
            for actor in pod.reserved:
                assert self.actors[actor].phase is ActorPhase.PLACING, (actor, pod.name)
                assert pod.phase in (PodPhase.READY, PodPhase.SUSPECT), (pod.name, pod.phase)
            for actor in pod.actors:
                assert self.actors[actor].pod == pod.name, (actor, pod.name)
