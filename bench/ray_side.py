"""Ray side of the kt-vs-Ray benchmark.  Run with the Ray venv's python (see bench/ray_venv.py):

    bench/.venv-ray/bin/python bench/ray_side.py ROW [ROW...]

Prints one JSON object (row name -> result) on the last line of stdout.  Deliberately imports
nothing from ``kt``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

Result = dict[str, float]
MIB = 1024 * 1024


class Echo:
    def ping(self) -> None:
        return None

    def add(self, a: int, b: int) -> int:
        return a + b

    def take(self, x: Any) -> None:
        return None

    def back(self, x: Any) -> Any:
        return x


class Caller:
    def __init__(self, targets: list[Any]) -> None:
        self.targets = targets

    def run(self, n: int) -> int:
        """Call every target ``n`` times (interleaved), gather here; return the call count."""
        refs = [t.add.remote(i, 1) for i in range(n) for t in self.targets]
        out = ray.get(refs)
        assert out == [i + 1 for i in range(n) for _ in self.targets]
        return len(out)


# Applied as calls rather than decorators so type checkers see the remote classes as Any.
EchoActor: Any = ray.remote(Echo)
CallerActor: Any = ray.remote(Caller)


def _started(n: int, **opts: Any) -> list[Any]:
    """Create ``n`` Echo actors and wait until each answers a ping."""
    cls = EchoActor.options(**opts) if opts else EchoActor
    actors = [cls.remote() for _ in range(n)]
    ray.get([a.ping.remote() for a in actors])
    return actors


def _kill(actors: list[Any]) -> None:
    for a in actors:
        ray.kill(a)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def init() -> float:
    """ray.init plus the first actor call; returns seconds."""
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    actors = _started(1)
    dt = time.perf_counter() - t0
    _kill(actors)
    return dt


def row_rtt() -> Result:
    (a,) = _started(1)
    for _ in range(200):
        ray.get(a.ping.remote())
    lat: list[float] = []
    for _ in range(2000):
        t0 = time.perf_counter()
        ray.get(a.ping.remote())
        lat.append((time.perf_counter() - t0) * 1e6)
    _kill([a])
    return {"median_us": statistics.median(lat), "p99_us": _pct(lat, 0.99)}


def row_async_1to1() -> Result:
    (a,) = _started(1)
    ray.get([a.ping.remote() for _ in range(200)])
    t0 = time.perf_counter()
    ray.get([a.ping.remote() for _ in range(5000)])
    dt = time.perf_counter() - t0
    _kill([a])
    return {"calls_per_s": 5000 / dt}


def _fanout_pass(actors: list[Any], n: int) -> float:
    t0 = time.perf_counter()
    refs = [actors[i % len(actors)].add.remote(i, 1) for i in range(n)]
    out = ray.get(refs)
    dt = time.perf_counter() - t0
    assert out == [i + 1 for i in range(n)], "fanout: wrong results"
    return n / dt


def row_fanout() -> Result:
    actors = _started(4)
    _fanout_pass(actors, 1000)
    best = max(_fanout_pass(actors, 10_000) for _ in range(3))
    _kill(actors)
    return {"calls_per_s": best}


def row_nn() -> Result:
    targets = _started(4)
    callers = [CallerActor.remote(targets) for _ in range(4)]
    ray.get([c.run.remote(50) for c in callers])  # warm-up: workers up, handles resolved
    t0 = time.perf_counter()
    total = sum(ray.get([c.run.remote(1000) for c in callers]))
    dt = time.perf_counter() - t0
    _kill(callers + targets)
    return {"calls_per_s": total / dt}


def row_actor_start() -> Result:
    warm = _started(1)
    times: list[float] = []
    fresh: list[Any] = []
    for _ in range(10):
        t0 = time.perf_counter()
        a = EchoActor.remote()
        ray.get(a.ping.remote())
        times.append((time.perf_counter() - t0) * 1e3)
        fresh.append(a)
    _kill(warm + fresh)
    return {"median_ms": statistics.median(times)}


def row_place100() -> Result:
    t0 = time.perf_counter()
    actors = _started(100, num_cpus=0.01)
    dt = time.perf_counter() - t0
    _kill(actors)
    _wait_actors_gone()
    return {"seconds": dt}


def _arg_row(mib: int, calls: int, round_trip: bool) -> Result:
    (a,) = _started(1)
    arr = np.random.default_rng(0).integers(0, 256, size=mib * MIB, dtype=np.uint8)
    method = a.back if round_trip else a.take
    ray.get(method.remote(arr))  # warm-up
    times: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = ray.get(method.remote(arr))
        times.append((time.perf_counter() - t0) * 1e3)
        if round_trip:
            assert out.nbytes == arr.nbytes
        del out
    _kill([a])
    return {"median_ms": statistics.median(times)}


def _descendants() -> set[int]:
    """PIDs of every process below this one (gcs, raylet, agents, workers), read from /proc."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set[int](), {os.getpid()}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _read(pid: int, what: str) -> str:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # exited meanwhile
        return ""


def _rss(pid: int) -> int:
    for line in _read(pid, "status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _wait_actors_gone(timeout: float = 20.0) -> None:
    """After killing many actors, wait for their worker processes to exit (they burn CPU)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_read(pid, "cmdline").startswith("ray::Echo") for pid in _descendants()):
            return
        time.sleep(0.1)


def row_memory() -> Result:
    """RSS of the Ray runtime (gcs, raylet, agents, workers: all started by this driver)."""
    _wait_actors_gone()
    actors = _started(4)
    pids = _descendants()
    runtime = sum(_rss(pid) for pid in pids)
    _kill(actors)
    return {
        "runtime_mib": runtime / MIB,
        "driver_mib": _rss(os.getpid()) / MIB,
        "n_procs": len(pids),
    }


class Getter:
    """The counterpart of kt's: gets an object (its ref passed inside a list, so that the
    actor itself calls ray.get), touches its array."""

    def get(self, refs: list[Any]) -> int:
        value = ray.get(refs[0])
        return int(value[0]) + value.nbytes

    def ping(self) -> None:
        return None


GetterActor: Any = ray.remote(Getter)


def _broadcast(getters: list[Any], mib: int, reps: int) -> list[float]:
    """Seconds from `ray.put` of a `mib` MiB array by the driver until every getter has it,
    after one warm-up get of a small array in every getter (as on kt's side)."""
    warm = ray.put(np.ones(1000, dtype=np.uint8))
    ray.get([g.get.remote([warm]) for g in getters])
    array = np.ones(mib * MIB, dtype=np.uint8)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ref = ray.put(array)
        out = ray.get([g.get.remote([ref]) for g in getters])
        times.append(time.perf_counter() - t0)
        assert out == [1 + array.nbytes] * len(getters)
        del ref
    return times


def row_data100() -> Result:
    getters = [GetterActor.options(num_cpus=0).remote() for _ in range(8)]
    ray.get([g.ping.remote() for g in getters])
    times = _broadcast(getters, 100, 5)
    _kill(getters)
    return {"median_ms": 1e3 * statistics.median(times)}


def row_bcast1g() -> Result:
    """One node's object store: the 16 getters are 16 actors of it (kt: 16 pods)."""
    getters = [GetterActor.options(num_cpus=0).remote() for _ in range(16)]
    ray.get([g.ping.remote() for g in getters])
    times = _broadcast(getters, 1024, 3)
    _kill(getters)
    return {"median_s": statistics.median(times)}


SD_TENSORS, SD_MIB = 24, 16  # as on kt's side


def state_dict(fill: float) -> dict[str, np.ndarray]:
    return {
        f"layer{i}.weight": np.full(SD_MIB * MIB // 4, fill, np.float32) for i in range(SD_TENSORS)
    }


class Learner:
    """The counterpart of kt's: gets the state dict (its ref inside a list) and copies
    it into its own weights, as kt's into= does."""

    def __init__(self) -> None:
        self.weights = state_dict(0.0)

    def load(self, refs: list[Any]) -> float:
        for name, array in ray.get(refs[0]).items():
            np.copyto(self.weights[name], array)
        return float(self.weights["layer7.weight"][-1])


LearnerActor: Any = ray.remote(Learner)


def row_sd_into() -> Result:
    learner = LearnerActor.remote()
    weights = state_dict(0.0)
    times = []
    for i in range(6):
        for array in weights.values():
            array.fill(i + 1)
        t0 = time.perf_counter()
        ref = ray.put(weights)
        got = ray.get(learner.load.remote([ref]))
        times.append(time.perf_counter() - t0)
        assert got == i + 1
        del ref
    _kill([learner])
    return {"median_ms": 1e3 * statistics.median(times[1:])}


ROWS: dict[str, Callable[[], Result]] = {
    "rtt": row_rtt,
    "async_1to1": row_async_1to1,
    "fanout": row_fanout,
    "nn": row_nn,
    "actor_start": row_actor_start,
    "place100": row_place100,
    "arg10m_oneway": lambda: _arg_row(10, 20, round_trip=False),
    "arg10m_rt": lambda: _arg_row(10, 20, round_trip=True),
    "arg100m_oneway": lambda: _arg_row(100, 5, round_trip=False),
    "arg100m_rt": lambda: _arg_row(100, 5, round_trip=True),
    "memory": row_memory,
    "data100": row_data100,
    "bcast1g": row_bcast1g,
    "sd_into": row_sd_into,
}


def main(argv: list[str]) -> int:
    unknown = [r for r in argv if r != "init" and r not in ROWS]
    if not argv or unknown:
        print(f"usage: ray_side.py ROW...; rows: init {' '.join(ROWS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    # `memory` goes first so that earlier rows (100 MiB objects mapped from the object store,
    # workers of killed actors still exiting) do not inflate the idle footprint.
    order = sorted((r for r in dict.fromkeys(argv) if r != "init"), key=lambda r: r != "memory")
    try:
        init_s = init()
        if "init" in argv:
            results["init"] = {"seconds": init_s}
        for name in order:
            t0 = time.perf_counter()
            results[name] = ROWS[name]()
            print(f"[ray_side] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    finally:
        ray.shutdown()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
