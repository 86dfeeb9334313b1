"""Refs complete on one thread and are awaited on another loop or blocked on; gather
uses them directly; cancel and timeouts behave like futures.

Also: `exception()` in each state; done-callbacks (removed ones do not run, one that
raises does not stop the others, each runs on the loop that added it); a Ref pickles
with its outcome and refuses to pickle while pending, unless lent: then it unpickles as a
pending Ref its borrower is asked to resolve, and a lend for one answer is forgotten
after it while a call's lends stay until released; a StreamRef yields its items in order
(sync and async), ends with the error that ended the stream, and can be cancelled.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest

import kt
from kt.core import ref as ref_module
from kt.core.ref import (
    PendingRefError,
    Ref,
    RefState,
    StreamRef,
    borrowing,
    dispatch,
    lending,
    lent,
    lent_count,
    release,
)


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
    assert ref.cancel() and ref.cancelled()  # cancelling again is harmless
    done: Ref[int] = Ref("done")
    done.set_result(1)
    assert not done.cancel() and not done.cancelled() and done.result() == 1


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


def test_exception_in_each_state() -> None:
    ref: Ref[int] = Ref("e")
    with pytest.raises(asyncio.InvalidStateError):
        ref.exception()
    ref.set_exception(KeyError("k"))
    assert isinstance(ref.exception(), KeyError)
    ok: Ref[int] = Ref("ok")
    ok.set_result(3)
    assert ok.exception() is None
    gone: Ref[int] = Ref("gone")
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        gone.exception()


def test_done_callbacks_removed_failing_and_per_loop() -> None:
    ref: Ref[int] = Ref("cb")
    seen: list[str] = []

    def removed(_: object) -> None:
        seen.append("removed")

    def boom(_: object) -> None:
        raise RuntimeError("a user's callback failed")

    ref.add_done_callback(removed)
    ref.add_done_callback(boom)
    ref.add_done_callback(lambda r: seen.append(f"plain {r.result()}"))
    assert ref.remove_done_callback(removed) == 1
    assert ref.remove_done_callback(removed) == 0

    async def main() -> None:
        loop_thread: list[object] = []
        ref.add_done_callback(lambda _: loop_thread.append(threading.current_thread()))
        _later(ref, 4, 0.02)
        assert await ref == 4
        await asyncio.sleep(0)
        assert loop_thread == [threading.current_thread()]  # ran on this loop

    asyncio.run(main())
    assert seen == ["plain 4"]
    late: list[int] = []
    ref.on_done(lambda r: late.append(r.result()))  # already done: runs at once
    assert late == [4]


def test_a_ref_pickles_with_its_outcome_never_pending() -> None:
    ref: Ref[int] = Ref("p")
    with pytest.raises(PendingRefError) as info:
        pickle.dumps(ref)
    assert info.value.ref is ref
    ref.set_result(9)
    copy = pickle.loads(pickle.dumps(ref))
    assert copy.done() and copy.result() == 9 and copy.label == "p"
    bad: Ref[int] = Ref("bad")
    bad.set_exception(ValueError("v"))
    again = pickle.loads(pickle.dumps(bad))
    assert again._state is RefState.FAILED
    with pytest.raises(ValueError, match="v"):
        again.result()


def test_a_lent_ref_unpickles_pending_and_its_borrower_is_asked() -> None:
    pending: Ref[int] = Ref("lent")
    done: Ref[int] = Ref("done")
    done.set_result(1)
    before = lent_count()
    with lending(once=True) as lends:
        data = pickle.dumps([pending, done, pending])
    assert len(lends) == 1 and lent_count() == before + 1  # pickle's memo: one lend
    asked: list[tuple[int, Ref[int]]] = []
    with borrowing(lambda lend_id, r: asked.append((lend_id, r))):
        first, copy, second = pickle.loads(data)
    assert asked == [(lends[0], first)] and second is first
    assert not first.done() and first.label == "lent" and copy.result() == 1
    assert lent(lends[0]) is pending and lent(lends[0]) is None  # once: forgotten after
    release(lends)
    assert lent_count() == before
    with pytest.raises(PendingRefError):  # outside lending, as before
        pickle.dumps(pending)


def test_a_calls_lends_stay_until_released_and_no_borrower_fails_loudly() -> None:
    pending: Ref[int] = Ref("arg")
    with lending(once=False) as lends:
        data = pickle.dumps(pending)
    assert lent(lends[0]) is pending and lent(lends[0]) is pending  # a retry may ask again
    release(lends)
    assert lent(lends[0]) is None
    orphan = pickle.loads(data)  # unpickled where nobody can be asked
    with pytest.raises(kt.OwnerDiedError, match="no owner"):
        orphan.result(timeout=1)
    assert getattr(ref_module._context, "lends", None) is None  # lending ended with its block


def test_stream_ref_yields_in_order_and_ends_with_its_error() -> None:
    stream: StreamRef[int] = StreamRef("s")

    def produce() -> None:
        for i in range(3):
            time.sleep(0.01)
            dispatch(stream._push(i))  # as the runtime thread does with ITEM frames
        dispatch(stream._close(None))

    threading.Thread(target=produce).start()
    assert list(stream) == [0, 1, 2]

    failing: StreamRef[int] = StreamRef("f")
    failing._push(1)
    failing.set_exception(KeyError("stop"))

    async def consume() -> list[int]:
        return [x async for x in failing]

    with pytest.raises(KeyError, match="stop"):
        asyncio.run(consume())

    cancelled: StreamRef[int] = StreamRef("c")
    hooked: list[bool] = []
    cancelled._on_cancel = lambda: hooked.append(True)
    assert cancelled.cancel() and hooked == [True]
    with pytest.raises(kt.CancelledError):
        next(iter(cancelled))
