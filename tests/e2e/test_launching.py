"""Placement never waits behind a pod launch (issue 11).

Behaviours covered, on real local pods whose launch is made slow or made to fail:
- while a pod launches (5 s), a request that fits a pod already up is placed at once,
  and the request that needed the new pod is placed once it is up;
- a launch that fails fails the actor that waited for it with LaunchError (not
  PlacementError) naming the pod and the reason; the pool keeps working, and a later
  request launches a pod again.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import kt
from kt.core.provider import register_backend

register_backend("slow-local", "tests.local.slow_provider:SlowProvider")
register_backend("failing-local", "tests.local.slow_provider:FailingSecondProvider")


class Box:
    def pid(self) -> int:
        return os.getpid()


@pytest.mark.timeout(120)
def test_a_request_that_fits_is_placed_while_a_pod_launches() -> None:
    compute = kt.Compute(cpus=1, min_replicas=1, max_replicas=2, backend="slow-local")
    B = kt.cls(Box).options(compute=compute)
    first = B.options(cpus=1).remote()
    first.pid()  # pod 1 is up (after 5 s)
    launching = B.options(cpus=1).remote()  # needs pod 2: it launches for 5 s
    time.sleep(0.5)
    start = time.monotonic()
    light = B.options(cpus=0).remote()  # fits pod 1
    assert light.pid() > 0
    assert time.monotonic() - start < 3.0, "placement waited for the launching pod"
    assert launching.pid() not in (first.pid(), light.pid())
    for h in (first, launching, light):
        kt.kill(h)


@pytest.mark.timeout(120)
def test_a_failed_launch_fails_only_what_waited_for_it() -> None:
    compute = kt.Compute(cpus=1, min_replicas=1, max_replicas=2, backend="failing-local")
    B = kt.cls(Box).options(compute=compute)
    first = B.options(cpus=1).remote()
    first.pid()
    doomed = B.options(cpus=1).remote()  # the pool's second launch fails
    with pytest.raises(kt.LaunchError, match="could not be pulled") as info:
        doomed.pid()
    assert not isinstance(info.value, kt.PlacementError)
    assert first.pid() > 0  # the pool goes on
    again = B.options(cpus=1).remote()  # a third launch: it works
    assert again.pid() not in (first.pid(),)
    kt.kill(first)
    kt.kill(again)


@pytest.mark.timeout(120)
def test_a_failed_launch_among_several_leaves_no_pod_untracked() -> None:
    from kt.actors.scheduler import Pool
    from tests.local.slow_provider import FailingSecondProvider

    async def go() -> tuple[list[str], list[str], list[str]]:
        provider = FailingSecondProvider()
        compute = kt.Compute(cpus=1, min_replicas=3, max_replicas=3, backend="local")
        pool = Pool(compute, provider, name="three-launches", token="t0k3n", detached=False)
        with pytest.raises(kt.LaunchError):
            await pool.ensure_min()
        while pool._tasks:  # the other launches go on
            await asyncio.sleep(0.05)
        tracked = sorted(s.pod.name for s in pool.slots if not s.launching)
        existing = sorted(p.name for p in await provider.list_pods("three-launches"))
        await pool.teardown()
        after = sorted(p.name for p in await provider.list_pods("three-launches"))
        return tracked, existing, after

    tracked, existing, after = asyncio.run(go())
    assert len(tracked) == 2 and tracked == existing, (tracked, existing)
    assert after == []
