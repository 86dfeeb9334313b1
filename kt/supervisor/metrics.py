"""What a pod's supervisor counts for `/metrics`, and the Prometheus families made of it.

Who calls it: the supervisor, for each call it relays (`MethodStats.started` as the CALL
goes to the actor, `done` when its RESULT comes back or the actor dies), for the bytes
callers send and get, and for the time code sync and image steps take; the control app
(`kt.supervisor.control`) turns it into Prometheus text when scraped (`families`). The
hot path touches plain ints and floats only: no prometheus-client objects and no locks
(the supervisor's loop is the only writer; a scrape reads between its steps).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Call-latency bucket bounds in seconds (+Inf follows)."""


@dataclass
class MethodStats:
    """One method of one actor class on this pod."""

    started: int = 0
    finished: int = 0
    failed: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds: float = 0.0

    def done(self, failed: bool, seconds: float) -> None:
        if failed:
            self.failed += 1
        else:
            self.finished += 1
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds


@dataclass
class Durations:
    """How often something ran and for how long in all."""

    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


@dataclass
class PodStats:
    methods: dict[tuple[str, str], MethodStats] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    restarts: dict[str, int] = field(default_factory=dict)  # actor class -> restarts here
    sync: Durations = field(default_factory=Durations)
    image: Durations = field(default_factory=Durations)

    def method(self, cls: str, name: str) -> MethodStats:
        stats = self.methods.get((cls, name))
        if stats is None:
            stats = self.methods[(cls, name)] = MethodStats()
        return stats


def families(
    stats: PodStats, actors: list[dict[str, Any]], processes: list[dict[str, Any]], callers: int
) -> Iterator[Any]:
    """The Prometheus families: `actors` as `Supervisor.status()` lists them, `processes`
    {"cls", "actor", "rss", "cpu"} for each live actor process."""
    labels = ["cls", "method"]
    started = CounterMetricFamily("kt_calls_started", "calls relayed to an actor", labels=labels)
    finished = CounterMetricFamily("kt_calls_finished", "calls that returned", labels=labels)
    failed = CounterMetricFamily("kt_calls_failed", "calls that raised or died", labels=labels)
    inflight = GaugeMetricFamily("kt_calls_in_flight", "calls not answered yet", labels=labels)
    latency = HistogramMetricFamily(
        "kt_call_seconds", "from relaying a call to its result", labels=labels
    )
    for (cls, name), m in sorted(stats.methods.items()):
        started.add_metric([cls, name], m.started)
        finished.add_metric([cls, name], m.finished)
        failed.add_metric([cls, name], m.failed)
        inflight.add_metric([cls, name], m.started - m.finished - m.failed)
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], m.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric([cls, name], buckets, m.seconds)
    yield from (started, finished, failed, inflight, latency)
    state = GaugeMetricFamily("kt_actors", "actors hosted on this pod", labels=["state"])
    for name in ("starting", "alive", "dead"):
        state.add_metric([name], sum(a["state"] == name for a in actors))
    yield state
    restarts = CounterMetricFamily("kt_actor_restarts", "actors made again here", labels=["cls"])
    for cls, n in sorted(stats.restarts.items()):
        restarts.add_metric([cls], n)
    yield restarts
    rss = GaugeMetricFamily("kt_actor_rss_bytes", "actor process memory", labels=["cls", "actor"])
    cpu = CounterMetricFamily("kt_actor_cpu_seconds", "actor process CPU", labels=["cls", "actor"])
    for p in processes:
        rss.add_metric([p["cls"], p["actor"]], p["rss"])
        cpu.add_metric([p["cls"], p["actor"]], p["cpu"])
    yield from (rss, cpu)
    traffic = CounterMetricFamily("kt_bytes", "call-channel bytes", labels=["direction"])
    traffic.add_metric(["in"], stats.bytes_in)
    traffic.add_metric(["out"], stats.bytes_out)
    yield traffic
    for what, durations in (("sync", stats.sync), ("image", stats.image)):
        family = CounterMetricFamily(f"kt_{what}_seconds", f"time spent in {what} requests")
        family.add_metric([], durations.seconds)
        yield family
        runs = CounterMetricFamily(f"kt_{what}_requests", f"{what} requests served")
        runs.add_metric([], durations.count)
        yield runs
    peers = GaugeMetricFamily("kt_callers", "connected callers")
    peers.add_metric([], callers)
    yield peers
