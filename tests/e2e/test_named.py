"""Named and detached actors across drivers.

Covers: a named detached actor made by one driver process is found and called by a
second driver process after the first has exited; get_if_exists returns the same
actor; a second actor with a taken name is refused; an unknown name says so.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import kt
from kt.core.provider import PodState, get_provider

MAKER = textwrap.dedent(
    """
    import kt

    class Registry:
        def __init__(self):
            self.items = []
        def add(self, x):
            self.items.append(x)
            return len(self.items)
        def all(self):
            return self.items

    compute = kt.Compute(cpus=1, replicas=1, backend="local")
    r = kt.cls(Registry).options(compute=compute, name=NAME, lifetime="detached").remote()
    assert r.add("from the first driver") == 1
    print("made", flush=True)
    """
)

USER = textwrap.dedent(
    """
    import kt
    r = kt.get_actor(NAME)
    print(r.add("from the second driver"), r.all(), flush=True)
    kt.kill(r)
    """
)


def _driver(code: str, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code.replace("NAME", repr(name))],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(240)
def test_detached_named_actor_outlives_its_driver() -> None:
    name = f"registry-{uuid.uuid4().hex[:6]}"
    pool = kt.Compute(cpus=1, replicas=1, backend="local").pool_name() + "-detached"
    try:
        assert "made" in _driver(MAKER, name)  # the first driver has exited
        time.sleep(3)  # many ticks of the pods' 0.5 s driver watchdog
        assert _pods(pool), "the detached pool went away with its driver"
        out = _driver(USER, name)
        assert "2 ['from the first driver', 'from the second driver']" in out
    finally:  # detached pods live until their inactivity_ttl: do not leave them behind
        provider = get_provider("local")
        for pod in asyncio.run(provider.list_pods(pool)):
            asyncio.run(provider.delete_pod(pool, pod.name))


def _pods(pool: str) -> list[str]:
    pods = asyncio.run(get_provider("local").list_pods(pool))
    return [p.name for p in pods if p.state is PodState.READY]


class Box:
    def __init__(self, v: int) -> None:
        self.v = v

    def get(self) -> int:
        return self.v


def test_names_are_unique_and_get_if_exists(backend: str) -> None:
    pool = kt.Compute(cpus=16, replicas=1, backend=backend)
    name = f"box-{uuid.uuid4().hex[:6]}"
    B = kt.cls(Box).options(compute=pool, name=name, cpus=0)
    first = B.remote(1)
    assert first.get() == 1
    again = B.options(get_if_exists=True).remote(2)
    assert again.get() == 1
    with pytest.raises(kt.ConfigError, match="already exists"):
        B.remote(3)
    assert kt.get_actor(name).get() == 1
    kt.kill(first)
    with pytest.raises(kt.ConfigError, match="no live actor"):
        kt.get_actor(f"missing-{uuid.uuid4().hex[:6]}")


class Finder:
    def find_and_get(self, name: str) -> int:
        return int(kt.get_actor(name).get())


def test_get_actor_from_inside_an_actor(pool: kt.Compute) -> None:
    name = f"box-{uuid.uuid4().hex[:6]}"
    box = kt.cls(Box).options(compute=pool, name=name, cpus=0).remote(42)
    assert box.get() == 42
    finder = kt.cls(Finder).options(compute=pool, cpus=0).remote()
    assert finder.find_and_get(name) == 42
    kt.kill(box)
