"""What a Ray user tries on day one: each snippet of the newcomer trial, as it should go.

Behaviours covered:
- a remote `sys.exit`, `KeyboardInterrupt` (async method too) and an argparse error arrive
  as `kt.RemoteError` naming what was raised; the driver goes on, so does the actor, and
  argparse names the actor, not `zygote.py`;
- a user exception whose `__init__` does not take its args back is caught by
  `except MyErr` and by `except kt.RemoteError`, with its attributes and the remote
  traceback;
- `@kt.fn` works like `@ray.remote`: `.remote()` on the default pool, `.options()`;
  calling it directly, `kt.fn(SomeClass)` and `kt.cls(a_function)` are refused with the
  right verb in the message;
- mistakes get the fix in the message: Ray's option names, a misspelt Compute field,
  `kt.get(5)`, `kt.wait(ref)`, `kt.get(stream)`, timeouts printed as `0.5 s`;
- a full fixed pool says, in words and on the terminal when the wait starts, what it
  has, who holds it and the ways out;
- after `kt.shutdown()` an old handle says the runtime was shut down; a driver leaves no
  /dev/shm segment and no "Task was destroyed" behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import kt
from kt.core.provider import get_provider


class Quitter:
    def exit_two(self) -> None:
        sys.exit(2)

    async def interrupt(self) -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    def parse(self, argv: list[str]) -> int:
        parser = argparse.ArgumentParser()
        parser.add_argument("--steps", type=int, required=True)
        return int(parser.parse_args(argv).steps)

    def ping(self) -> str:
        return "pong"


def test_remote_base_exceptions_arrive_as_remote_errors(
    pool: kt.Compute, capfd: pytest.CaptureFixture[str]
) -> None:
    q = kt.cls(Quitter).options(compute=pool, cpus=0).remote()
    with pytest.raises(kt.RemoteError) as info:
        q.exit_two()
    assert info.value.type_name == "builtins.SystemExit"
    assert "SystemExit(2)" in str(info.value) and "sys.exit(2)" in info.value.traceback
    with pytest.raises(kt.RemoteError, match=r"KeyboardInterrupt\(\)"):
        q.interrupt()
    with pytest.raises(kt.RemoteError, match=r"SystemExit\(2\)"):
        q.parse(["--stepz", "3"])
    assert q.parse(["--steps", "3"]) == 3
    assert q.ping() == "pong"  # the actor outlived all of it
    printed = ""
    deadline = time.monotonic() + 10  # what the actor printed reaches the driver's terminal
    while "usage: Quitter" not in printed and time.monotonic() < deadline:
        time.sleep(0.1)
        printed += capfd.readouterr().out
    assert "usage: Quitter" in printed and "zygote" not in printed, printed


class Coded(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


class Raiser:
    def fail(self) -> None:
        raise Coded(7, "disk full")


def test_user_exception_keeps_its_type_when_init_does_not_round_trip(pool: kt.Compute) -> None:
    r = kt.cls(Raiser).options(compute=pool, cpus=0).remote()
    with pytest.raises(Coded) as info:
        r.fail()
    exc = info.value
    assert isinstance(exc, kt.RemoteError)
    assert (exc.code, exc.detail) == (7, "disk full")
    assert 'raise Coded(7, "disk full")' in exc.traceback
    assert "Raiser.fail on pod" in str(exc)
    kt.kill(r)


@kt.fn
def square(x: int) -> int:
    return x * x


def test_kt_fn_is_like_ray_remote() -> None:
    assert square.remote(3).result(timeout=60) == 9
    assert kt.get([square.remote(i) for i in range(8)], timeout=60) == [i * i for i in range(8)]
    assert square.options(max_concurrency=2).remote(4).result(timeout=60) == 16
    with pytest.raises(TypeError, match=r"square\.remote\(\.\.\.\)"):
        square(3)
    with pytest.raises(kt.ConfigError, match=r"use kt\.cls\(Quitter\)"):
        kt.fn(Quitter)
    with pytest.raises(kt.ConfigError, match=r"use kt\.fn\(test_kt_fn_is_like_ray_remote\)"):
        kt.cls(test_kt_fn_is_like_ray_remote)  # type: ignore[arg-type]


class Streamer:
    def count(self, n: int) -> object:
        yield from range(n)

    def slow(self) -> int:
        time.sleep(2)
        return 1


def test_mistakes_get_the_fix_in_the_message(pool: kt.Compute) -> None:
    with pytest.raises(kt.ConfigError, match=r"unknown option 'num_cpus' .*did you mean 'cpus'"):
        kt.cls(Streamer).options(num_cpus=2)
    with pytest.raises(kt.ConfigError, match=r"unknown option 'cpu' .*did you mean 'cpus'"):
        kt.Compute(cpu=2)  # type: ignore[call-arg]
    with pytest.raises(kt.ConfigError, match="did you mean 'max_task_retries'"):
        square.options(max_retries=2)
    with pytest.raises(kt.ConfigError, match="takes a Ref or a list of Refs, not int"):
        kt.get(5)  # type: ignore[call-overload]
    s = kt.cls(Streamer).options(compute=pool, cpus=0).remote()
    ref = s.slow.remote()
    with pytest.raises(kt.ConfigError, match=r"a list of Refs, not one Ref: kt\.wait\(\[ref\]\)"):
        kt.wait(ref)  # type: ignore[arg-type]
    with pytest.raises(kt.GetTimeoutError) as info:
        kt.get([ref], timeout=0.5)
    assert str(info.value) == "1 of 1 Refs not ready after 0.5 s"
    with pytest.raises(kt.GetTimeoutError, match=r"not ready after 0\.25 s$"):
        ref.result(timeout=0.25)
    assert ref.result(timeout=30) == 1
    stream = s.count.remote(3)
    with pytest.raises(kt.ConfigError, match="iterate it"):
        kt.get(stream)
    assert list(stream) == [0, 1, 2]  # refusing consumed nothing
    kt.kill(s)


class Holder:
    def ping(self) -> int:
        return os.getpid()


@pytest.mark.timeout(60)
def test_a_full_fixed_pool_says_why_and_what_to_do(capfd: pytest.CaptureFixture[str]) -> None:
    small = kt.Compute(cpus=2, replicas=1, backend="local")
    held = [kt.cls(Holder).options(compute=small).remote() for _ in range(2)]
    assert len({h.ping() for h in held}) == 2
    third = kt.cls(Holder).options(compute=small, placement_timeout=2).remote()
    with pytest.raises(kt.PlacementError) as info:
        third.ping()
    message = str(info.value)
    assert "Request(" not in message and "Strategy" not in message
    for words in ("asks for 1 cpu", "is full", "2 of 2 cpus held by 2 actors", "kt.kill",
                  "cpus=0", "max_replicas=N"):  # fmt: skip
        assert words in message, message
    terminal, deadline = "", time.monotonic() + 10  # kt's output thread writes it
    while "kt.kill" not in terminal and time.monotonic() < deadline:
        terminal += re.sub(r"\s+", " ", capfd.readouterr().err)
        time.sleep(0.05)
    assert re.search(r"waits up to [\d.]+ s: it asks for 1 cpu", terminal), terminal
    assert "kt.kill" in terminal
    for h in held:
        kt.kill(h)


LEAVER = textwrap.dedent(
    """
    import os, uuid
    import numpy as np
    import kt

    class Echo:
        def echo(self, a):
            return a + 1
        def pid(self):
            return os.getpid()

    pool = kt.Compute(cpus=1, replicas=1, backend="local", name=NAME)
    e = kt.cls(Echo).options(compute=pool, cpus=0).remote()
    big = np.zeros(8 << 20, dtype=np.uint8)  # through /dev/shm both ways
    assert int(e.echo(big)[0]) == 1
    print("pids", os.getpid(), e.pid(), flush=True)
    d = kt.cls(Echo).options(compute=pool, cpus=0, name="d-" + uuid.uuid4().hex[:6],
                             lifetime="detached").remote()
    d.pid()
    kt.kill(d)
    kt.shutdown()
    try:
        e.pid()
    except kt.KtError as exc:
        print("after shutdown:", type(exc).__name__, exc, flush=True)
    """
)


@pytest.mark.timeout(120)
def test_a_driver_leaves_nothing_behind() -> None:
    name = f"leaver-{uuid.uuid4().hex[:6]}"
    script = LEAVER.replace("NAME", repr(name))
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=100
        )
    finally:  # the detached pool lives on until its inactivity_ttl: delete it here
        provider = get_provider("local")
        for pod in asyncio.run(provider.list_pods(f"{name}-detached")):
            asyncio.run(provider.delete_pod(pod.pool, pod.name))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after shutdown: ShutdownError kt was shut down" in out.stdout, out.stdout
    assert "Task was destroyed" not in out.stderr, out.stderr[-3000:]
    pids = re.search(r"pids (\d+) (\d+)", out.stdout)
    assert pids is not None
    deadline = time.monotonic() + 10
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [
            name
            for name in os.listdir("/dev/shm")
            if any(name.startswith(f"kt-shm-{pid}-") for pid in pids.groups())
        ]
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"left in /dev/shm: {left}"


class Slow:
    def val(self, x: int, seconds: float) -> int:
        time.sleep(seconds)
        return x

    def die(self, seconds: float) -> None:
        time.sleep(seconds)
        os._exit(3)


class Middle:
    def __init__(self, slow: kt.ActorHandle) -> None:
        self.slow = slow

    def get_all(self, refs: list[kt.Ref[int]]) -> list[int]:
        return list(kt.get(refs, timeout=60))

    def forward(self, x: int) -> kt.Ref[int]:
        return self.slow.val.remote(x, 1.0)  # returned while still running

    def forward_dying(self) -> kt.Ref[None]:
        return self.slow.die.remote(0.5)


@pytest.mark.timeout(90)
def test_refs_passed_or_returned_before_they_resolve_resolve(pool: kt.Compute) -> None:
    slow = kt.cls(Slow).options(compute=pool, cpus=0).remote()
    middle = kt.cls(Middle).options(compute=pool, cpus=0).remote(slow)
    pending = [slow.val.remote(i, 1.0) for i in range(2)]
    assert not any(r.done() for r in pending)
    assert middle.get_all.remote(pending).result(timeout=60) == [0, 1]  # nested in a list
    returned = middle.forward(7)
    assert isinstance(returned, kt.Ref)
    assert kt.get(returned, timeout=60) == 7
    with pytest.raises(kt.ActorDiedError, match="exited with code 3"):
        kt.get(middle.forward_dying(), timeout=60)  # its maker died: an error, not a hang
