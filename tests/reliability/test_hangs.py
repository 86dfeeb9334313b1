"""Hung processes, not dead ones: SIGSTOP an actor, SIGSTOP a supervisor (both backends,
the k8s one on the test cluster).

Behaviours covered:
- an actor process stopped with SIGSTOP: a call with a timeout raises GetTimeoutError;
  the other actor on the same pod keeps serving; kt.kill still ends the stopped process;
- a supervisor stopped with SIGSTOP keeps its socket open, so only silence shows it: the
  caller's heartbeat (a PING a second on a link with calls waiting) fails the call in
  flight with PodLostError within kt.config.heartbeat_timeout (5 s) plus a tick; the pod
  does not answer a HELLO, so the driver takes it as lost: it is deleted (its processes
  killed) and the actor with a restart left answers from a new pod;
- a driver whose stdout nobody reads (a paused pager, a pipe never read): an actor
  printing 500 KB still returns, and later calls too (the logs wait on kt's output
  thread, not on the loop that completes calls); what did not fit is counted on stderr
  once the output is read again.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

import kt
from kt.actors.driver import get_driver

pytestmark = pytest.mark.timeout(120)


class Sleeper:
    def pid(self) -> int:
        return os.getpid()

    def pod(self) -> str:
        return os.environ["KT_POD"]

    def supervisor_pid(self) -> int:
        return int(os.environ["KT_SUPERVISOR_PID"])

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_a_stopped_actor_times_out_and_kt_kill_still_ends_it(backend: str) -> None:
    name = f"hangs-{uuid.uuid4().hex[:6]}"
    pool = kt.Compute(cpus=2, replicas=1, backend=backend, name=name)  # type: ignore[arg-type]
    stopped = kt.cls(Sleeper).options(compute=pool).remote()
    other = kt.cls(Sleeper).options(compute=pool).remote()
    pid = stopped.pid()
    process = psutil.Process(pid)
    assert other.pod() == stopped.pod()
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(kt.GetTimeoutError):
            stopped.pid.remote().result(timeout=2)
        assert other.sleep(0.01) == 0.01  # the pod goes on serving
        kt.kill(stopped)
        assert not psutil.wait_procs([process], timeout=10)[1]
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_supervisor_is_found_by_heartbeat_and_its_actor_restarts(backend: str) -> None:
    name = f"hangs-{uuid.uuid4().hex[:6]}"
    compute = kt.Compute(cpus=1, min_replicas=0, max_replicas=2, backend=backend, name=name)  # type: ignore[arg-type]
    keep = kt.cls(Sleeper).options(compute=compute, max_restarts=1).remote()
    old_pod = keep.pod()
    driver = get_driver()
    supervisor = psutil.Process(keep.supervisor_pid())
    in_flight = keep.sleep.remote(60)
    time.sleep(0.5)
    supervisor.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(kt.PodLostError, match="no answer for"):
            in_flight.result(timeout=30)
        took = time.monotonic() - started
        assert took < kt.config.heartbeat_timeout + 3, took
        deadline = time.monotonic() + 60
        new_pod = None
        while new_pod is None and time.monotonic() < deadline:
            try:
                new_pod = keep.pod.remote().result(timeout=30)
            except kt.PodLostError:
                time.sleep(0.2)  # sent before the driver learned the pod's fate
        assert new_pod is not None and new_pod != old_pod
        assert not psutil.wait_procs([supervisor], timeout=20)[1]  # the stopped pod is gone
        driver.runtime.run(driver.pools[driver.pool_name(compute, False)].teardown(), timeout=60)
    finally:
        if supervisor.is_running():
            supervisor.kill()


UNREAD_DRIVER = """
import sys, time
import kt
from kt.core import output

output.MAX_PENDING = 10  # so that some lines are dropped while nobody reads
said = open(sys.argv[1], "w", buffering=1)


class Chatty:
    def talk(self, n):
        for i in range(n):
            print("x" * 100, i, flush=True)
        return "done"

    def ping(self):
        return "pong"


pool = kt.Compute(cpus=1, replicas=1, backend="local", name=sys.argv[2])
chatty = kt.cls(Chatty).options(compute=pool, cpus=0).remote()
said.write(f"ping {chatty.ping.remote().result(timeout=60)}\\n")
said.write(f"talk {chatty.talk.remote(5000).result(timeout=60)}\\n")  # 500 KB of output
said.write(f"ping {chatty.ping.remote().result(timeout=30)}\\n")
said.write("end\\n")
time.sleep(5)  # the test reads the output now: the count of what was dropped comes
"""


def test_a_driver_whose_stdout_nobody_reads_still_gets_its_results(
    tmp_path: pathlib.Path,
) -> None:
    script, said, errors = tmp_path / "driver.py", tmp_path / "said", tmp_path / "stderr"
    script.write_text(UNREAD_DRIVER)
    argv = [sys.executable, str(script), str(said), f"unread-{uuid.uuid4().hex[:6]}"]
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)  # never read...
        try:
            deadline = time.monotonic() + 100
            while "end" not in (said.read_text() if said.exists() else ""):
                assert proc.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, said.read_text() + errors.read_text()
                time.sleep(0.2)
            assert said.read_text().split("\n")[:3] == ["ping pong", "talk done", "ping pong"]
            out, _ = proc.communicate(timeout=60)  # ... until now
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert out.count(b"x" * 100) > 100  # what was queued came out
    assert b"lines of output dropped: nothing read them for a while" in errors.read_bytes()
