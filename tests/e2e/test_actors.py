"""Actors on a local pool, end to end.

Covers: fan-out of 10,000 calls to 4 actors with per-caller ordering; state persisting
across calls and not shared between actors; remote exceptions with type, message and
traceback; handles passed into another actor; Refs passed as arguments; streaming
generator methods; async methods interleaving; max_concurrency; print forwarding.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

import kt


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[int] = []

    def record(self, i: int) -> tuple[str, int]:
        self.seen.append(i)
        return self.name, i

    def history(self) -> list[int]:
        return self.seen


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def fail(self, message: str) -> None:
        raise KeyError(message)

    def say(self, text: str) -> str:
        print(text)
        return text

    def say_in_pieces(self, *pieces: str) -> None:
        for piece in pieces:  # each its own write: the pieces reach the pod apart
            print(piece, end="", flush=True)
            time.sleep(0.05)
        print(flush=True)

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def call_other(self, other: Any, k: int) -> int:
        return int(other.incr(k))

    def count(self, n: int) -> Any:
        yield from range(n)

    def count_slowly(self, n: int, gap: float) -> Any:
        for i in range(n):
            yield i, time.time()
            time.sleep(gap)

    async def acount_slowly(self, n: int, gap: float) -> Any:
        for i in range(n):
            yield i, time.time()
            await asyncio.sleep(gap)

    async def aslow(self, seconds: float, tag: str) -> str:
        await asyncio.sleep(seconds)
        return tag


@pytest.mark.timeout(120)
def test_calls_made_while_and_after_an_actor_is_placed_keep_their_order() -> None:
    """Calls made during placement wait in the handle's backlog; calls made the moment it
    is bound must queue behind that backlog, not go to the socket first."""
    for trial in range(2):
        compute = kt.Compute(cpus=1, replicas=1, backend="local", name=f"bind-order-{trial}")
        r = kt.cls(Recorder).options(compute=compute, cpus=0).remote("r")
        n = 0
        while not r._placed.is_set():  # into the backlog, while the pod starts
            r.record.remote(n)
            n += 1
        for _ in range(3000):  # right after it is bound
            r.record.remote(n)
            n += 1
        assert r.history() == list(range(n)), f"calls overtook the backlog (trial {trial})"
        kt.kill(r)


@pytest.fixture(scope="module")
def counters(pool: kt.Compute) -> list[kt.ActorHandle]:
    C = kt.cls(Counter)
    return [C.options(compute=pool).remote(start=i * 100) for i in range(2)]


def test_fanout_10k_calls_to_4_actors_keeps_per_caller_order(backend: str) -> None:
    R = kt.cls(Recorder)
    pool = kt.Compute(cpus=16, replicas=1, backend=backend)
    actors = [R.options(compute=pool).remote(f"r{i}") for i in range(4)]

    async def main() -> list[tuple[str, int]]:
        refs = [actors[i % 4].record.remote(i) for i in range(10_000)]
        return await asyncio.gather(*refs)

    results = asyncio.run(main())
    assert results == [(f"r{i % 4}", i) for i in range(10_000)]
    for i, actor in enumerate(actors):
        seen = actor.history()
        assert seen == list(range(i, 10_000, 4)), "calls ran out of submission order"


def test_state_persists_and_is_not_shared(counters: list[kt.ActorHandle]) -> None:
    a, b = counters
    start_a, start_b = a.get(), b.get()
    assert a.incr(1) == start_a + 1
    assert a.incr(2) == start_a + 3
    assert b.get() == start_b
    assert b.incr(10) == start_b + 10
    assert a.get() == start_a + 3
    assert a.pid() != b.pid()


def test_remote_exception_keeps_type_message_and_traceback(
    counters: list[kt.ActorHandle],
) -> None:
    with pytest.raises(KeyError) as info:
        counters[0].fail("no such key")
    exc = info.value
    assert exc.args == ("no such key",)
    assert "in fail" in str(exc.__cause__) and "raise KeyError(message)" in str(exc.__cause__)
    assert any("Counter.fail" in note for note in exc.__notes__)


def test_remote_exception_of_unknown_type_becomes_remote_error(
    counters: list[kt.ActorHandle],
) -> None:
    class Unpicklable(Exception):
        def __init__(self, a: int, b: int) -> None:  # args do not round-trip
            super().__init__(f"{a}-{b}")

    class Raiser:
        def go(self) -> None:
            raise Unpicklable(1, 2)

    pool = kt.Compute(cpus=16, replicas=1, backend="local")
    r = kt.cls(Raiser).options(compute=pool).remote()
    with pytest.raises(kt.RemoteError) as info:
        r.go()
    assert "Unpicklable" in info.value.type_name and "1-2" in str(info.value)
    assert f'File "{__file__}"' in info.value.traceback  # not cloudpickle's <dynamic-code>
    assert "raise Unpicklable(1, 2)" in info.value.traceback


def test_handle_passed_into_another_actor_is_callable_there(
    counters: list[kt.ActorHandle],
) -> None:
    a, b = counters
    before = b.get()
    assert a.call_other(b, 5) == before + 5
    assert b.get() == before + 5


def test_ref_argument_is_resolved_before_the_method_runs(
    counters: list[kt.ActorHandle],
) -> None:
    a, b = counters
    ref = a.sleep.remote(0.3)  # not done when the next call is made
    echoed = b.say.remote(ref)
    assert echoed.result(timeout=30) == "slept"


def test_generator_method_streams_items(counters: list[kt.ActorHandle]) -> None:
    assert list(counters[0].count.remote(5)) == [0, 1, 2, 3, 4]

    async def collect() -> list[int]:
        return [x async for x in counters[0].count.remote(3)]

    assert asyncio.run(collect()) == [0, 1, 2]


def test_async_methods_interleave(pool: kt.Compute) -> None:
    c = kt.cls(Counter).options(compute=pool).remote()
    start = time.monotonic()
    refs = [c.aslow.remote(0.5, str(i)) for i in range(4)]
    assert kt.get(refs, timeout=30) == ["0", "1", "2", "3"]
    assert time.monotonic() - start < 1.9  # four 0.5 s sleeps overlapped


def test_max_concurrency_runs_sync_methods_on_threads(pool: kt.Compute) -> None:
    c = kt.cls(Overlap).options(compute=pool, cpus=0, max_concurrency=4).remote()
    assert max(kt.get([c.hold.remote(0.5) for _ in range(4)], timeout=30)) >= 2
    one = kt.cls(Overlap).options(compute=pool, cpus=0).remote()
    assert max(kt.get([one.hold.remote(0.1) for _ in range(4)], timeout=30)) == 1


class Overlap:
    """Counts the calls running at once, as the actor itself sees them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0

    def hold(self, seconds: float) -> int:
        with self.lock:
            self.running += 1
            peak = self.running
        time.sleep(seconds)
        with self.lock:
            peak = max(peak, self.running)
            self.running -= 1
        return peak


class Sequencer:
    """Calls that take longer the earlier they come: run on threads, they would finish
    (and record) out of order."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def step(self, i: int, seconds: float) -> int:
        time.sleep(seconds)
        self.seen.append(i)
        return i

    def history(self) -> list[int]:
        return self.seen


def test_calls_from_one_caller_run_in_order_even_when_slow(pool: kt.Compute) -> None:
    s = kt.cls(Sequencer).options(compute=pool, cpus=0).remote()
    refs = [s.step.remote(i, 0.02 * (10 - i)) for i in range(10)]
    assert kt.get(refs, timeout=60) == list(range(10))
    assert s.history() == list(range(10))


def test_print_reaches_the_caller_with_a_prefix(
    counters: list[kt.ActorHandle], capfd: pytest.CaptureFixture[str]
) -> None:
    counters[0].say("hello from the actor")
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out += capfd.readouterr().out
        if "hello from the actor" in out:
            break
        time.sleep(0.05)
    line = next(ln for ln in out.splitlines() if "hello from the actor" in ln)
    assert line.startswith(f"(Counter pid={counters[0].pid()} pod=pool-"), line


def test_a_line_printed_in_pieces_arrives_as_one_line(
    counters: list[kt.ActorHandle], capfd: pytest.CaptureFixture[str]
) -> None:
    counters[1].say_in_pieces("one,", " two,", " three")
    deadline = time.monotonic() + 10
    out = ""
    while "three" not in out and time.monotonic() < deadline:
        out += capfd.readouterr().out
        time.sleep(0.05)
    time.sleep(0.3)
    out += capfd.readouterr().out
    prefix = f"(Counter pid={counters[1].pid()} "
    mine = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    assert len(mine) == 1 and mine[0].endswith(") one, two, three"), mine


def test_unpicklable_argument_is_named(counters: list[kt.ActorHandle]) -> None:
    class Holder:
        def __init__(self) -> None:
            self.ok = 1
            self.lock = threading.Lock()

    with pytest.raises(kt.SerializationError) as info:
        counters[0].say.remote(Holder())
    assert "argument 0.lock" in str(info.value)
    assert "Counter.say" in str(info.value)


def test_blocking_result_times_out(counters: list[kt.ActorHandle]) -> None:
    ref = counters[1].sleep.remote(1.0)
    with pytest.raises(kt.GetTimeoutError):
        ref.result(timeout=0.05)
    assert ref.result(timeout=30) == "slept"


def test_wait_returns_ready_and_pending(counters: list[kt.ActorHandle]) -> None:
    fast = counters[0].get.remote()
    slow = counters[1].sleep.remote(3.0)
    ready, pending = kt.wait([fast, slow], num_returns=1, timeout=10)
    assert not slow.done(), "kt.wait waited for more than num_returns"
    assert ready == [fast] and pending == [slow]
    slow.result(timeout=30)


def test_calling_the_class_directly_says_how() -> None:
    with pytest.raises(TypeError, match=r"Counter.remote"):
        kt.cls(Counter)()


class Cancellable:
    def __init__(self) -> None:
        self.started = False
        self.cancelled = False

    async def wait(self, seconds: float) -> str:
        self.started = True
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "finished"

    def was_cancelled(self) -> bool:
        return self.cancelled

    def has_started(self) -> bool:
        return self.started


def test_cancel_stops_an_async_method(pool: kt.Compute) -> None:
    c = kt.cls(Cancellable).options(compute=pool, cpus=0).remote()
    ref = c.wait.remote(30)
    deadline = time.monotonic() + 30  # a cancel that arrives first stops it from starting
    while not c.has_started() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ref.cancel()
    with pytest.raises(kt.CancelledError):
        ref.result(timeout=5)
    deadline = time.monotonic() + 10
    while not c.was_cancelled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.was_cancelled()


def test_await_refs_in_user_event_loop_with_timeout(counters: list[kt.ActorHandle]) -> None:
    async def main() -> tuple[int, bool]:
        value = await kt.get_async(counters[0].get.remote(), timeout=10)
        try:
            await kt.get_async(counters[1].sleep.remote(2.0), timeout=0.1)
        except kt.GetTimeoutError:
            return value, True
        return value, False

    value, timed_out = asyncio.run(main())
    assert isinstance(value, int) and timed_out


def test_generator_items_arrive_as_they_are_made(counters: list[kt.ActorHandle]) -> None:
    for method in (counters[0].count_slowly, counters[0].acount_slowly):
        arrivals = []
        for i, made in method.remote(3, 1.5):
            arrivals.append((i, made, time.time()))
        assert [i for i, _, _ in arrivals] == [0, 1, 2]
        first_arrived = arrivals[0][2]
        last_made = arrivals[-1][1]
        assert first_arrived < last_made - 1.0, "items were held back until the end"
