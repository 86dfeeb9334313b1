"""Load and chaos drivers shared by `bench/` (full size) and `tests/reliability` (bounded).

Every call carries its caller and sequence number and its actor answers with them and its
own index, so a result that is lost, duplicated or delivered to the wrong Ref shows as a
mismatch. `soak` measures the driver's and the supervisors' RSS between two phases;
`chaos` kills a random actor process at points spread over the calls while they run, and
reads the executions each actor appended to its file, so "never ran twice" is counted,
not assumed.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import kt
from kt.core.errors import GetTimeoutError, KtError


class Echo:
    """A light actor: answers (caller, seq, index) and, with a log, appends each execution."""

    def __init__(self, index: int, log: str | None = None) -> None:
        self.index = index
        self.calls = 0
        self._fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if log else None

    def echo(self, caller: int, seq: int) -> tuple[int, int, int]:
        self.calls += 1
        if self._fd is not None:  # one write under PIPE_BUF: atomic with O_APPEND
            os.write(self._fd, f"{caller} {seq}\n".encode())
        return caller, seq, self.index

    def count(self) -> int:
        return self.calls

    def pid(self) -> int:
        return os.getpid()

    def supervisor_pid(self) -> int:
        return int(os.environ["KT_SUPERVISOR_PID"])


@dataclass
class Tally:
    """What the callers saw: each call is exactly one of ok, wrong, hung or a typed error."""

    calls: int = 0
    ok: int = 0
    wrong: int = 0  # a result that is not this call's own
    hung: int = 0  # no outcome within the timeout
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: set[tuple[int, int]] = field(default_factory=set)  # (caller, seq) that raised
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.calls += other.calls
        self.ok += other.ok
        self.wrong += other.wrong
        self.hung += other.hung
        self.errors.update(other.errors)
        self.failed |= other.failed

    @property
    def accounted(self) -> bool:
        """Every call ended in exactly one outcome."""
        return self.ok + self.wrong + self.hung + sum(self.errors.values()) == self.calls


class Gate:
    """Holds callers back so that a killer keeps pace with the calls, whatever the
    machine's speed: a caller may start a batch only while fewer than `allowed` calls have
    been sent; the killer raises `allowed` after each kill. `wait_s` bounds a wait, so a
    killer that cannot kill slows the run down without hanging it."""

    def __init__(self, allowed: int, wait_s: float = 30.0) -> None:
        self._cond = threading.Condition()
        self.sent = 0
        self.allowed = allowed
        self.wait_s = wait_s

    def admit(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.sent < self.allowed, timeout=self.wait_s)
            self.sent += n

    def reached(self, sent: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.sent >= sent, timeout=timeout)

    def allow(self, more: int) -> None:
        with self._cond:
            self.allowed += more
            self._cond.notify_all()


def _caller(
    me: int,
    actors: Sequence[Any],
    calls: int,
    window: int,
    timeout: float,
    out: Tally,
    gate: Gate | None,
) -> None:
    seq = 0
    while seq < calls:
        batch = []
        n = min(window, calls - seq)
        if gate is not None:
            gate.admit(n)
        for _ in range(n):
            index = (me + seq) % len(actors)
            batch.append((seq, index, actors[index].echo.remote(me, seq)))
            seq += 1
        for s, index, ref in batch:
            out.calls += 1
            try:
                value = ref.result(timeout=timeout)
            except GetTimeoutError:
                out.hung += 1
            except KtError as exc:
                out.errors[type(exc).__name__] += 1
                out.failed.add((me, s))
            else:
                if tuple(value) == (me, s, index):
                    out.ok += 1
                else:
                    out.wrong += 1


def drive(
    actors: Sequence[Any],
    calls: int,
    callers: int = 4,
    window: int = 64,
    timeout: float = 60.0,
    gate: Gate | None = None,
) -> Tally:
    """`calls` calls in all from `callers` threads, round robin over `actors`."""
    tallies = [Tally() for _ in range(callers)]
    share = [calls // callers + (i < calls % callers) for i in range(callers)]
    threads = [
        threading.Thread(
            target=_caller, args=(i, actors, share[i], window, timeout, tallies[i], gate)
        )
        for i in range(callers)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Tally(seconds=time.perf_counter() - start)
    for tally in tallies:
        total.add(tally)
    return total


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@dataclass
class Soak:
    first: Tally
    rest: Tally
    executions: int  # what the actors counted, all phases
    driver_rss: tuple[int, int]  # after the first phase, at the end
    supervisor_rss: tuple[int, int]

    @staticmethod
    def growth(pair: tuple[int, int]) -> float:
        return pair[1] / pair[0] - 1.0


def soak(actors: Sequence[Any], calls: int, first: float = 0.2, callers: int = 4) -> Soak:
    """`calls` calls in two phases (`first` of them, then the rest), RSS after each."""
    supervisors = sorted(set(kt.get([a.supervisor_pid.remote() for a in actors], timeout=60)))

    def sample() -> tuple[int, int]:
        return rss(os.getpid()), sum(rss(pid) for pid in supervisors)

    before = int(calls * first)
    one = drive(actors, before, callers)
    driver_a, sup_a = sample()
    two = drive(actors, calls - before, callers)
    driver_b, sup_b = sample()
    executions = sum(kt.get([a.count.remote() for a in actors], timeout=60))
    return Soak(one, two, executions, (driver_a, driver_b), (sup_a, sup_b))


@dataclass
class Chaos:
    tally: Tally
    kills: int
    ran_twice: list[tuple[int, int]]  # executions seen more than once where retries are off
    not_run: list[tuple[int, int]]  # returned ok yet never executed (a result from nowhere)


def chaos(
    retrying: Sequence[Any],
    plain: Sequence[Any],
    logs: Sequence[Path],
    calls: int,
    kills: int = 20,
    callers: int = 4,
    seed: int = 0,
) -> Chaos:
    """Callers over `retrying` + `plain` actors while a thread SIGKILLs a random one's
    process after every `calls / (kills + 1)` calls sent, so the run sees `kills` kills
    spread over it on a fast machine as on a slow one. `logs[i]` is where `plain[i]`
    appends its executions."""
    actors = [*retrying, *plain]
    step = max(1, calls // (kills + 1))
    gate = Gate(allowed=step)
    stop = threading.Event()
    done = 0

    def killer() -> None:
        nonlocal done
        rng = random.Random(seed)
        while not stop.is_set() and done < kills:
            if not gate.reached(gate.allowed, timeout=0.5):
                continue
            victim = rng.choice(actors)
            try:
                os.kill(victim.pid.remote().result(timeout=10), signal.SIGKILL)
            except (KtError, ProcessLookupError):
                continue  # it is dead or restarting already: choose another
            done += 1
            gate.allow(step)
        gate.allow(calls)  # no more kills: let the callers finish

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        tally = drive(actors, calls, callers, gate=gate)
    finally:
        stop.set()
        thread.join(timeout=30)
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    for log in logs:
        for line in log.read_text().splitlines():
            caller, seq = line.split()
            seen[(int(caller), int(seq))] += 1
    twice = sorted(k for k, n in seen.items() if n > 1)
    # the calls to plain actors: seq s of caller c went to actor (c + s) % len(actors)
    offset = len(retrying)
    plain_calls = [
        (c, s)
        for c in range(callers)
        for s in range(calls // callers + (c < calls % callers))
        if (c + s) % len(actors) >= offset
    ]
    not_run = [k for k in plain_calls if k not in tally.failed and seen[k] == 0]
    return Chaos(tally, done, twice, not_run)
