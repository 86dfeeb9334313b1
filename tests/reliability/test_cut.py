"""The connection between driver and pod cut from the pod's side, calls in flight.

The cut is the kernel's: `ss -K` destroys the supervisor's end of every TCP connection
to its port (a RST reaches the driver), the way a pod-side proxy, a conntrack flush or a
NAT timeout ends one; the pod itself and its actor live on. On both backends (the k8s one
on the test cluster). Behaviours covered:
- calls in flight fail with PodLostError, whose message says the call may or may not
  have run, within a second or so; the driver reconnects by itself and the next call is
  served by the same actor process, state intact;
- a call not marked retryable never runs twice: the actor counts its executions;
- with max_task_retries, the calls in flight are sent again once the pod answers, and
  every one returns its result.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import time
import uuid
from typing import Any

import pytest

import kt

pytestmark = pytest.mark.timeout(120)


class Counter:
    def __init__(self) -> None:
        self.runs: collections.Counter[int] = collections.Counter()

    def work(self, i: int, hold: float) -> int:
        self.runs[i] += 1
        time.sleep(hold)
        return i

    def runs_of(self) -> dict[int, int]:
        return dict(self.runs)

    def where(self) -> tuple[int, str]:
        return os.getpid(), os.environ["KT_SUPERVISOR_ADDR"]


def _cut(address: str) -> None:
    """Destroy the pod's end of every TCP connection to the supervisor at `address`."""
    host, port = address.rsplit(":", 1)
    out = subprocess.run(
        ["ss", "-K", "-t", "src", host, "sport", "=", port],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert f"{host}:{port}" in out.stdout, f"ss -K found no connection to cut: {out}"


@pytest.fixture(scope="module", autouse=True)
def _can_cut() -> None:
    """`ss -K` needs CAP_NET_ADMIN and a kernel with socket destroy: probe it once."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = str(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", int(port))) as client:
            accepted, _ = server.accept()
            with accepted:
                try:
                    subprocess.run(
                        ["ss", "-K", "-t", "src", "127.0.0.1", "sport", "=", port],
                        capture_output=True,
                        timeout=10,
                    )
                except FileNotFoundError:
                    pytest.skip("cannot cut connections here: no `ss` (iproute2)")
                client.settimeout(2)
                try:
                    client.recv(1)
                except ConnectionResetError:
                    return  # cut
                except TimeoutError:
                    pass
    pytest.skip("cannot cut connections here: `ss -K` needs CAP_NET_ADMIN and sock_destroy")


def _counter(retries: int, backend: str) -> Any:
    name = f"cut-{uuid.uuid4().hex[:6]}"
    pool = kt.Compute(cpus=1, replicas=1, backend=backend, name=name)  # type: ignore[arg-type]
    return kt.cls(Counter).options(compute=pool, max_task_retries=retries).remote()


def test_a_cut_fails_calls_in_flight_saying_they_may_have_run_and_none_runs_twice(
    backend: str,
) -> None:
    counter = _counter(retries=0, backend=backend)
    try:
        pid, address = counter.where()
        refs = [counter.work.remote(i, 0.5) for i in range(6)]
        time.sleep(0.3)  # call 0 runs, the rest wait in the actor's queue
        _cut(address)
        start = time.monotonic()
        for ref in refs:
            with pytest.raises(kt.PodLostError, match="may or may not have run"):
                ref.result(timeout=30)
        assert time.monotonic() - start < 5
        assert counter.where() == (pid, address)  # reconnected, to the same process
        assert counter.work(100, 0.0) == 100
        time.sleep(3.5)  # what the actor had queued runs out (replies go nowhere)
        runs = counter.runs_of()
        assert runs.get(0) == 1  # it was running when the cut came
        assert all(n == 1 for n in runs.values()), runs  # nothing ran twice
    finally:
        kt.kill(counter)


def test_a_cut_with_retries_sends_the_calls_again_and_all_return(backend: str) -> None:
    counter = _counter(retries=3, backend=backend)
    try:
        pid, address = counter.where()
        refs = [counter.work.remote(i, 0.2) for i in range(6)]
        time.sleep(0.3)
        _cut(address)
        assert [ref.result(timeout=60) for ref in refs] == list(range(6))
        assert counter.where() == (pid, address)
        runs = counter.runs_of()
        assert set(runs) == set(range(6))
        assert sum(runs.values()) > 6  # the one running at the cut ran again: retryable
    finally:
        kt.kill(counter)
