"""Group restart with torchrun's semantics: one rank dies, the whole group comes back.

Behaviours covered:
- `kill -9` of one rank in the middle of a call raises kt.ActorDiedError at once, naming
  the rank, the signal and the restart about to happen; the rank's peer, blocked in a
  collective with it, is stopped too (not left hanging);
- with `max_restarts`, the next call succeeds on new processes that see
  TORCHELASTIC_RESTART_COUNT incremented and a new MASTER_PORT (a new rendezvous);
- a rank that raises while its peers wait for it in a collective is named in the error at
  once, and the stuck peers are stopped after the grace period (and the group restarted
  while restarts are left: the policy itself is tested in test_state.py);
- once no restarts are left, the failing call says so, every later call raises, and no
  rank process is left running;
- a rank of a 2x2 group (two pods; both backends) killed while the ranks all-reduce
  4 MiB tensors in a loop: the call raises ActorDiedError within seconds, every other
  rank's process is gone (none stays blocked in gloo), and the restarted group
  all-reduces correctly.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

import kt
from kt.distributed import GroupState, SpmdGroup
from kt.distributed.group import GRACE_S

pytest.importorskip("torch")


def step(hold: float = 0.0, fail_on: int = -1) -> dict[str, Any]:
    """Rank 1 holds the others in a barrier for `hold` s (or raises, when `fail_on`)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.get_rank() == fail_on:
        raise RuntimeError(f"rank {fail_on} gives up before the barrier")
    if dist.get_rank() == 1:
        time.sleep(hold)
    dist.barrier()
    return {
        "pid": os.getpid(),
        "restart_count": os.environ["TORCHELASTIC_RESTART_COUNT"],
        "max_restarts": os.environ["TORCHELASTIC_MAX_RESTARTS"],
        "master_port": os.environ["MASTER_PORT"],
    }


def all_reduce_loop(seconds: float = 0.0) -> dict[str, Any]:
    """All-reduce (rank + 1) over every rank, round after round, for `seconds` (once at
    least); each round's sum is checked."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.empty(1 << 20)
    end, rounds = time.monotonic() + seconds, 0
    while rounds == 0 or time.monotonic() < end:
        x.fill_(rank + 1.0)
        dist.all_reduce(x)
        assert float(x[0]) == world * (world + 1) / 2
        rounds += 1
    return {"pid": os.getpid(), "rank": rank, "sum": float(x[-1]), "rounds": rounds}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group(max_restarts: int) -> SpmdGroup:
    compute = kt.Compute(cpus=2, backend="local").distribute("pytorch", workers=2)
    g = kt.fn(step).to(compute, max_restarts=max_restarts)
    assert isinstance(g, SpmdGroup) and g.max_restarts == max_restarts
    return g


@pytest.mark.timeout(120)
def test_kill_9_mid_call_restarts_the_group_until_restarts_run_out() -> None:
    group = _group(max_restarts=1)
    try:
        before = group.remote().result(timeout=90)
        assert [r["restart_count"] for r in before] == ["0", "0"]
        assert [r["max_restarts"] for r in before] == ["1", "1"]
        ref = group.remote(hold=60)
        time.sleep(0.5)  # rank 0 waits in the barrier, rank 1 sleeps
        os.kill(before[1]["pid"], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(kt.ActorDiedError, match="rank 1 of SPMD group step") as info:
            ref.result(timeout=30)
        assert time.monotonic() - start < 5
        assert info.value.signal == signal.SIGKILL
        assert "restarts as attempt 1" in str(info.value)

        after = group.remote().result(timeout=90)
        assert [r["restart_count"] for r in after] == ["1", "1"]
        assert after[0]["master_port"] != before[0]["master_port"]
        assert {r["pid"] for r in after}.isdisjoint(r["pid"] for r in before)
        assert _gone(before[0]["pid"])  # the peer stuck in the barrier was stopped too
        assert group.group_state is GroupState.RUNNING and group.restart_count == 1

        os.kill(after[0]["pid"], signal.SIGKILL)
        with pytest.raises(kt.ActorDiedError, match="no restarts left") as last:
            group.remote().result(timeout=30)
        assert "rank 0 of SPMD group step" in str(last.value)
        with pytest.raises(kt.GroupFailedError, match="no restarts were left") as failed:
            group.remote().result(timeout=30)
        assert failed.value.rank == 0 and failed.value.pod == last.value.pod
        assert group.group_state is GroupState.FAILED
        _wait_gone(after[1]["pid"])
    finally:
        group.teardown()


@pytest.mark.timeout(120)
def test_raise_with_stuck_peers_stops_them_after_the_grace() -> None:
    group = _group(max_restarts=0)
    try:
        before = group.remote().result(timeout=90)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="gives up") as info:
            group.remote(fail_on=1).result(timeout=30)
        assert time.monotonic() - start < GRACE_S  # raised before the grace is over
        assert any("rank 1 of SPMD group step" in n for n in info.value.__notes__)
        # rank 0 is stuck in the barrier: after the grace it is stopped; no restarts left
        with pytest.raises(kt.GroupFailedError, match=r"rank 1 on pod .* no restarts were left"):
            group.remote().result(timeout=30)
        assert group.group_state is GroupState.FAILED
        _wait_gone(before[0]["pid"])
    finally:
        group.teardown()


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


@pytest.mark.timeout(180)
def test_a_rank_killed_mid_all_reduce_takes_every_rank_down_and_the_group_restarts(
    backend: str,
) -> None:
    name = f"restart-allreduce-{backend}"
    compute = kt.Compute(cpus=2, backend=backend, name=name)  # type: ignore[arg-type]
    group = kt.fn(all_reduce_loop).to(
        compute.distribute("pytorch", workers=2, procs_per_worker=2), max_restarts=1
    )
    try:
        before = group.remote().result(timeout=120)
        assert [r["sum"] for r in before] == [10.0] * 4
        ref = group.remote(seconds=60)
        time.sleep(1.0)  # every rank is inside the all-reduce loop
        os.kill(before[3]["pid"], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(kt.ActorDiedError, match="rank 3 of SPMD group"):
            ref.result(timeout=60)
        assert time.monotonic() - start < 10
        for r in before[:3]:
            _wait_gone(r["pid"])  # torn down, not left blocked in gloo
        after = group.remote().result(timeout=120)
        assert [r["sum"] for r in after] == [10.0] * 4
        assert {r["pid"] for r in after}.isdisjoint(r["pid"] for r in before)
    finally:
        group.teardown()
