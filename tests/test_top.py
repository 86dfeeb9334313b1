"""`kt top`: the rates worked out from two readings (`kt/top.py`), and the command
against a live local pool.

Covers:
- calls/s is the delta of an actor's `calls` over the elapsed time, CPU % the delta of
  its CPU seconds (100 per busy core); RSS shows in MiB;
- the first refresh, an actor that appeared since the last one, and one whose process
  changed (a restart) show no rate; one that vanished is not shown; a counter that went
  back gives no negative rate;
- a pod whose /status failed is one row with its error, a pod without actors one row;
- nothing to show says "no pools" (or names the pool);
- `kt top POOL --count 3` prints one table per refresh when stdout is not a terminal,
  with both actors' classes, a nonzero calls/s and CPU % for the actor being called in a
  loop, none for the idle one, and each one's RSS;
- without --count it runs until Ctrl-C, and SIGINT ends it with rc 0 and no traceback.
"""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from rich.console import Console

import kt
from kt import top
from kt.top import ActorRow, PodReading


def _actor(id: str, calls: int, cpu: float | None, **extra: Any) -> dict[str, Any]:
    fields = {"name": "", "class": "Worker", "state": "alive", "pid": 100, "inflight": 0}
    return {**fields, "id": id, "calls": calls, "cpu": cpu, "rss": 64 << 20, **extra}


def _pod(*actors: dict[str, Any], pod: str = "p-1") -> PodReading:
    return PodReading("pool-a", pod, {"pod": pod, "actors": list(actors)})


def _by_actor(rows: list[ActorRow]) -> dict[str, ActorRow]:
    return {row.actor: row for row in rows}


def test_rates_are_deltas_over_the_elapsed_time() -> None:
    before = [_pod(_actor("a1", 100, 2.0), _actor("a2", 7, 1.0, name="cache"))]
    after = [_pod(_actor("a1", 150, 2.5, inflight=3), _actor("a2", 7, 1.0, name="cache"))]
    rows = _by_actor(top.rows(before, after, 2.0))
    busy, idle = rows["a1"], rows["cache"]  # a name when it has one, else the id
    assert busy.calls_per_s == pytest.approx(25.0)
    assert busy.cpu_percent == pytest.approx(25.0)
    assert (busy.calls, busy.inflight, busy.rss) == (150, 3, 64 << 20)
    assert idle.calls_per_s == 0.0 and idle.cpu_percent == 0.0


def test_first_refresh_and_new_actors_show_no_rate_and_vanished_ones_go() -> None:
    (first,) = top.rows(None, [_pod(_actor("a1", 100, 2.0))], 0.0)
    assert first.calls_per_s is None and first.cpu_percent is None and first.calls == 100
    before = [_pod(_actor("gone", 5, 1.0), _actor("kept", 10, 1.0))]
    after = [_pod(_actor("kept", 20, 1.5), _actor("new", 3, 0.2))]
    rows = _by_actor(top.rows(before, after, 1.0))
    assert set(rows) == {"kept", "new"}
    assert rows["kept"].calls_per_s == pytest.approx(10.0)
    assert rows["new"].calls_per_s is None and rows["new"].cpu_percent is None


def test_a_restarted_process_or_a_counter_that_went_back_gives_no_rate() -> None:
    before = [_pod(_actor("a1", 3, 0.1, pid=100), _actor("a2", 50, 3.0))]
    after = [_pod(_actor("a1", 50, 0.5, pid=200), _actor("a2", 40, 2.0))]  # a1: a new process
    rows = _by_actor(top.rows(before, after, 1.0))
    assert rows["a1"].calls_per_s is None and rows["a1"].cpu_percent is None
    assert rows["a2"].calls_per_s is None and rows["a2"].cpu_percent is None
    assert top.rate(10, 5, 0.0) is None  # no time passed: no rate, not a division by zero


def test_same_actor_id_on_two_pods_is_two_actors() -> None:
    before = [_pod(_actor("a1", 10, 1.0), pod="p-1"), _pod(_actor("a1", 5, 1.0), pod="p-2")]
    after = [_pod(_actor("a1", 30, 1.0), pod="p-1"), _pod(_actor("a1", 11, 1.0), pod="p-2")]
    rates = {row.pod: row.calls_per_s for row in top.rows(before, after, 1.0)}
    assert rates == {"p-1": 20.0, "p-2": 6.0}


def test_a_pod_whose_status_failed_shows_its_error() -> None:
    broken = PodReading("pool-a", "p-2", {"error": "<urlopen error [Errno 111] refused>"})
    empty = PodReading("pool-a", "p-3", {"pod": "p-3", "actors": []})
    before = [_pod(_actor("a1", 1, 0.0)), broken]
    after = [_pod(_actor("a1", 3, 0.0)), broken, empty]
    rows = top.rows(before, after, 1.0)
    assert [(r.pod, r.actor) for r in rows] == [("p-1", "a1"), ("p-2", "-"), ("p-3", "-")]
    assert rows[1].state == "unreachable: <urlopen error [Errno 111] refused>"
    assert rows[2].state == "no actors"
    text = _text(top.table(rows, interval=1.0))
    assert "Errno 111" in text and "no actors" in text
    assert "64.0" in text and "2.0" in text  # RSS in MiB and calls/s


def test_nothing_to_show_says_so() -> None:
    assert top.view(None, [], 0.0, pool=None, interval=1.0) == "no pools"
    assert "no pool named 'x'" in str(top.view(None, [], 0.0, pool="x", interval=1.0))


def _text(renderable: Any) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


class Busy:
    def work(self) -> int:
        deadline = time.process_time() + 0.002  # CPU time, so CPU % shows it
        while time.process_time() < deadline:
            pass
        return 1


class Idle:
    def ping(self) -> int:
        return 0


# `kt top` as at a terminal, where Ctrl-C reaches it: a test run started in the background
# of a script inherits SIGINT ignored, and Python (so asyncio.run) keeps it ignored
AT_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'kt'; runpy.run_module('kt.cli', run_name='__main__')"
)


def _top(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", AT_A_TERMINAL, "top", *args],
        text=True,
        env=dict(os.environ, COLUMNS="200", **(env or {})),
        **popen,
    )


def _row(table: str, cls: str) -> list[str]:
    """The cells of the line naming `cls` in one printed table (box drawing or ASCII)."""
    (line,) = [line for line in table.splitlines() if f" {cls} " in line]
    cells = [c.strip() for c in line.replace("|", "│").split("│")]
    return [c for c in cells if c]


@pytest.mark.timeout(120)
def test_kt_top_shows_a_live_pool(tmp_path: pathlib.Path) -> None:
    name = f"top-{uuid.uuid4().hex[:6]}"
    compute = kt.Compute(cpus=2, replicas=1, backend="local", name=name)
    busy = kt.cls(Busy).options(compute=compute).remote()
    idle = kt.cls(Idle).options(compute=compute).remote()
    stop = threading.Event()

    def call_in_a_loop() -> None:
        while not stop.is_set():
            busy.work()

    caller = threading.Thread(target=call_in_a_loop, daemon=True)
    try:
        assert busy.work() == 1 and idle.ping() == 0
        caller.start()
        done = _top(name, "--count", "3", "--interval", "0.5", stdout=subprocess.PIPE)
        out, _ = done.communicate(timeout=60)
        assert done.returncode == 0, out
        tables = out.split("calls/s")[1:]  # one header per refresh
        assert len(tables) == 3, out
        last = tables[-1]
        header = top.COLUMNS
        busy_row = dict(zip(header[3:], _row(last, "Busy")[3:], strict=True))
        idle_row = dict(zip(header[3:], _row(last, "Idle")[3:], strict=True))
        assert float(busy_row["calls/s"]) > 0, last
        assert float(busy_row["CPU %"]) > 0, last
        assert float(idle_row["calls/s"]) == 0, last
        assert float(busy_row["RSS MiB"]) > 1 and float(idle_row["RSS MiB"]) > 1, last
        assert _row(tables[0], "Busy")[5] == "-"  # the first refresh has no rate yet

        log = tmp_path / "top.out"
        with log.open("w") as sink:
            # PYTHONFAULTHANDLER: if it hangs, SIGABRT prints where each of its threads is
            env = {"PYTHONFAULTHANDLER": "1"}
            live = _top(name, "--interval", "0.2", stdout=sink, stderr=subprocess.PIPE, env=env)
            deadline = time.monotonic() + 60
            while log.read_text().count("calls/s") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            shown = log.read_text().count("calls/s")
            live.send_signal(signal.SIGINT if shown >= 2 else signal.SIGABRT)
            try:
                _, err = live.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                # how it took SIGINT (ignored, blocked, caught), and whether it went on
                signals = [
                    line
                    for line in pathlib.Path(f"/proc/{live.pid}/status").read_text().splitlines()
                    if line.startswith(("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd"))
                ]
                after = log.read_text().count("calls/s")
                live.send_signal(signal.SIGABRT)
                _, err = live.communicate(timeout=30)
                pytest.fail(
                    f"kt top did not stop on Ctrl-C within 30 s ({shown} tables before it, "
                    f"{after} after; {signals}; here SIGINT is {signal.getsignal(signal.SIGINT)}"
                    f"); its threads:\n{err}"
                )
        assert shown >= 2, f"kt top showed {shown} tables in 60 s; its threads:\n{err}"
        assert live.returncode == 0 and "Traceback" not in err, err
        assert log.read_text().count("calls/s") >= 2
    finally:
        stop.set()
        caller.join(timeout=30)
        kt.kill(busy)
        kt.kill(idle)
        subprocess.run(
            [sys.executable, "-m", "kt.cli", "teardown", name], capture_output=True, timeout=60
        )
