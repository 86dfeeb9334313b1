"""The driver's own /metrics: its scheduler's pools, pods and waiting placements.

Served on 127.0.0.1:`kt.config.metrics_port` (KT_METRICS_PORT) by prometheus-client's
HTTP server (a thread) when that is set; each scrape reads the driver's pools as they are
then (plain attribute reads of lists and ints; the scheduler's loop is the only writer).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from kt.actors.driver import Driver


def families(driver: Driver) -> Iterator[Any]:
    pods = GaugeMetricFamily("kt_driver_pool_pods", "pods of each pool", labels=["pool"])
    starting = GaugeMetricFamily(
        "kt_driver_pods_starting", "pods asked for, not ready yet", labels=["pool"]
    )
    waiting = GaugeMetricFamily(
        "kt_driver_placements_waiting", "actors waiting for room in a pool", labels=["pool"]
    )
    actors = GaugeMetricFamily("kt_driver_pool_actors", "actors placed on a pool", labels=["pool"])
    for name, pool in sorted(dict(driver.pools).items()):
        slots = list(pool.slots)
        pods.add_metric([name], len(slots))
        starting.add_metric([name], sum(s.launching for s in slots))
        waiting.add_metric([name], pool.waiting)
        actors.add_metric([name], sum(len(s.actors) for s in slots))
    yield from (pods, starting, waiting, actors)
    owned = GaugeMetricFamily("kt_driver_actors", "actors this driver owns")
    owned.add_metric([], len(driver.actors))
    yield owned


def serve(driver: Driver, port: int, host: str = "127.0.0.1") -> int:
    """Start serving; the port it listens on (`port` 0: a free one)."""

    class DriverCollector:
        def collect(self) -> Iterator[Any]:
            return families(driver)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DriverCollector())
    server, _ = start_http_server(port, host, registry)
    return int(server.server_port)
