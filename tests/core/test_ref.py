"""Refs complete on one thread and are awaited on another loop or blocked on; gather
uses them directly; cancel and timeouts behave like futures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import kt
from kt.core.ref import Ref


def _later(ref: Ref[int], value: int, delay: float) -> None:
    def run() -> None:
        time.sleep(delay)
        ref.set_result(value)

    threading.Thread(target=run).start()


def test_blocking_result_from_another_thread() -> None:
    ref: Ref[int] = Ref("t")
    _later(ref, 5, 0.05)
    assert ref.result(timeout=5) == 5 and ref.done()


def test_await_and_gather_across_threads() -> None:
    refs: list[Ref[int]] = [Ref(str(i)) for i in range(100)]
    for i, ref in enumerate(refs):
        _later(ref, i, 0.01)

    async def main() -> list[int]:
        return await asyncio.gather(*refs)

    assert asyncio.run(main()) == list(range(100))


def test_timeout_and_cancel() -> None:
    ref: Ref[int] = Ref("slow")
    with pytest.raises(kt.GetTimeoutError):
        ref.result(timeout=0.01)
    assert ref.cancel() and ref.cancelled()
    with pytest.raises(kt.CancelledError):
        ref.result()
    assert not ref.cancel() or ref.cancelled()


def test_exception_propagates_to_await() -> None:
    ref: Ref[int] = Ref("bad")

    async def main() -> None:
        threading.Timer(0.02, lambda: ref.set_exception(ValueError("x"))).start()
        await ref

    with pytest.raises(ValueError, match="x"):
        asyncio.run(main())


def test_wait_for_timeout_cancels_the_ref() -> None:
    ref: Ref[int] = Ref("never")

    async def main() -> None:
        await asyncio.wait_for(_wrap(ref), 0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    assert ref.cancelled()


async def _wrap(ref: Ref[int]) -> int:
    return await ref
