"""The scheduler on real local pools.

Covers: pack fills 4-cpu pods before starting another (16 actors -> exactly 4 pods);
spread starts a pod per actor while it can, later packing fills them (4 + 12 -> 4 x 4);
a request larger than a pod fails at once; idle pods are deleted down to min_replicas;
a lost pod's actors are re-created (max_restarts=1) and the old handle keeps working,
or calls fail (max_restarts=0); max_task_retries re-sends a call whose actor died;
load-balanced services put one instance per replica.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import pytest

import kt
from kt.actors.driver import get_driver
from kt.core.liveness import pid_alive
from kt.core.provider import PodState, get_provider


class Where:
    def __init__(self, delay: float = 0.0) -> None:
        time.sleep(delay)

    def pod(self) -> str:
        return os.environ["KT_POD"]

    def pid(self) -> int:
        return os.getpid()

    def supervisor_pid(self) -> int:
        return int(os.environ["KT_SUPERVISOR_PID"])

    def zygote_pid(self) -> int:
        return os.getppid()

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return self.pod()


def _pods(compute: kt.Compute) -> list[str]:
    driver = get_driver()
    name = driver.pool_name(compute, False)
    pods = driver.runtime.run(get_provider(compute.backend or "local").list_pods(name))
    return sorted(p.name for p in pods if p.state is PodState.READY)


@pytest.mark.timeout(180)
def test_pack_16_actors_on_exactly_4_pods(backend: str) -> None:
    compute = kt.Compute(cpus=4, min_replicas=0, max_replicas=4, backend=backend)
    W = kt.cls(Where).options(compute=compute, cpus=1)
    actors = [W.remote() for _ in range(16)]
    where = collections.Counter(kt.get([a.pod.remote() for a in actors], timeout=150))
    assert sorted(where.values()) == [4, 4, 4, 4]
    assert sorted(where) == _pods(compute)
    for a in actors:
        kt.kill(a)


@pytest.mark.timeout(180)
def test_spread_4_then_pack_12_gives_4_pods_of_4() -> None:
    compute = kt.Compute(cpus=4, min_replicas=0, max_replicas=4, backend="local")
    spread = [kt.cls(Where).options(compute=compute, placement="spread").remote() for _ in range(4)]
    first = kt.get([a.pod.remote() for a in spread], timeout=150)
    assert len(set(first)) == 4
    more = [kt.cls(Where).options(compute=compute).remote() for _ in range(12)]
    where = collections.Counter(kt.get([a.pod.remote() for a in spread + more], timeout=150))
    assert sorted(where.values()) == [4, 4, 4, 4]
    assert len(_pods(compute)) == 4  # never a 5th
    # the pool is full: one more waits, then fails with a reason, never a 5th pod
    late = kt.cls(Where).options(compute=compute, placement_timeout=1.0).remote()
    with pytest.raises(kt.PlacementError, match=r"full|room"):
        late.pod.remote().result(timeout=30)
    assert len(_pods(compute)) == 4
    for a in spread + more:
        kt.kill(a)


def test_request_larger_than_a_pod_fails_within_1s(backend: str) -> None:
    compute = kt.Compute(cpus=4, min_replicas=0, max_replicas=4, backend=backend)
    start = time.monotonic()
    big = kt.cls(Where).options(compute=compute, cpus=8).remote()
    with pytest.raises(kt.PlacementError, match=r"8 cpus > 4"):
        big.pod.remote().result(timeout=10)
    assert time.monotonic() - start < 1.0


@pytest.mark.timeout(120)
def test_idle_pods_are_deleted_down_to_min_replicas(backend: str) -> None:
    compute = kt.Compute(cpus=1, min_replicas=1, max_replicas=3, idle_timeout=3, backend=backend)
    W = kt.cls(Where).options(compute=compute, cpus=1)
    actors = [W.remote() for _ in range(3)]
    assert len(set(kt.get([a.pod.remote() for a in actors], timeout=90))) == 3
    assert len(_pods(compute)) == 3
    for a in actors:
        kt.kill(a)
    time.sleep(0.5)  # idle for less than idle_timeout (3 s): nothing is deleted yet
    assert len(_pods(compute)) == 3
    deadline = time.monotonic() + 30
    while len(_pods(compute)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_pods(compute)) == 1
    time.sleep(3)  # and never below min_replicas
    assert len(_pods(compute)) == 1


@pytest.mark.timeout(120)
def test_lost_pod_restarts_its_actors_when_allowed(backend: str) -> None:
    compute = kt.Compute(cpus=2, min_replicas=0, max_replicas=2, backend=backend)
    keep = kt.cls(Where).options(compute=compute, max_restarts=1).remote()
    lose = kt.cls(Where).options(compute=compute, max_restarts=0).remote()
    assert keep.pod() == lose.pod()
    old_pod = keep.pod()
    os.kill(keep.supervisor_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 60
    new_pod = None
    while time.monotonic() < deadline:
        try:
            new_pod = keep.pod.remote().result(timeout=30)
            break
        except kt.PodLostError:
            time.sleep(0.1)  # a call that raced the loss; the next goes to the new actor
    assert new_pod is not None and new_pod != old_pod
    with pytest.raises((kt.ActorDiedError, kt.PodLostError)):
        lose.pod.remote().result(timeout=30)
    with pytest.raises(kt.ActorDiedError, match="pod was lost"):
        lose.pod.remote().result(timeout=30)
    kt.kill(keep)


@pytest.mark.timeout(120)
def test_task_retries_resend_a_call_whose_actor_died(pool: kt.Compute) -> None:
    a = kt.cls(Where).options(compute=pool, max_restarts=1, max_task_retries=1).remote()
    first_pid = a.pid()
    ref = a.slow.remote(2.0)
    time.sleep(0.3)
    os.kill(first_pid, signal.SIGKILL)
    assert ref.result(timeout=60) == a.pod()
    assert a.pid() != first_pid
    kt.kill(a)


@pytest.mark.timeout(120)
def test_service_puts_one_instance_per_replica_and_balances_on_calls_in_flight() -> None:
    compute = kt.Compute(cpus=1, replicas=2, backend="local")
    svc = kt.cls(Where).to(compute)
    pods = set(kt.get([svc.slow.remote(0.05) for _ in range(20)], timeout=90))
    assert len(pods) == 2
    busy = svc.slow.remote(5.0)  # one replica is busy ...
    time.sleep(0.2)
    quick = [svc.pod() for _ in range(6)]  # ... so every call meanwhile goes to the other
    assert len(set(quick)) == 1 and quick[0] != busy.result(timeout=30)
    svc.teardown()


DRIVER = """
import os, signal, sys, kt
class Where:
    def pids(self):
        return [os.getpid(), os.getppid(), int(os.environ["KT_SUPERVISOR_PID"])]
compute = kt.Compute(cpus=1, replicas=1, backend="local")
pids = [p for _ in range(3) for p in kt.cls(Where).options(compute=compute, cpus=0).remote().pids()]
print(*set(pids), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_drivers_pods_and_actors_go_when_it_exits(how: str) -> None:
    """Within 10 s of its driver's end (the local pod watches its driver's pid), no process
    of the pod is left: supervisor, actors (and the zygote, their parent)."""
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, how], capture_output=True, text=True, timeout=90
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 5, out  # three actors, the zygote that forked them, the supervisor
    deadline = time.monotonic() + 10
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if pid_alive(p)]
    assert not left, f"processes {left} still running after their driver's {how}"


def test_custom_resources_are_placed_and_refused() -> None:
    compute = kt.Compute(
        cpus=4, resources={"tpu": 2}, min_replicas=0, max_replicas=2, backend="local"
    )
    W = kt.cls(Where).options(compute=compute, cpus=0, resources={"tpu": 1})
    actors = [W.remote() for _ in range(4)]  # 2 tpus per pod: two pods
    assert len(set(kt.get([a.pod.remote() for a in actors], timeout=90))) == 2
    too_big = kt.cls(Where).options(compute=compute, resources={"tpu": 3}).remote()
    with pytest.raises(kt.PlacementError, match="'tpu'"):
        too_big.pod.remote().result(timeout=10)
    unknown = kt.cls(Where).options(compute=compute, resources={"fpga": 1}).remote()
    with pytest.raises(kt.PlacementError, match="'fpga'"):
        unknown.pod.remote().result(timeout=10)
    for a in actors:
        kt.kill(a)
