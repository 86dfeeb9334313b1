"""Worker processes of one pod: a warm pool, spawning, exit detection, log capture.

Who calls it: `kt.supervisor.server.Supervisor`. A `WorkerProcess` is a Python process
started from `kt.supervisor.worker` with kt and cloudpickle already imported, connected
back over the pod's Unix socket. The manager keeps `warm` of them idle so that placing an
actor costs a message, not a process spawn, and replaces each one it hands out.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from kt.core.channel import FrameChannel

logger = logging.getLogger(__name__)


class WorkerState(str, enum.Enum):
    """STARTING -> IDLE -> ASSIGNED -> EXITED; STARTING|IDLE -> EXITED."""

    STARTING = "starting"
    IDLE = "idle"
    ASSIGNED = "assigned"
    EXITED = "exited"


@dataclass
class ExitInfo:
    exit_code: int | None
    signal: int | None
    oom: bool


def _oom_kills() -> int:
    """This cgroup's OOM-kill count (0 when cgroup v2 memory.events is unreadable)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = f.read().strip().split("::", 1)[-1]
        with open(f"/sys/fs/cgroup{path}/memory.events") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


class WorkerProcess:
    """One worker process and its Unix-socket channel.

    Frames sent before the worker has connected wait in `_backlog`.
    """

    def __init__(self, worker_id: int, proc: asyncio.subprocess.Process) -> None:
        self.id = worker_id
        self.proc = proc
        self.pid = proc.pid
        self.state = WorkerState.STARTING
        self.channel: FrameChannel | None = None
        self.log_source = f"(worker pid={proc.pid})"
        self.on_log: Callable[[WorkerProcess, bytes], None] | None = None
        self.on_exit: Callable[[WorkerProcess, ExitInfo], None] | None = None
        self._backlog: list[bytes | bytearray | memoryview] = []
        self._oom_before = _oom_kills()
        self.connected = asyncio.get_running_loop().create_future()

    def attach(self, channel: FrameChannel) -> None:
        self.channel = channel
        for frame in self._backlog:
            channel.send(frame)
        self._backlog.clear()
        if not self.connected.done():
            self.connected.set_result(None)

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self.channel is not None:
            self.channel.send(frame)
        elif self.state is not WorkerState.EXITED:
            self._backlog.append(frame)

    def kill(self) -> None:
        if self.state is not WorkerState.EXITED:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _pump_logs(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = await self.proc.stdout.read(65536)
            if not chunk:
                return
            if self.on_log is not None:
                self.on_log(self, chunk)

    async def _watch(self) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump_logs())
        code = await self.proc.wait()
        try:
            await asyncio.wait_for(pump, 1.0)
        except TimeoutError:
            pump.cancel()
        self.state = WorkerState.EXITED
        sig = -code if code < 0 else None
        info = ExitInfo(
            exit_code=None if sig else code,
            signal=sig,
            oom=sig == signal.SIGKILL and _oom_kills() > self._oom_before,
        )
        if self.on_exit is not None:
            self.on_exit(self, info)


class ProcessManager:
    """Spawns workers and keeps `warm` idle ones ready."""

    def __init__(self, socket_path: str, *, pod: str, warm: int = 2) -> None:
        self.socket_path = socket_path
        self.pod = pod
        self.warm = warm
        self.workers: dict[int, WorkerProcess] = {}
        self._idle: list[WorkerProcess] = []
        self._starting = 0
        self._ids = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawning: set[int] = set()
        self._early: dict[int, FrameChannel] = {}

    async def spawn(self) -> WorkerProcess:
        worker_id = next(self._ids)
        self._spawning.add(worker_id)
        env = dict(os.environ, PYTHONUNBUFFERED="1", KT_IN_WORKER="1", KT_POD=self.pod)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kt.supervisor.worker",
            self.socket_path,
            str(worker_id),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        self._spawning.discard(worker_id)
        worker = WorkerProcess(worker_id, proc)
        self.workers[worker_id] = worker
        early = self._early.pop(worker_id, None)
        if early is not None:  # it connected before create_subprocess_exec returned
            worker.attach(early)
        asyncio.get_running_loop().create_task(self._watch(worker))
        return worker

    async def _watch(self, worker: WorkerProcess) -> None:
        await worker._watch()
        self.workers.pop(worker.id, None)
        if worker in self._idle:
            self._idle.remove(worker)
            self.top_up()

    def connected(self, worker_id: int, channel: FrameChannel) -> bool:
        """A worker said HELLO; False if no worker of that id was ever started here."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.attach(channel)
            return True
        if worker_id in self._spawning:
            self._early[worker_id] = channel
            return True
        return False

    async def _spawn_warm(self) -> None:
        try:
            worker = await self.spawn()
            await asyncio.wait_for(asyncio.shield(worker.connected), 60)
        except (TimeoutError, OSError) as exc:
            logger.warning("a warm worker failed to start: %s", exc)
            return
        finally:
            self._starting -= 1
        if self._closing or worker.state is WorkerState.EXITED:
            return
        worker.state = WorkerState.IDLE
        self._idle.append(worker)

    def top_up(self) -> None:
        """Start workers until idle + starting reaches `warm`."""
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        while len(self._idle) + self._starting < self.warm:
            self._starting += 1
            task = loop.create_task(self._spawn_warm())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def acquire(self) -> WorkerProcess:
        """An idle worker if one is warm, else a new one (frames queue until it connects)."""
        if self._idle:
            worker = self._idle.pop()
        else:
            worker = await self.spawn()
        worker.state = WorkerState.ASSIGNED
        self.top_up()
        return worker

    def close(self) -> None:
        self._closing = True
        for worker in list(self.workers.values()):
            worker.kill()
