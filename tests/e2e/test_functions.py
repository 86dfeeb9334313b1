"""kt.fn end to end: blocking calls, Refs, gather, teardown, load balancing."""

from __future__ import annotations

import asyncio
import os

import kt


def add(a: int, b: int) -> int:
    return a + b


def whoami() -> int:
    return os.getpid()


def test_fn_call_remote_and_gather(pool: kt.Compute) -> None:
    remote_add = kt.fn(add).to(pool)
    assert remote_add(1, 2) == 3
    assert remote_add.remote(2, 3).result(timeout=30) == 5

    async def fan() -> list[int]:
        return await asyncio.gather(*[remote_add.remote(i, i) for i in range(1000)])

    assert asyncio.run(fan()) == [2 * i for i in range(1000)]
    remote_add.teardown()


def test_fn_defined_in_a_test_travels_by_value(pool: kt.Compute) -> None:
    offset = 7
    f = kt.fn(lambda x: x + offset).to(pool)
    assert f(1) == 8


def test_fn_on_several_replicas_balances(tmp_path: object) -> None:
    compute = kt.Compute(cpus=1, replicas=2, backend="local")
    who = kt.fn(whoami).to(compute)
    pids = set(kt.get([who.remote() for _ in range(50)], timeout=60))
    assert len(pids) == 2
