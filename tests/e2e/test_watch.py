"""The driver learns of a lost pod from the provider's watch, not only from a broken link.

Behaviour covered: a pod whose supervisor goes silent (SIGSTOP: its TCP peer stays open,
as a partitioned node's does) and whose record the backend deletes is noticed from the
watch within 2 s with no call in flight: a call made then fails at once with
ActorDiedError (a stopped pod would never answer it), and the driver deletes the pod
for real (its processes are gone, checked with psutil).
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

import kt
from kt.actors.driver import get_driver
from kt.local.provider import kt_home


class Box:
    def pid(self) -> int:
        return os.getpid()


@pytest.mark.timeout(60)
def test_a_pod_deleted_behind_kts_back_is_noticed_from_the_watch() -> None:
    compute = kt.Compute(cpus=1, replicas=1, backend="local", name="watched")
    box = kt.cls(Box).options(compute=compute, cpus=0).remote()
    actor = psutil.Process(box.pid())
    pool = get_driver().pool_name(compute, False)
    (record,) = (kt_home() / "local" / pool).glob("*.json")
    supervisor = psutil.Process(json.loads(record.read_text())["pid"])
    os.killpg(supervisor.pid, signal.SIGSTOP)  # silent, but its sockets stay open
    record.unlink()  # the backend says the pod is gone
    time.sleep(2.0)  # no call in flight: only the watch can tell the driver
    with pytest.raises(kt.ActorDiedError, match="pod was lost"):
        box.pid.remote().result(timeout=1)  # at once: a stopped pod would never answer
    _, alive = psutil.wait_procs([supervisor, actor], timeout=10)
    assert not alive, f"the driver did not delete the pod: {alive}"
