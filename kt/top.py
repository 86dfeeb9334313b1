"""`kt top`'s pure part: the rows and the table made of two successive readings.

Who calls it: `kt.cli.cmd_top`, the thin shell that lists the pods, reads each pod's
/status over HTTP, sleeps between readings and shows the table in place. Here, with no
I/O: calls/s from the delta of each actor's `calls` counter over the elapsed time, CPU %
from the delta of its process's CPU seconds (user + system; 100 is one core busy), RSS
as the pod last read it. An actor is matched across readings by pool, pod, id and pid,
so one that appeared (or restarted in a new process) shows no rate until the next
reading, and one that vanished is not shown. A pod whose /status could not be read is
one row saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

COLUMNS = (
    "pool",
    "pod",
    "actor",
    "class",
    "state",
    "calls/s",
    "calls",
    "in flight",
    "RSS MiB",
    "CPU %",
)
"""The table's header; the last five are numbers, right-aligned."""

_MiB = 1 << 20
_ERROR_CHARS = 120  # a connection error's text, cut so the table stays readable


@dataclass(frozen=True)
class PodReading:
    """One pod's /status as read at one refresh, or {"error": text} when it could not be."""

    pool: str
    pod: str
    status: dict[str, Any]


@dataclass(frozen=True)
class ActorRow:
    """One line of the table: an actor, or a pod without one (actor "-")."""

    pool: str
    pod: str
    actor: str
    cls: str
    state: str
    calls_per_s: float | None = None
    calls: int | None = None
    inflight: int | None = None
    rss: int | None = None
    cpu_percent: float | None = None


_Key = tuple[str, str, str, object]


def _key(reading: PodReading, actor: dict[str, Any]) -> _Key:
    return reading.pool, reading.pod, str(actor["id"]), actor.get("pid")


def _actors(reading: PodReading) -> list[dict[str, Any]]:
    actors = reading.status.get("actors")
    return [a for a in actors if isinstance(a, dict)] if isinstance(actors, list) else []


def rate(now: float | None, then: float | None, elapsed: float) -> float | None:
    """How fast a counter grew per second; None without two readings, or when it went
    back (a counter that started again)."""
    if now is None or then is None or elapsed <= 0 or now < then:
        return None
    return (now - then) / elapsed


def _actor_row(
    reading: PodReading, actor: dict[str, Any], before: dict[str, Any] | None, elapsed: float
) -> ActorRow:
    then = before or {}
    cpu = rate(actor.get("cpu"), then.get("cpu"), elapsed)
    return ActorRow(
        pool=reading.pool,
        pod=reading.pod,
        actor=str(actor.get("name") or actor["id"]),
        cls=str(actor.get("class", "?")),
        state=str(actor.get("state", "?")),
        calls_per_s=rate(actor.get("calls"), then.get("calls"), elapsed),
        calls=actor.get("calls"),
        inflight=actor.get("inflight"),
        rss=actor.get("rss"),
        cpu_percent=None if cpu is None else 100 * cpu,
    )


def _pod_rows(
    reading: PodReading, earlier: dict[_Key, dict[str, Any]], elapsed: float
) -> list[ActorRow]:
    if "error" in reading.status:
        why = f"unreachable: {reading.status['error']}"[:_ERROR_CHARS]
        return [ActorRow(reading.pool, reading.pod, "-", "-", why)]
    actors = _actors(reading)
    if not actors:
        return [ActorRow(reading.pool, reading.pod, "-", "-", "no actors")]
    return [_actor_row(reading, a, earlier.get(_key(reading, a)), elapsed) for a in actors]


def rows(
    before: list[PodReading] | None, after: list[PodReading], elapsed: float
) -> list[ActorRow]:
    """The table's rows for the `after` reading, with rates over the `elapsed` seconds
    since `before` (None at the first refresh: no rates yet)."""
    earlier = {_key(r, a): a for r in before or [] for a in _actors(r)}
    return [row for reading in after for row in _pod_rows(reading, earlier, elapsed)]


def _number(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.1f}"


def _cells(row: ActorRow) -> tuple[str, ...]:
    return (
        row.pool,
        row.pod,
        row.actor,
        row.cls,
        row.state,
        _number(row.calls_per_s),
        "-" if row.calls is None else str(row.calls),
        "-" if row.inflight is None else str(row.inflight),
        _number(row.rss, _MiB),
        _number(row.cpu_percent),
    )


def table(actor_rows: list[ActorRow], *, interval: float) -> Table:
    """The rich Table of `rows`, captioned with the refresh interval."""
    out = Table(*COLUMNS, caption=f"every {interval:g} s; Ctrl-C stops")
    for column in out.columns[:2]:
        column.no_wrap = True  # a pod name cut short cannot be passed to `kt logs --pod`
    for column in out.columns[5:]:
        column.justify = "right"
    for row in actor_rows:
        out.add_row(*_cells(row))
    return out


def no_pods(pool: str | None) -> str:
    """What `kt top` says when there is nothing to show, as `kt list` and `kt status` do."""
    return "no pools" if pool is None else f"no pool named {pool!r} (see `kt list`)"


def view(
    before: list[PodReading] | None,
    after: list[PodReading],
    elapsed: float,
    *,
    pool: str | None,
    interval: float,
) -> Table | str:
    """One refresh's screen: the table, or what `no_pods` says once the pods are gone."""
    if not after:
        return no_pods(pool)
    return table(rows(before, after, elapsed), interval=interval)
