"""Promises the README makes that no test held before (issue 10's list).

Behaviours covered:
- gpus and memory requests are placed against what a pod advertises: too much for an
  empty pod fails at once, a full pod makes the next request wait and then fail;
- `max_restarts` re-runs `__init__` in a new process: state starts over, the handle
  keeps working;
- `kt logs POOL -f` keeps printing what actors print after it started;
- `kt teardown --all` deletes every pool of the kt home, detached ones included, and
  their processes are gone (psutil).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import kt
from kt.actors.driver import get_driver


class Sized:
    def ping(self) -> int:
        return os.getpid()


def test_gpu_and_memory_requests_are_placed_against_the_pod() -> None:
    env = {"KT_GPUS": "2"}  # the pod's devices, faked: this machine has none
    compute = kt.Compute(cpus=4, gpus=2, memory="1Gi", replicas=1, backend="local", env=env)
    S = kt.cls(Sized).options(compute=compute, cpus=0)
    with pytest.raises(kt.PlacementError, match="3 gpus > 2"):
        S.options(gpus=3).remote().ping()
    with pytest.raises(kt.PlacementError, match="memory"):
        S.options(memory="2Gi").remote().ping()
    held = [S.options(gpus=1, memory="400Mi").remote() for _ in range(2)]
    assert len({h.ping() for h in held}) == 2
    with pytest.raises(kt.PlacementError, match="is full"):
        S.options(gpus=1, placement_timeout=1).remote().ping()
    with pytest.raises(kt.PlacementError, match="is full"):
        S.options(memory="400Mi", placement_timeout=1).remote().ping()
    assert S.options(memory="200Mi").remote().ping() > 0  # what is left still fits
    for h in held:
        kt.kill(h)


class Inits:
    def __init__(self, path: str) -> None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n

    def pid(self) -> int:
        return os.getpid()


@pytest.mark.timeout(90)
def test_a_restart_runs_init_again(pool: kt.Compute, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "inits"
    a = kt.cls(Inits).options(compute=pool, cpus=0, max_restarts=1).remote(str(log))
    assert [a.bump(), a.bump()] == [1, 2]
    first = a.pid()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert a.bump() == 1, "the restarted actor kept its old state"
            break
        except kt.ActorDiedError:
            assert time.monotonic() < deadline, "the actor was not restarted"
            time.sleep(0.2)
    pids = log.read_text().split()
    assert len(pids) == 2 and pids[0] == str(first) and pids[1] == str(a.pid())
    kt.kill(a)


class Talker:
    def say(self, text: str) -> str:
        print(text, flush=True)
        return text


@pytest.mark.timeout(60)
def test_kt_logs_follow_prints_what_comes_later() -> None:
    compute = kt.Compute(cpus=1, replicas=1, backend="local")
    t = kt.cls(Talker).options(compute=compute, cpus=0).remote()
    t.say("before following")
    pool = get_driver().pool_name(compute, False)
    follower = subprocess.Popen(
        [sys.executable, "-m", "kt.cli", "logs", pool, "-f"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # it has read what was there and now follows
        t.say("said while following")
        assert follower.stdout is not None
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True).start()
        deadline = time.monotonic() + 20
        seen = ""
        while "said while following" not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = "".join(lines)
        assert "before following" in seen and "said while following" in seen, seen
        assert follower.poll() is None, "kt logs -f exited instead of following"
    finally:
        follower.kill()
        follower.wait()
    kt.kill(t)


MAKER = textwrap.dedent(
    """
    import os, kt
    class Box:
        def pid(self):
            return os.getppid()  # the zygote's parent: the pod's supervisor
    for name in ("one", "two"):
        c = kt.Compute(cpus=1, replicas=1, backend="local", name="all-" + name)
        kt.cls(Box).options(compute=c, cpus=0, lifetime="detached").remote().pid()
    """
)


@pytest.mark.timeout(120)
def test_teardown_all_deletes_every_pool(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, KT_HOME=str(tmp_path / "home"))
    made = subprocess.run(
        [sys.executable, "-c", MAKER], env=env, capture_output=True, text=True, timeout=90
    )
    assert made.returncode == 0, made.stderr[-3000:]
    files = sorted((tmp_path / "home" / "local").glob("*/*.json"))
    assert {f.parent.name for f in files} == {"all-one-detached", "all-two-detached"}
    supervisors = [psutil.Process(json.loads(f.read_text())["pid"]) for f in files]
    out = subprocess.run(
        [sys.executable, "-m", "kt.cli", "teardown", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "deleted 2 pod(s)" in out.stdout, out.stdout + out.stderr
    _, alive = psutil.wait_procs(supervisors, timeout=10)
    assert not alive
