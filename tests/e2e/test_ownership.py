"""Ownership: a Ref passed or returned before it resolves is lent, not waited for.

Behaviours covered (each against real pods and actor processes):
- a Ref nested in an argument reaches the method still pending, and resolves there,
  also in a sync method that blocks on it (its answer does not need that method's loop);
- so a method can release what its Ref waits for (with deferral this deadlocks);
- a Ref returned from a method reaches the caller before it resolves, and can be passed
  on again (a chain of borrowers);
- a stream item that is a pending Ref does not hold back the items after it;
- calls from one caller keep their order, whether a Ref in them is lent (nested) or
  waited for first (top level);
- when the owner dies first, the borrower gets OwnerDiedError naming it, not a hang;
- lends are forgotten once nobody can ask for them (no leak in driver or actor);
- an actor calling through a handle it was given gets a caller runtime, not a Driver.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import kt
from kt.core.ref import lent_count


class Slow:
    def val(self, x: int, seconds: float) -> int:
        time.sleep(seconds)
        return x


class Holder:
    """Receives Refs, looks at them, keeps them, waits for them."""

    def __init__(self) -> None:
        self.kept: list[kt.Ref[Any]] = []
        self.log: list[str] = []

    def peek(self, refs: list[kt.Ref[int]]) -> list[bool]:
        return [r.done() for r in refs]

    def get_all(self, refs: list[kt.Ref[int]]) -> list[int]:
        return list(kt.get(refs, timeout=60))  # blocks this actor's loop meanwhile

    def keep(self, refs: list[kt.Ref[Any]]) -> int:
        self.kept = refs
        return os.getpid()

    def get_kept(self) -> Any:
        return kt.get(self.kept[0], timeout=60)

    def add(self, tag: str, refs: list[kt.Ref[int]] | None = None) -> None:
        self.log.append(tag)

    def read_log(self) -> list[str]:
        return self.log

    def lends(self) -> int:
        return lent_count()


class Maker:
    """Makes calls and hands their Refs out before they resolve."""

    def __init__(self, slow: kt.ActorHandle) -> None:
        self.slow = slow

    def forward(self, x: int, seconds: float) -> kt.Ref[int]:
        return self.slow.val.remote(x, seconds)

    def stream(self) -> Iterator[Any]:
        yield self.slow.val.remote(1, 1.0)  # still running when it is sent
        yield 2

    def pass_on(self, holder: kt.ActorHandle, seconds: float) -> int:
        pending = self.slow.val.remote(3, seconds)
        pid: int = holder.keep.remote([pending]).result(timeout=60)
        return pid

    def lends(self) -> int:
        return lent_count()

    def built_a_driver(self) -> bool:
        import kt.actors.driver

        return kt.actors.driver._driver is not None


class Gate:
    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def wait(self) -> str:
        await self.opened.wait()
        return "opened"

    async def open(self) -> None:
        self.opened.set()


class Opener:
    def open_then_get(self, gate: kt.ActorHandle, refs: list[kt.Ref[str]]) -> str:
        gate.open.remote().result(timeout=30)
        return str(kt.get(refs[0], timeout=30))


def _actor(cls: type, pool: kt.Compute, *args: Any) -> kt.ActorHandle:
    return kt.cls(cls).options(compute=pool, cpus=0).remote(*args)


@pytest.mark.timeout(120)
def test_a_nested_ref_arrives_pending_and_resolves_where_it_went(pool: kt.Compute) -> None:
    slow, holder = _actor(Slow, pool), _actor(Holder, pool)
    assert holder.peek([slow.val.remote(0, 2.0)]) == [False], "the call waited for its Ref"
    pending = [slow.val.remote(i, 0.5) for i in range(3)]
    assert holder.get_all.remote(pending).result(timeout=60) == [0, 1, 2]
    assert lent_count() == 0, "the driver kept lends of calls that are over"


@pytest.mark.timeout(120)
def test_a_method_can_release_what_its_borrowed_ref_waits_for(pool: kt.Compute) -> None:
    gate, opener = _actor(Gate, pool), _actor(Opener, pool)
    waiting = gate.wait.remote()
    assert opener.open_then_get.remote(gate, [waiting]).result(timeout=60) == "opened"


@pytest.mark.timeout(120)
def test_a_returned_ref_arrives_pending_and_can_be_passed_on(pool: kt.Compute) -> None:
    slow = _actor(Slow, pool)
    maker, holder = _actor(Maker, pool, slow), _actor(Holder, pool)
    returned = maker.forward(7, 2.0)
    assert isinstance(returned, kt.Ref) and not returned.done(), "the reply waited for its Ref"
    assert kt.get(returned, timeout=60) == 7
    assert maker.lends() == 0, "the actor kept a lend it had answered"
    assert not maker.built_a_driver(), "calling a handle built a whole Driver in the actor"
    again = maker.forward(8, 2.0)
    holder.keep([again])  # a borrowed Ref, still pending, lent on by the driver
    assert holder.get_kept() == 8


@pytest.mark.timeout(120)
def test_a_pending_ref_in_a_stream_does_not_hold_back_later_items(pool: kt.Compute) -> None:
    maker = _actor(Maker, pool, _actor(Slow, pool))
    items = list(maker.stream.remote())
    assert isinstance(items[0], kt.Ref) and items[1] == 2
    assert kt.get(items[0], timeout=60) == 1


@pytest.mark.timeout(120)
def test_calls_keep_their_order_when_one_has_a_pending_ref(pool: kt.Compute) -> None:
    slow, holder = _actor(Slow, pool), _actor(Holder, pool)
    holder.add.remote("lends", [slow.val.remote(0, 2.0)])  # nested: lent, sent at once
    holder.add.remote("after it")
    holder.add.remote("resolved first", slow.val.remote(0, 2.0))  # top level: waits
    holder.add.remote("behind it")
    pending = holder.add.remote("nested behind it", [slow.val.remote(0, 0.1)])
    assert pending.result(timeout=60) is None
    assert holder.read_log() == [
        "lends",
        "after it",
        "resolved first",
        "behind it",
        "nested behind it",
    ]


@pytest.mark.timeout(120)
def test_a_returned_ref_whose_owner_dies_raises_owner_died(pool: kt.Compute) -> None:
    maker = _actor(Maker, pool, _actor(Slow, pool))
    returned = maker.forward(1, 60.0)
    assert not returned.done()
    kt.kill(maker)
    start = time.monotonic()
    with pytest.raises(kt.OwnerDiedError) as info:
        kt.get(returned, timeout=30)
    assert time.monotonic() - start < 20
    assert maker._actor_id in info.value.owner and "Maker" in info.value.owner


@pytest.mark.timeout(120)
def test_a_lent_argument_whose_owner_dies_raises_owner_died(pool: kt.Compute) -> None:
    maker, holder = _actor(Maker, pool, _actor(Slow, pool)), _actor(Holder, pool)
    assert maker.pass_on(holder, 60.0) > 0  # maker (an actor) owns the Ref holder keeps
    assert maker.lends() == 0, "the owner kept the lends of a call that is over"
    kt.kill(maker)
    start = time.monotonic()
    with pytest.raises(kt.OwnerDiedError) as info:
        holder.get_kept()
    assert time.monotonic() - start < 20
    assert info.value.owner.startswith("actor-"), info.value.owner
    assert holder.lends() == 0
