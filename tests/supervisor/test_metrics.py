"""A pod's /metrics (prometheus-client text), read with prometheus-client's own parser.

Behaviours covered:
- without the pool's token /metrics is 401, and the token is not in what it serves;
- after 25 calls of one method, 3 that raise and one in flight on a local pod: calls
  started, finished and failed per class and method, the in-flight gauge, a latency
  histogram whose count is the calls that ended, actors by state, each actor process's
  RSS and CPU, call-channel bytes both ways, a restart counted per class, and the time
  the pod spent in code sync.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kt
from kt.actors.driver import get_driver

pytestmark = pytest.mark.timeout(120)


class Meter:
    def tick(self, i: int) -> int:
        return i

    def boom(self) -> None:
        raise ValueError("boom")

    def wait(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def die(self) -> None:
        import os

        os._exit(1)


def _scrape(address: tuple[str, int], token: str | None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://{address[0]}:{address[1] + 1}/metrics"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return str(r.read().decode())


def _samples(text: str) -> dict[tuple[str, frozenset[Any]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_the_calls_made() -> None:
    compute = kt.Compute(
        cpus=2, replicas=1, backend="local", name=f"metrics-{uuid.uuid4().hex[:6]}"
    )
    meter = kt.cls(Meter).options(compute=compute, max_restarts=1).remote()
    assert kt.get([meter.tick.remote(i) for i in range(25)]) == list(range(25))
    for _ in range(3):
        with pytest.raises(ValueError):
            meter.boom()
    with pytest.raises(kt.ActorDiedError):
        meter.die()
    assert meter.tick(7) == 7  # restarted on the same pod
    waiting = meter.wait.remote(3)
    time.sleep(0.5)
    driver = get_driver()
    name = driver.pool_name(compute, False)
    (slot,) = driver.pools[name].slots
    token = driver.pools[name].token
    with pytest.raises(urllib.error.HTTPError) as refused:
        _scrape(slot.pod.address, None)
    assert refused.value.code == 401
    text = _scrape(slot.pod.address, token)
    assert token not in text
    got = _samples(text)

    def value(metric: str, **labels: str) -> float:
        return got[(metric, frozenset(labels.items()))]

    tick = {"cls": "Meter", "method": "tick"}
    assert value("kt_calls_started_total", **tick) == 26
    assert value("kt_calls_finished_total", **tick) == 26
    assert value("kt_calls_failed_total", **tick) == 0
    assert value("kt_call_seconds_count", **tick) == 26
    assert value("kt_call_seconds_bucket", **tick, le="+Inf") == 26
    assert value("kt_calls_failed_total", cls="Meter", method="boom") == 3
    assert value("kt_calls_failed_total", cls="Meter", method="die") == 1
    assert value("kt_calls_in_flight", cls="Meter", method="wait") == 1
    assert value("kt_actors", state="alive") == 1 and value("kt_actors", state="dead") == 0
    assert value("kt_actor_restarts_total", cls="Meter") == 1
    (rss,) = [v for (n, labels), v in got.items() if n == "kt_actor_rss_bytes"]
    assert rss > 10 * 2**20
    assert any(n == "kt_actor_cpu_seconds_total" and v > 0 for (n, _), v in got.items())
    assert value("kt_bytes_total", direction="in") > 0
    assert value("kt_bytes_total", direction="out") > 0
    assert value("kt_sync_requests_total") >= 1  # this project was synced to the pod
    assert waiting.result(timeout=30) == 3
    driver.runtime.run(driver.pools[name].teardown(), timeout=60)
