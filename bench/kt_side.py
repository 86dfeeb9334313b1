"""kt side of the kt-vs-Ray benchmark; the counterpart of ``bench/ray_side.py``.

    .venv/bin/python bench/kt_side.py ROW [ROW...]

Prints one JSON object (row name -> result) on the last line of stdout, with the same row
names and result keys as the Ray side. A row that raises (or runs past ``KT_BENCH_ROW_TIMEOUT``
seconds, default 180) is left out of the results and listed under ``"_errors"`` (row -> last
line of its traceback); the full traceback goes to stderr. Every actor asks for ``cpus=0`` so
that any number of them fits the one 8-cpu pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

import kt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.load, as tests import it

IMPORTED_AT = time.perf_counter()  # `init` counts from here: kt is imported
Result = dict[str, float]
MIB = 1024 * 1024
POOL = kt.Compute(cpus=8, replicas=1, backend="local")


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
    async def run(self, targets: list[Any], n: int) -> int:
        """Call every target ``n`` times (interleaved), gather here; return the call count."""
        refs = [t.add.remote(i, 1) for i in range(n) for t in targets]
        out = await asyncio.gather(*refs)
        assert out == [i + 1 for i in range(n) for _ in targets], "nn: wrong results"
        return len(out)


EchoActor: Any = kt.cls(Echo).options(compute=POOL, cpus=0)
CallerActor: Any = kt.cls(Caller).options(compute=POOL, cpus=0)


_LIVE: list[Any] = []  # actors not yet killed: a failed row's are killed before the next row


def _started(n: int) -> list[Any]:
    """Create ``n`` Echo actors and wait until each answers a ping."""
    actors = [EchoActor.remote() for _ in range(n)]
    _LIVE.extend(actors)
    kt.get([a.ping.remote() for a in actors])
    return actors


def _kill(actors: list[Any]) -> None:
    for a in actors:
        kt.kill(a)
        if a in _LIVE:
            _LIVE.remove(a)


def _kill_leftovers() -> None:
    """After a failed row: kill what it left alive, so that later rows run on a clean pod."""
    left, _LIVE[:] = list(_LIVE), []
    for a in left:
        try:
            kt.kill(a)
        except Exception as exc:
            print(f"[kt_side] killing leftover {a!r}: {exc!r}", file=sys.stderr)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def init() -> float:
    """Pool (pod) start, first actor, first call; seconds from `import kt` being done."""
    actors = _started(1)
    dt = time.perf_counter() - IMPORTED_AT
    _kill(actors)
    return dt


def row_rtt() -> Result:
    (a,) = _started(1)
    for _ in range(200):
        a.ping()
    lat: list[float] = []
    for _ in range(2000):
        t0 = time.perf_counter()
        a.ping()
        lat.append((time.perf_counter() - t0) * 1e6)
    _kill([a])
    return {"median_us": statistics.median(lat), "p99_us": _pct(lat, 0.99)}


def row_async_1to1() -> Result:
    (a,) = _started(1)

    async def go() -> float:
        await asyncio.gather(*[a.ping.remote() for _ in range(200)])
        t0 = time.perf_counter()
        await asyncio.gather(*[a.ping.remote() for _ in range(5000)])
        return time.perf_counter() - t0

    dt = asyncio.run(go())
    _kill([a])
    return {"calls_per_s": 5000 / dt}


async def _fanout_pass(actors: list[Any], n: int) -> float:
    t0 = time.perf_counter()
    refs = [actors[i % len(actors)].add.remote(i, 1) for i in range(n)]
    out = await asyncio.gather(*refs)
    dt = time.perf_counter() - t0
    assert out == [i + 1 for i in range(n)], "fanout: wrong results"
    return n / dt


def row_fanout() -> Result:
    actors = _started(4)

    async def go() -> float:
        await _fanout_pass(actors, 1000)
        return max([await _fanout_pass(actors, 10_000) for _ in range(3)])

    best = asyncio.run(go())
    _kill(actors)
    return {"calls_per_s": best}


def row_nn() -> Result:
    targets = _started(4)
    callers = [CallerActor.remote() for _ in range(4)]
    _LIVE.extend(callers)
    kt.get([c.run.remote(targets, 50) for c in callers])  # warm-up: handles resolved
    t0 = time.perf_counter()
    total = sum(kt.get([c.run.remote(targets, 1000) for c in callers]))
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
        _LIVE.append(a)
        a.ping()
        times.append((time.perf_counter() - t0) * 1e3)
        fresh.append(a)
    _kill(warm + fresh)
    return {"median_ms": statistics.median(times)}


def row_place100() -> Result:
    t0 = time.perf_counter()
    actors = _started(100)
    dt = time.perf_counter() - t0
    _kill(actors)
    return {"seconds": dt}


def _arg_row(mib: int, calls: int, round_trip: bool) -> Result:
    (a,) = _started(1)
    arr = np.random.default_rng(0).integers(0, 256, size=mib * MIB, dtype=np.uint8)
    method = a.back if round_trip else a.take
    method(arr)  # warm-up
    times: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = method(arr)
        times.append((time.perf_counter() - t0) * 1e3)
        if round_trip:
            assert out.nbytes == arr.nbytes
        del out
    _kill([a])
    return {"median_ms": statistics.median(times)}


def _descendants() -> set[int]:
    """PIDs of every process below this one (supervisor, workers), read from /proc."""
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


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # exited meanwhile
        pass
    return 0


def _settle(timeout: float = 5.0) -> None:
    """Wait until the set of descendant processes stops changing (killed workers exiting)."""
    deadline = time.monotonic() + timeout
    last = _descendants()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _descendants()
        if now == last:
            return
        last = now


def row_memory() -> Result:
    """RSS of the kt runtime (the pod's supervisor and workers: all started by this driver)."""
    _settle()
    actors = _started(4)
    _settle(2.0)
    pids = _descendants()
    runtime = sum(_rss(pid) for pid in pids)
    _kill(actors)
    return {
        "runtime_mib": runtime / MIB,
        "driver_mib": _rss(os.getpid()) / MIB,
        "n_procs": len(pids),
    }


RELOAD_CODE = (
    "VALUE = {value}\n\n\nclass Probe:\n    def value(self) -> int:\n        return VALUE\n"
)


@contextlib.contextmanager
def _project(kind: str, code: str, data: Callable[[int], bytes], files: int) -> Iterator[Any]:
    """A temporary project (pyproject.toml, `files` data files, one module of `code`) on
    sys.path: yields (its directory, the module, the module's source path)."""
    import importlib
    import tempfile
    import uuid
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix=f"kt-bench-{kind}-") as d:
        root = Path(d)
        name = f"bench_{kind}_{uuid.uuid4().hex[:6]}"
        (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
        (root / "data").mkdir()
        for i in range(files):
            (root / "data" / f"{i}.dat").write_bytes(data(i))
        source = root / f"{name}.py"
        source.write_text(code)
        sys.path.insert(0, d)
        try:
            yield d, importlib.import_module(name), source
        finally:
            sys.path.remove(d)


def row_reload() -> Result:
    """Hot reload, kt only: a one-line edit, `.to()` again, the new result (median of 5);
    and `.to()` with nothing changed (median of 5). The project is a temporary directory
    of 200 files synced with sync_dir=."""
    code = RELOAD_CODE.format(value=0)
    with _project("reload", code, lambda i: f"{i}\n".encode() * 50, 199) as (d, module, source):
        compute = kt.Compute(
            cpus=1, replicas=1, name=f"reload-{module.__name__[-6:]}", backend="local"
        )
        deploy = kt.cls(module.Probe)
        svc = deploy.to(compute, sync_dir=d)
        assert svc.value() == 0
        edits, unchanged = [], []
        for i in range(1, 6):
            source.write_text(RELOAD_CODE.format(value=i))
            t0 = time.perf_counter()
            svc = deploy.to(compute, sync_dir=d)
            assert svc.value() == i
            edits.append((time.perf_counter() - t0) * 1e3)
        for _ in range(5):
            t0 = time.perf_counter()
            assert deploy.to(compute, sync_dir=d) is svc
            unchanged.append((time.perf_counter() - t0) * 1e3)
        svc.teardown()
    return {"edit_ms": statistics.median(edits), "unchanged_ms": statistics.median(unchanged)}


def row_sync16() -> Result:
    """Code sync to a 16-pod pool, kt only: how many copies of the project the driver
    sent (the pods pass it on), and the seconds from `.to()` until every replica ran
    from its pod's tree (pod starts included)."""
    from kt.actors.driver import get_driver

    os.environ["KT_WARM_WORKERS"] = "0"  # 16 pods on a small machine: no idle workers
    code = "class Where:\n    def where(self) -> str:\n        return __file__\n"
    with _project("sync16", code, lambda i: os.urandom(20_000), 100) as (d, module, _):
        total = sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())
        pusher = get_driver().pusher
        before = pusher.bytes_sent
        compute = kt.Compute(
            cpus=1, replicas=16, name=f"sync16-{module.__name__[-6:]}", backend="local"
        )
        t0 = time.perf_counter()
        svc = kt.cls(module.Where).to(compute, sync_dir=d)
        wheres = [h.where.remote() for h in svc._handles]
        assert all("/trees/" in w.result(timeout=120) for w in wheres)
        seconds = time.perf_counter() - t0
        copies = (pusher.bytes_sent - before) / total
        svc.teardown()
    os.environ.pop("KT_WARM_WORKERS")
    return {"driver_copies": copies, "seconds": seconds}


def _rtt_us(handle: Any, n: int = 2000) -> float:
    for _ in range(200):
        handle.ping()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        handle.ping()
        lat.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(lat)


def row_k8s() -> Result:
    """The Kubernetes backend on the test cluster (`kt.testing.cluster`, 4 nodes), kt
    only: a pool of 4 pods from `.to()` until each replica answered its first call (pod
    starts and code sync included); then the call round trip there next to the local
    backend's, and through the kt gateway next to direct, measured alternately (the same
    hot path: the first ratio should be near 1; the gateway's relay adds what it adds)."""
    from kt.core.config import config
    from kt.testing.cluster import gateway as gateway_of
    from kt.testing.cluster import running

    with (
        running(nodes=4, cpus_per_node=4) as kubeconfig,
        gateway_of(kubeconfig, kubeconfig.with_name("gateway.log")) as gateway,
    ):
        os.environ["KUBECONFIG"] = str(kubeconfig)
        compute = kt.Compute(cpus=1, replicas=4, backend="k8s", name="bench-k8s")
        t0 = time.perf_counter()
        svc = kt.cls(Echo).to(compute)
        kt.get([h.ping.remote() for h in svc._handles], timeout=120)
        pool_s = time.perf_counter() - t0
        (local,) = _started(1)
        remote = svc._handles[0]
        config.gateway = gateway  # links made from now on go through it
        other = kt.Compute(cpus=1, replicas=1, backend="k8s", name="bench-k8s-gw")
        relayed = kt.cls(Echo).options(compute=other, cpus=0).remote()
        relayed.ping()
        config.gateway = None
        k8s_us, local_us, gw_us = [], [], []
        for _ in range(3):
            k8s_us.append(_rtt_us(remote, 1000))
            local_us.append(_rtt_us(local, 1000))
            gw_us.append(_rtt_us(relayed, 1000))
        _kill([local, relayed])
        svc.teardown()
        os.environ.pop("KUBECONFIG")
    k8s, here, gw = (statistics.median(x) for x in (k8s_us, local_us, gw_us))
    return {
        "pool4_s": pool_s,
        "rtt_us": k8s,
        "local_rtt_us": here,
        "rtt_ratio": k8s / here,
        "gateway_rtt_us": gw,
        "gateway_added_us": gw - k8s,
    }


def row_soak() -> Result:
    """1,000,000 calls from 4 caller threads to 100 light actors on one pod, every result
    checked (`bench/load.py`); RSS after 200k calls and at the end."""
    from bench.load import Echo, Soak, soak

    pool = kt.Compute(cpus=2, replicas=1, backend="local", name="bench-soak")
    actors = [kt.cls(Echo).options(compute=pool, cpus=0).remote(i) for i in range(100)]
    _LIVE.extend(actors)
    result = soak(actors, 1_000_000)
    _kill(actors)
    lost = sum(t.calls - t.ok for t in (result.first, result.rest))
    return {
        "calls_per_s": 800_000 / result.rest.seconds,
        "lost_or_wrong": float(lost),
        "extra_executions": float(result.executions - 1_000_000),
        "driver_growth_pct": 100 * Soak.growth(result.driver_rss),
        "supervisor_growth_pct": 100 * Soak.growth(result.supervisor_rss),
        "driver_mib": result.driver_rss[1] / MIB,
        "supervisor_mib": result.supervisor_rss[1] / MIB,
    }


def row_actors1000() -> Result:
    """1,000 light actors (cpus=0) on one pod: created and called once each, then killed."""
    import psutil

    from bench.load import Echo

    pool = kt.Compute(cpus=2, replicas=1, backend="local", name="bench-actors1000")
    Light = kt.cls(Echo).options(compute=pool, cpus=0)
    (first,) = [Light.remote(-1)]
    supervisor = psutil.Process(first.supervisor_pid())
    idle_rss = supervisor.memory_info().rss
    t0 = time.perf_counter()
    actors = [Light.remote(i) for i in range(1000)]
    _LIVE.extend([first, *actors])
    pids = kt.get([a.pid.remote() for a in actors], timeout=600)
    created = time.perf_counter() - t0
    uss = sum(psutil.Process(pid).memory_full_info().uss for pid in pids)
    held = supervisor.memory_info().rss - idle_rss
    t1 = time.perf_counter()
    _kill([first, *actors])
    left = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
    alive = psutil.wait_procs(left, timeout=120)[1]
    return {
        "create_ms_per_actor": 1000 * created / 1000,
        "uss_mib_per_actor": uss / 1000 / MIB,
        "supervisor_kib_per_actor": held / 1000 / 1024,
        "kill_all_s": time.perf_counter() - t1,
        "left_running": float(len(alive)),
    }


class Getter:
    """A data store getter (`data100`, `bcast1g`, `tree`): gets a key, touches its array."""

    def get(self, key: str) -> int:
        value = kt.get(key, timeout=120)
        return int(value[0]) + value.nbytes

    def put(self, key: str, mib: int) -> None:
        kt.put(key, np.ones(mib * MIB, dtype=np.uint8))

    def pod(self) -> str:
        return os.environ["KT_POD"]


def _broadcast(getters: list[Any], mib: int, reps: int, tag: str) -> list[float]:
    """Seconds from `kt.put` of a `mib` MiB array by the driver until every getter has it,
    after one warm-up get of a small array in every getter (its imports, its connections)."""
    kt.put(f"bench/{tag}/warm", np.ones(1000, dtype=np.uint8))
    kt.get([g.get.remote(f"bench/{tag}/warm") for g in getters], timeout=300)
    array = np.ones(mib * MIB, dtype=np.uint8)
    times = []
    for i in range(reps):
        key = f"bench/{tag}/{i}"
        t0 = time.perf_counter()
        kt.put(key, array)
        out = kt.get([g.get.remote(key) for g in getters], timeout=300)
        times.append(time.perf_counter() - t0)
        assert out == [1 + array.nbytes] * len(getters), f"{tag}: wrong values"
        kt.rm(key)
    return times


def row_data100() -> Result:
    """One 100 MiB array: `kt.put` from the driver, `kt.get` in 8 actors (median of 5)."""
    pool = kt.Compute(cpus=2, replicas=1, backend="local", name="bench-data100")
    getters = [kt.cls(Getter).options(compute=pool, cpus=0).remote() for _ in range(8)]
    _LIVE.extend(getters)
    kt.get([g.pod.remote() for g in getters])
    times = _broadcast(getters, 100, 5, "data100")
    _kill(getters)
    return {"median_ms": 1e3 * statistics.median(times)}


def row_bcast1g() -> Result:
    """A 1 GiB array from the driver to one actor on each of 16 local pods (median of 3)."""
    pool = kt.Compute(cpus=0.5, replicas=16, backend="local", name="bench-bcast1g")
    G = kt.cls(Getter).options(compute=pool, cpus=0.5)
    getters = [G.remote() for _ in range(16)]
    _LIVE.extend(getters)
    assert len(set(kt.get([g.pod.remote() for g in getters], timeout=300))) == 16
    times = _broadcast(getters, 1024, 3, "bcast1g")
    _kill(getters)
    return {"median_s": statistics.median(times)}


SD_TENSORS, SD_MIB = 24, 16  # `sd_into`'s state dict: 24 arrays of 16 MiB, 384 MiB


def state_dict(fill: float) -> dict[str, np.ndarray]:
    """A model-sized state dict of float32 arrays (`sd_into`)."""
    return {
        f"layer{i}.weight": np.full(SD_MIB * MIB // 4, fill, np.float32) for i in range(SD_TENSORS)
    }


class Learner:
    """`sd_into`'s getter: holds its own weights and loads new ones into them in place."""

    def __init__(self) -> None:
        self.weights = state_dict(0.0)

    def load(self, key: str) -> float:
        kt.get(key, into=self.weights, timeout=120)
        return float(self.weights["layer7.weight"][-1])


def row_sd_into() -> Result:
    """A 384 MiB state dict put by the driver and loaded with `into=` by an actor on the
    same host, its key replaced each time, as a trainer's weights reach a rollout actor
    (median of 5, after a warm-up load)."""
    pool = kt.Compute(cpus=1, replicas=1, backend="local", name="bench-sd-into")
    learner = kt.cls(Learner).options(compute=pool).remote()
    _LIVE.append(learner)
    weights = state_dict(0.0)
    times = []
    for i in range(6):
        for array in weights.values():
            array.fill(i + 1)
        t0 = time.perf_counter()
        kt.put("bench/sd_into/weights", weights)
        got = kt.get(learner.load.remote("bench/sd_into/weights"), timeout=300)
        times.append(time.perf_counter() - t0)
        assert got == i + 1, f"sd_into: loaded {got}, put {i + 1}"
    _kill([learner])
    return {"median_ms": 1e3 * statistics.median(times[1:])}


def row_tree() -> Result:
    """kt only: 256 MiB put by an actor, got by pods that share no memory with it or each
    other (each its own KT_SHM_DOMAIN, as pods on different hosts), through the broadcast
    tree: by 1 pod, then by 8 (median of 3); and the copies the source sent to the 8."""
    from tests.sync.status import pod_status

    def pods(n: int, tag: str) -> list[Any]:
        made = []
        for i in range(n):
            env = {"KT_SHM_DOMAIN": f"{tag}-{i}"}
            c = kt.Compute(
                cpus=0.5, replicas=1, backend="local", name=f"bench-tree-{tag}{i}", env=env
            )
            made.append(kt.cls(Getter).options(compute=c, cpus=0).remote())
        _LIVE.extend(made)
        kt.get([g.pod.remote() for g in made], timeout=300)
        return made

    (source,) = pods(1, "s")
    out: Result = {}
    for name, n in (("one_hop_s", 1), ("eight_pods_s", 8)):
        getters = pods(n, f"g{n}-")
        sent = pod_status(source)["data"]["bytes_to_pods"]
        times, size = [], 0
        for i in range(3):
            key = f"bench/tree/{n}/{i}"
            source.put.remote(key, 256).result(120)
            size = kt.ls(key)[key]
            t0 = time.perf_counter()
            kt.get([g.get.remote(key) for g in getters], timeout=300)
            times.append(time.perf_counter() - t0)
            kt.rm(key)
        out[name] = statistics.median(times)
        out["source_copies"] = (pod_status(source)["data"]["bytes_to_pods"] - sent) / (3 * size)
        _kill(getters)
    _kill([source])
    return out


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
    "reload": row_reload,
    "sync16": row_sync16,
    "k8s": row_k8s,
    "soak": row_soak,
    "actors1000": row_actors1000,
    "data100": row_data100,
    "bcast1g": row_bcast1g,
    "tree": row_tree,
    "sd_into": row_sd_into,
    "cuda_into": lambda: _gpu_row("row_cuda_into"),
    "cuda_bcast": lambda: _gpu_row("row_cuda_bcast"),
}


def _gpu_row(name: str) -> Result:
    """A row of bench/gpu_rows.py (imported only there: it needs a CUDA torch)."""
    from bench import gpu_rows

    row: Callable[[], Result] = getattr(gpu_rows, name)
    return row()


class RowTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise RowTimeout(f"row ran past {os.environ.get('KT_BENCH_ROW_TIMEOUT', '180')} s")


def _timed(name: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    """Run one row under an alarm; on failure log the traceback and record its last line."""
    limit = int(float(os.environ.get("KT_BENCH_ROW_TIMEOUT", "180")))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    t0 = time.perf_counter()
    try:
        return fn()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"[kt_side] {name} FAILED:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        errors[name] = f"{type(exc).__name__}: {exc}"
        if name != "shutdown":
            _kill_leftovers()
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        print(f"[kt_side] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    unknown = [r for r in argv if r != "init" and r not in ROWS]
    if not argv or unknown:
        print(f"usage: kt_side.py ROW...; rows: init {' '.join(ROWS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    # `memory` first, as on the Ray side: earlier rows must not inflate the idle footprint.
    order = sorted((r for r in dict.fromkeys(argv) if r != "init"), key=lambda r: r != "memory")
    try:
        init_s = _timed("init", init, errors)
        if init_s is not None:
            if "init" in argv:
                results["init"] = {"seconds": init_s}
            for name in order:
                out = _timed(name, ROWS[name], errors)
                if out is not None:
                    results[name] = out
    finally:
        try:
            _timed("shutdown", kt.shutdown, errors)
        finally:
            if errors:
                results["_errors"] = errors
            print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
