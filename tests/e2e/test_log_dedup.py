"""A line printed by 4 actors reaches the driver's terminal once, plus one summary.

Covers, each in a driver run as its own process (its stdout is the terminal): the first
copy prints at once and the 3 others as one "[repeated 3x across cluster]" line, printed
by the timer when the window ends (before the driver's own next line), while each
actor's own line prints; KT_DEDUP_LOGS=0 prints all 4 copies; with a window longer than
the run, the summary still prints when the driver stops (nothing is lost at exit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

NAMES = ["alpha", "bravo", "charlie", "delta"]

DRIVER = """
import sys, time
import kt

class Greeter:
    def ready(self):
        return True

    def greet(self, i, name):
        print("hello from the cluster", flush=True)
        print(f"greeter {name} (index {i}) checks in", flush=True)
        return i

pool = kt.Compute(cpus=4, replicas=1, backend="local", name=sys.argv[1])
greeters = [kt.cls(Greeter).options(compute=pool, cpus=0).remote() for _ in range(4)]
kt.get([g.ready.remote() for g in greeters], timeout=90)  # all started: prints come together
names = sys.argv[3].split(",")
assert kt.get([g.greet.remote(i, names[i]) for i, g in enumerate(greeters)], timeout=60) == [
    0, 1, 2, 3
]
time.sleep(float(sys.argv[2]))
print("-- driver slept --", flush=True)
kt.shutdown()
"""

HELLO = "hello from the cluster"
SUMMARY = f"{HELLO} [repeated 3x across cluster]"


def _drive(sleep: float, **env: str) -> list[str]:
    """Run the driver; return its stdout's lines."""
    pool = f"dedup-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, pool, str(sleep), ",".join(NAMES)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def _own_lines_each_once(lines: list[str]) -> None:
    for i, name in enumerate(NAMES):  # words differ, not only numbers: never folded
        mine = [ln for ln in lines if f"greeter {name} (index {i}) checks in" in ln]
        assert len(mine) == 1 and mine[0].startswith("(Greeter pid="), lines


@pytest.mark.timeout(180)
def test_a_line_from_4_actors_prints_once_then_a_summary_when_the_window_ends() -> None:
    lines = _drive(4.0, KT_DEDUP_LOGS_WINDOW_S="2")
    hellos = [ln for ln in lines if HELLO in ln]
    assert len(hellos) == 2, lines  # the first copy, and the summary of the other 3
    first, summary = hellos
    assert first.startswith("(Greeter pid=") and first.endswith(f") {HELLO}"), lines
    assert summary.startswith("(Greeter pid=") and SUMMARY in summary, lines
    assert first.split(" ", 1)[0] == summary.split(" ", 1)[0] == "(Greeter"
    assert first.split()[1] != summary.split()[1], "the summary names another actor"
    # printed by the timer, before the driver woke up from sleeping past the window
    assert lines.index(summary) < lines.index("-- driver slept --"), lines
    _own_lines_each_once(lines)


@pytest.mark.timeout(180)
def test_off_prints_every_copy() -> None:
    lines = _drive(0.5, KT_DEDUP_LOGS="0", KT_DEDUP_LOGS_WINDOW_S="2")
    hellos = [ln for ln in lines if HELLO in ln]
    assert len(hellos) == 4 and all(ln.endswith(f") {HELLO}") for ln in hellos), lines
    assert len({ln.split()[1] for ln in hellos}) == 4, "4 actors, 4 pids"
    assert not any("repeated" in ln for ln in lines), lines
    _own_lines_each_once(lines)


@pytest.mark.timeout(180)
def test_held_lines_print_when_the_driver_stops_inside_the_window() -> None:
    lines = _drive(1.0, KT_DEDUP_LOGS_WINDOW_S="600")  # the lines arrive; the window never ends
    hellos = [ln for ln in lines if HELLO in ln]
    assert len(hellos) == 2 and SUMMARY in hellos[1], lines
    assert lines.index(hellos[1]) > lines.index("-- driver slept --"), "printed at the stop"
    _own_lines_each_once(lines)


GROUP = """
import sys, time
import kt

def step():
    import os
    print(f"rank {os.environ['RANK']} reached the barrier", flush=True)
    return int(os.environ["RANK"])

compute = kt.Compute(cpus=2, backend="local", name=sys.argv[1])
group = kt.fn(step).to(compute.distribute("pytorch", workers=2, procs_per_worker=2))
assert sorted(group.remote().result(timeout=120)) == [0, 1, 2, 3]
time.sleep(5.0)
print("-- driver slept --", flush=True)
kt.shutdown()
"""


@pytest.mark.timeout(180)
def test_the_ranks_of_a_group_printing_one_line_fold_into_one_summary() -> None:
    """Ray's rule that numbers do not tell lines apart: "rank 0 ..." to "rank 3 ..."."""
    done = subprocess.run(
        [sys.executable, "-c", GROUP, f"dedup-group-{uuid.uuid4().hex[:8]}"],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "KT_DEDUP_LOGS_WINDOW_S": "3"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if "reached the barrier" in ln]
    assert len(lines) == 2, done.stdout
    assert "[repeated 3x across cluster]" in lines[1], lines
