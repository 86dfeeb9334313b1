"""The driver's /metrics (KT_METRICS_PORT): its pools, their pods, and waiting placements.

Behaviours covered: a driver started with KT_METRICS_PORT serves on 127.0.0.1 there; with
one actor holding a one-pod pool's only cpu and a second waiting for room, a scrape
(parsed by prometheus-client) shows the pool's 1 pod, 0 starting, 1 actor placed, 1
placement waiting and 2 actors owned; once the first is killed, none waits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.distributed.torchrun import free_port

pytestmark = pytest.mark.timeout(120)

DRIVER = r"""
import sys, time, kt
class Holder:
    def ping(self):
        return "pong"
kt.config.placement_timeout = 300
pool = kt.Compute(cpus=1, replicas=1, backend="local", name=sys.argv[1])
first = kt.cls(Holder).options(compute=pool).remote()
assert first.ping() == "pong"
second = kt.cls(Holder).options(compute=pool).remote()  # waits for room
pending = second.ping.remote()
print("ready", flush=True)
sys.stdin.readline()
kt.kill(first)
assert pending.result(timeout=60) == "pong"
print("placed", flush=True)
sys.stdin.readline()
"""


def _scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("pool", ""))] = s.value
    return out


def _until(port: int, key: tuple[str, str], value: float) -> dict[Any, float]:
    deadline = time.monotonic() + 30
    while True:
        got = _scrape(port)
        if got.get(key) == value or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_the_driver_serves_its_schedulers_metrics(tmp_path: Any) -> None:
    port = free_port()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    pool = "metered"
    env = {**os.environ, "KT_METRICS_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, str(script), pool],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        got = _until(port, ("kt_driver_placements_waiting", pool), 1)
        assert got[("kt_driver_placements_waiting", pool)] == 1
        assert got[("kt_driver_pool_pods", pool)] == 1
        assert got[("kt_driver_pods_starting", pool)] == 0
        assert got[("kt_driver_pool_actors", pool)] == 1
        assert got[("kt_driver_actors", "")] == 2
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "placed"
        assert _scrape(port)[("kt_driver_placements_waiting", pool)] == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
