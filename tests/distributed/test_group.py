"""An SPMD group's calls: rank order, rank subsets, long-lived ranks, errors naming the rank.

Behaviours covered:
- a call runs on every rank and returns results ordered by global rank;
  `group.rank(i)` returns one result, `group.ranks([...])` a list in the order asked;
- the second call of a 2 x 2 group reuses everything: same processes, module state kept,
  the default process group still initialized (no new rendezvous), no module imported
  again, and a collective still works (its timing is bench/spmd_side.py's job);
- a method that raises on one rank raises in the caller naming that rank; when every
  other rank finished, the group carries on with the same processes;
- a kt.cls group calls methods on every rank, and refuses generator methods at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

import kt
from kt.distributed import SpmdGroup

pytest.importorskip("torch")

CALLS = 0  # module state: lives as long as the rank process does


def probe(fail_on: int = -1, collective: bool = True) -> dict[str, Any]:
    """One step of an SPMD program; `collective=False` for calls on a subset of ranks."""
    import torch
    import torch.distributed as dist

    global CALLS
    CALLS += 1
    modules_before = len(sys.modules)
    was_initialized = dist.is_initialized()
    total = torch.tensor([float(os.environ["RANK"])])
    if collective:
        if not was_initialized:
            dist.init_process_group("gloo")  # once per process: later calls reuse it
        dist.all_reduce(total)
    if int(os.environ["RANK"]) == fail_on:  # after the collective: no one is left waiting
        raise ValueError(f"refusing on purpose (rank {fail_on})")
    return {
        "rank": dist.get_rank() if dist.is_initialized() else -1,
        "env_rank": int(os.environ["RANK"]),
        "pid": os.getpid(),
        "calls": CALLS,
        "was_initialized": was_initialized,
        "world_id": id(dist.group.WORLD),
        "modules_before": modules_before,
        "modules_after": len(sys.modules),
        "sum": total.item(),
    }


@pytest.mark.timeout(120)
def test_group_calls(backend: str) -> None:
    """One group for all of it: under pytest-xdist, tests sharing a fixture may not share
    a worker, and a second group would cost a second start."""
    compute = kt.Compute(cpus=2, backend=backend).distribute(
        "pytorch", workers=2, procs_per_worker=2
    )
    group = kt.fn(probe).to(compute)
    assert isinstance(group, SpmdGroup)
    try:
        _second_call_reuses_processes_and_rendezvous(group)
        _rank_views_call_a_subset(group)
        _error_on_one_rank_names_it_and_keeps_the_group(group)
    finally:
        group.teardown()


def _second_call_reuses_processes_and_rendezvous(group: SpmdGroup) -> None:
    first = group.remote().result(timeout=90)
    assert [r["rank"] for r in first] == [r["env_rank"] for r in first] == [0, 1, 2, 3]
    assert all(not r["was_initialized"] and r["calls"] == 1 for r in first)
    assert all(r["sum"] == 6.0 for r in first)

    second = group()
    for a, b in zip(first, second, strict=True):
        assert b["pid"] == a["pid"]
        assert b["calls"] == a["calls"] + 1
        assert b["was_initialized"] and b["world_id"] == a["world_id"]
        assert b["modules_before"] == b["modules_after"] == a["modules_after"]
        assert b["sum"] == 6.0
    assert len({r["pid"] for r in second}) == 4


def _rank_views_call_a_subset(group: SpmdGroup) -> None:
    pids = [r["pid"] for r in group()]
    one = group.rank(2)(collective=False)
    assert (one["env_rank"], one["pid"]) == (2, pids[2])
    some = group.ranks([3, 0, 1]).remote(collective=False).result(timeout=30)
    assert [r["pid"] for r in some] == [pids[3], pids[0], pids[1]]
    with pytest.raises(IndexError, match="not in SPMD group"):
        group.rank(4)


def _error_on_one_rank_names_it_and_keeps_the_group(group: SpmdGroup) -> None:
    pids = [r["pid"] for r in group()]
    with pytest.raises(ValueError, match="refusing on purpose") as info:
        group(fail_on=2)
    assert any("rank 2 of SPMD group probe" in note for note in info.value.__notes__)
    # every other rank finished the call: nothing is stuck, so nothing restarts
    after = group()
    assert [r["pid"] for r in after] == pids
    assert group.restart_count == 0
    assert all(r["sum"] == 6.0 for r in after)


class Worker:
    def __init__(self, scale: int) -> None:
        self.scale = scale

    def whoami(self) -> tuple[int, int]:
        return int(os.environ["RANK"]), self.scale * int(os.environ["LOCAL_RANK"])

    def items(self) -> Any:
        yield 1


@pytest.mark.timeout(60)
def test_cls_group_calls_methods_on_every_rank() -> None:
    compute = kt.Compute(cpus=2, backend="local").distribute("spmd", workers=1, procs_per_worker=2)
    workers = kt.cls(Worker).to(compute, init_kwargs={"scale": 10})
    try:
        assert workers.whoami() == [(0, 0), (1, 10)]
        assert workers.rank(1).whoami() == (1, 10)
        with pytest.raises(kt.ConfigError, match="generator"):
            workers.items()
        with pytest.raises(AttributeError, match="no method"):
            workers.nothing()
    finally:
        workers.teardown()


@pytest.mark.timeout(90)
def test_teardown_while_starting_fails_waiting_calls_and_kills_what_the_start_made() -> None:
    from kt.actors.control import ActorPhase
    from kt.actors.driver import get_driver

    plane = get_driver().plane
    before = set(plane.actors)
    compute = kt.Compute(cpus=2, backend="local").distribute("spmd", workers=1, procs_per_worker=2)
    workers = kt.cls(Worker).to(compute, init_kwargs={"scale": 1})
    assert workers.group_state is kt.distributed.GroupState.STARTING
    waiting = workers.whoami.remote()  # waits at the gate for the start
    workers.teardown()  # returns once the start has finished and its actors are killed
    assert workers.group_state is kt.distributed.GroupState.STOPPED
    with pytest.raises(kt.KtError, match="torn down"):
        waiting.result(timeout=5)
    with pytest.raises(kt.KtError, match="torn down"):
        workers.whoami()
    made = [plane.actors[a] for a in set(plane.actors) - before]
    assert len(made) == 3  # the agent and two ranks, each placed, then killed
    assert all(r.phase is ActorPhase.DEAD for r in made), [r.phase for r in made]
    workers.teardown()  # twice is fine
