"""Faults: an actor process killed with SIGKILL mid-call, kt.kill, failing __init__."""

from __future__ import annotations

import os
import signal
import time

import pytest

import kt


class Sleeper:
    def __init__(self, fail: bool = False) -> None:
        if fail:
            raise RuntimeError("refusing to start")

    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    def ping(self) -> str:
        return "pong"


def test_sigkill_mid_call_raises_actor_died_quickly(pool: kt.Compute) -> None:
    S = kt.cls(Sleeper).options(compute=pool)
    victim, bystander = S.remote(), S.remote()
    pid = victim.pid()
    assert bystander.ping() == "pong"
    ref = victim.sleep.remote(60)
    time.sleep(0.2)  # the call is running
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(kt.ActorDiedError) as info:
        ref.result(timeout=10)
    assert time.monotonic() - start < 2.0
    assert info.value.signal == signal.SIGKILL
    assert "killed by signal 9" in str(info.value)
    # the pod and its other actors keep working
    assert bystander.ping() == "pong"
    # later calls to the dead actor fail at once, naming it
    with pytest.raises(kt.ActorDiedError):
        victim.ping.remote().result(timeout=10)


def test_kill_stops_the_actor(pool: kt.Compute) -> None:
    s = kt.cls(Sleeper).options(compute=pool).remote()
    assert s.ping() == "pong"
    kt.kill(s)
    with pytest.raises(kt.ActorDiedError, match=r"kt\.kill"):
        s.ping.remote().result(timeout=10)


def test_failing_init_fails_the_calls(pool: kt.Compute) -> None:
    s = kt.cls(Sleeper).options(compute=pool).remote(fail=True)
    with pytest.raises(kt.ActorDiedError, match="RuntimeError: refusing to start"):
        s.ping.remote().result(timeout=30)


def test_request_bigger_than_a_pod_fails_at_once(pool: kt.Compute) -> None:
    s = kt.cls(Sleeper).options(compute=pool, cpus=1000).remote()
    start = time.monotonic()
    with pytest.raises(kt.PlacementError, match="can never fit"):
        s.ping.remote().result(timeout=10)
    # at once, not after the placement timeout (60 s); generous for a loaded machine
    # (it took 1.004 s once under make test, 1 ms alone)
    assert time.monotonic() - start < 5.0


def test_actors_survive_their_zygote_and_deaths_are_still_seen(pool: kt.Compute) -> None:
    S = kt.cls(Sleeper).options(compute=pool, cpus=0)
    a = S.remote()
    pid = a.pid()
    zygote = int(open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[1])
    os.kill(zygote, signal.SIGKILL)
    time.sleep(0.3)
    assert a.ping() == "pong"
    ref = a.sleep.remote(30)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(kt.ActorDiedError):
        ref.result(timeout=10)
    b = S.remote()  # new workers are spawned without the zygote
    assert b.ping() == "pong"
