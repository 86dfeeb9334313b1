"""The driver's control plane, driven by event sequences only (no processes, no I/O).

Behaviours covered:
- an actor's life: submitted, placed, created, died and restarted while its budget
  lasts, then dead with its handle failed; every instruction carries its event's id;
- kt.kill is final whatever restarts are left, and the policy decides on the death's
  cause, never on its text;
- a broken link holds the pod's handles and asks about the pod: reachable rebinds them,
  lost fails its calls, deletes it and lets each actor restart or die;
- late events (an old incarnation's death, a placement after a kill) change nothing;
- idle pods go on the tick after their pool's idle_timeout, longest idle first, never
  below min_replicas (launching pods count); a pod that had an actor starts again;
- after any random sequence of events (hypothesis), `validate()` holds.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt.actors.control import (
    ActorCreated,
    ActorDied,
    ActorPhase,
    ActorPlaced,
    ActorReserved,
    ActorSubmitted,
    BindHandle,
    CheckPod,
    ControlPlane,
    DeletePod,
    Event,
    FailHandle,
    FailLink,
    HoldHandle,
    IdleTick,
    KillRequested,
    LinkBroken,
    Place,
    PlacementFailed,
    PodDeleted,
    PodFailed,
    PodLost,
    PodPhase,
    PodReachable,
    PodReady,
    PodStarted,
    PoolOpened,
    Release,
    SendCreate,
)
from kt.core.errors import ActorDiedError, DeathCause, InvalidTransition, PlacementError


def _died(actor: str, pod: str, cause: DeathCause, reason: str = "") -> ActorDied:
    return ActorDied(actor, pod, ActorDiedError(actor, pod, reason=reason, cause=cause))


def _kinds(out: list) -> list[type]:
    return [type(i) for i in out]


def _up(plane: ControlPlane, pod: str) -> None:
    plane.handle(PodStarted(pod))
    plane.handle(PodReady(pod))


def test_an_actor_restarts_while_its_budget_lasts_then_dies() -> None:
    plane = ControlPlane()
    assert _kinds(plane.handle(ActorSubmitted("a", max_restarts=1))) == [Place]
    _up(plane, "p1")
    out = plane.handle(ActorPlaced("a", "p1"))
    assert out == [SendCreate(out[0].cause, "a", "p1"), BindHandle(out[0].cause, "a", "p1")]
    assert out[0].cause == plane.last_cause  # the event's id travels with what it caused
    assert plane.actors["a"].phase is ActorPhase.CREATING  # not ALIVE before the ack
    plane.handle(ActorCreated("a", "p1"))
    assert plane.actors["a"].phase is ActorPhase.ALIVE
    out = plane.handle(_died("a", "p1", DeathCause.EXITED))
    assert _kinds(out) == [Release, HoldHandle, Place]
    assert plane.actors["a"].restarts == 1 and plane.actors["a"].pod is None
    _up(plane, "p2")
    plane.handle(ActorPlaced("a", "p2"))
    plane.handle(ActorCreated("a", "p2"))
    assert _kinds(plane.handle(_died("a", "p1", DeathCause.EXITED))) == []  # the old one's
    out = plane.handle(_died("a", "p2", DeathCause.SIGNALED))
    assert _kinds(out) == [Release, FailHandle]
    assert plane.actors["a"].phase is ActorPhase.DEAD
    assert plane.actors["a"].death is DeathCause.SIGNALED
    plane.validate()


def test_kill_is_final_and_the_policy_reads_the_cause_not_the_text() -> None:
    plane = ControlPlane()
    _up(plane, "p")
    for name in ("killed", "texty"):
        plane.handle(ActorSubmitted(name, max_restarts=5))
        plane.handle(ActorPlaced(name, "p"))
        plane.handle(ActorCreated(name, "p"))
    assert _kinds(plane.handle(KillRequested("killed"))) == [Release]
    assert plane.actors["killed"].death is DeathCause.KILLED
    assert plane.handle(_died("killed", "p", DeathCause.KILLED)) == []  # the frame after
    out = plane.handle(_died("texty", "p", DeathCause.EXITED, reason="it said kt.kill"))
    assert Place in _kinds(out), "a death whose text mentions kt.kill was not restarted"
    plane.handle(ActorPlaced("texty", "p"))
    out = plane.handle(_died("texty", "p", DeathCause.KILLED))
    assert _kinds(out) == [Release, FailHandle]  # KILLED, with 4 restarts left
    plane.validate()


def test_a_broken_link_holds_then_rebinds_or_loses_the_pod() -> None:
    plane = ControlPlane()
    _up(plane, "p")
    for name, budget in (("keep", 1), ("once", 0)):
        plane.handle(ActorSubmitted(name, max_restarts=budget))
        plane.handle(ActorPlaced(name, "p"))
        plane.handle(ActorCreated(name, "p"))
    out = plane.handle(LinkBroken("p"))
    assert _kinds(out) == [HoldHandle, HoldHandle, CheckPod]
    assert plane.pods["p"].phase is PodPhase.SUSPECT
    out = plane.handle(PodReachable("p"))
    assert sorted(i.actor for i in out if isinstance(i, BindHandle)) == ["keep", "once"]
    plane.handle(LinkBroken("p"))
    out = plane.handle(PodLost("p", "the provider has no such pod"))
    kinds = _kinds(out)
    assert kinds[:2] == [FailLink, DeletePod]
    assert plane.actors["keep"].phase is ActorPhase.PLACING  # restarts elsewhere
    assert plane.actors["once"].phase is ActorPhase.DEAD
    assert plane.actors["once"].death is DeathCause.POD_LOST
    failed = next(i for i in out if isinstance(i, FailHandle))
    assert isinstance(failed.error, ActorDiedError) and failed.error.cause is DeathCause.POD_LOST
    assert plane.handle(PodLost("p", "again")) == []
    plane.validate()


def test_late_events_change_nothing() -> None:
    plane = ControlPlane()
    plane.handle(ActorSubmitted("a"))
    plane.handle(KillRequested("a"))
    _up(plane, "p")
    assert _kinds(plane.handle(ActorPlaced("a", "p"))) == [Release]  # killed while placed
    assert plane.pods["p"].actors == set()
    plane.handle(ActorSubmitted("b"))
    plane.handle(PodLost("p", "gone"))
    assert _kinds(plane.handle(ActorPlaced("b", "p"))) == [Release, Place]  # place again
    plane.handle(PlacementFailed("b", PlacementError("no room")))
    assert plane.actors["b"].phase is ActorPhase.DEAD
    assert plane.handle(PlacementFailed("b", PlacementError("twice"))) == []
    plane.validate()


def test_idle_pods_go_after_the_timeout_longest_idle_first_down_to_min_replicas() -> None:
    plane = ControlPlane()
    plane.handle(PoolOpened("pool", min_replicas=1, idle_timeout=10.0))
    for name in ("old", "new", "busy"):
        plane.handle(PodStarted(name, "pool"))
    plane.handle(PodReady("old"))
    plane.handle(PodReady("busy"))
    plane.handle(ActorSubmitted("a"))
    plane.handle(ActorPlaced("a", "busy"))
    assert plane.handle(IdleTick(100.0)) == []  # "old" idle from now on
    plane.handle(PodReady("new"))
    assert plane.handle(IdleTick(105.0)) == []  # "new" idle from now on
    assert plane.handle(IdleTick(109.9)) == []
    out = plane.handle(IdleTick(110.0))
    assert [(type(i), i.pod) for i in out] == [(DeletePod, "old")]
    assert out[0].reason == "idle for 10 s" and plane.pods["old"].phase is PodPhase.DELETED
    plane.handle(KillRequested("a"))  # "busy" is idle from the next tick
    plane.handle(IdleTick(111.0))
    out = plane.handle(IdleTick(130.0))  # both idle long enough; one must stay
    assert [i.pod for i in out] == ["new"]
    assert plane.pods["busy"].phase is PodPhase.READY
    plane.validate()


def test_a_pod_whose_actor_is_still_being_synced_is_not_idle() -> None:
    plane = ControlPlane()
    plane.handle(PoolOpened("pool", min_replicas=0, idle_timeout=10.0))
    plane.handle(PodStarted("p", "pool"))
    plane.handle(PodReady("p"))
    plane.handle(ActorSubmitted("a"))
    plane.handle(ActorReserved("a", "p"))  # its code and image on their way, for minutes
    assert plane.handle(IdleTick(0.0)) == []
    assert plane.handle(IdleTick(100.0)) == []
    plane.handle(ActorPlaced("a", "p"))
    plane.handle(KillRequested("a"))
    plane.handle(IdleTick(200.0))
    assert [i.pod for i in plane.handle(IdleTick(210.0))] == ["p"]
    plane.validate()


def test_a_pod_that_had_an_actor_is_idle_again_from_the_next_tick() -> None:
    plane = ControlPlane()
    plane.handle(PoolOpened("pool", min_replicas=0, idle_timeout=10.0))
    plane.handle(PodStarted("p", "pool"))
    plane.handle(PodReady("p"))
    plane.handle(IdleTick(0.0))
    plane.handle(ActorSubmitted("a"))
    plane.handle(ActorPlaced("a", "p"))  # busy between two ticks
    plane.handle(KillRequested("a"))
    assert plane.handle(IdleTick(10.0)) == []  # its idle clock started again here
    assert [i.pod for i in plane.handle(IdleTick(20.0))] == ["p"]
    plane.validate()


def test_the_tables_refuse_moves_they_do_not_list() -> None:
    plane = ControlPlane()
    plane.handle(ActorSubmitted("a"))
    with pytest.raises(InvalidTransition, match="placing to alive"):
        plane._move_actor(plane.actors["a"], ActorPhase.ALIVE, "skipping CREATING")


ACTORS = ["a0", "a1", "a2"]
PODS = ["p0", "p1"]
actor = st.sampled_from(ACTORS)
pod = st.sampled_from(PODS)
cause = st.sampled_from(list(DeathCause))
events = st.one_of(
    st.builds(ActorSubmitted, actor, st.sampled_from([0, 1, 2, -1])),
    st.builds(ActorPlaced, actor, pod),
    st.builds(ActorReserved, actor, pod),
    st.builds(PlacementFailed, actor, st.just(PlacementError("no room"))),
    st.builds(ActorCreated, actor, pod),
    st.builds(lambda a, p, c: _died(a, p, c), actor, pod, cause),
    st.builds(KillRequested, actor),
    st.builds(PodStarted, pod, st.just("pool")),
    st.builds(IdleTick, st.floats(0, 1000)),
    st.builds(PodReady, pod),
    st.builds(PodFailed, pod, st.just("image pull failed")),
    st.builds(LinkBroken, pod),
    st.builds(PodReachable, pod),
    st.builds(PodLost, pod, st.just("gone")),
    st.builds(PodDeleted, pod),
)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 2, -1]), min_size=len(ACTORS), max_size=len(ACTORS)),
    st.lists(events, min_size=5, max_size=80),
)
def test_any_sequence_of_events_keeps_the_invariants(
    budgets: list[int], sequence: list[Event]
) -> None:
    plane = ControlPlane()
    start: list[Event] = [PoolOpened("pool", min_replicas=1, idle_timeout=100.0)]
    start += [PodStarted(p, "pool") for p in PODS]
    start += [PodReady(p) for p in PODS]  # so that random steps go somewhere
    start += [ActorSubmitted(a, b) for a, b in zip(ACTORS, budgets, strict=True)]
    live = (PodPhase.LAUNCHING, PodPhase.READY, PodPhase.SUSPECT)
    for event in start + sequence:
        before = sum(p.phase in live for p in plane.pods.values())
        out = plane.handle(event)
        assert all(i.cause == plane.last_cause for i in out)
        plane.validate()
        if isinstance(event, IdleTick):  # never below min_replicas for being idle
            after = sum(p.phase in live for p in plane.pods.values())
            assert after >= min(before, 1), (before, after)
