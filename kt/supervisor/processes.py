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
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kt.core import cgroup
from kt.core.channel import FrameChannel
from kt.core.liveness import pid_alive

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
    """The pod's OOM-kill count so far (its memory cgroup's; 0 when unreadable)."""
    return cgroup.oom_kills()


class WorkerProcess:
    """One worker process and its Unix-socket channel.

    Made by fork from the zygote, or spawned when there is none; either way it has a
    pid, a stdout stream and an exit code that arrives in `exited`. Frames sent before
    the worker has connected wait in `_backlog`.
    """

    def __init__(self, worker_id: int, pid: int, stdout: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        self.id = worker_id
        self.pid = pid
        self.stdout = stdout
        self.exited: asyncio.Future[int | None] = loop.create_future()
        """The exit code (negative: killed by that signal; None: unknown)."""
        self.state = WorkerState.STARTING
        self.channel: FrameChannel | None = None
        self.log_source = f"(worker pid={pid})"
        self.on_log: Callable[[WorkerProcess, bytes], None] | None = None
        self.on_exit: Callable[[WorkerProcess, ExitInfo], None] | None = None
        self._backlog: list[bytes | bytearray | memoryview] = []
        self._oom_before = _oom_kills()
        self.connected: asyncio.Future[None] = loop.create_future()

    def attach(self, channel: FrameChannel) -> None:
        self.channel = channel
        previous = channel.on_lost

        def lost(exc: Exception | None) -> None:
            if previous is not None:
                previous(exc)
            asyncio.get_running_loop().create_task(self._confirm_exit())

        channel.on_lost = lost
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
        """Whole lines to `on_log`: `print` writes its text and its newline apart, and a
        line cut between two reads would show as two. A partial line is held until its
        newline, 64 KiB, 0.2 s without more output (a progress bar), or the end."""
        partial = b""
        while True:
            try:
                read = self.stdout.read(65536)
                chunk = await (asyncio.wait_for(read, 0.2) if partial else read)
            except TimeoutError:
                chunk, ready, partial = b"", partial, b""
            else:
                if not chunk:
                    if partial and self.on_log is not None:
                        self.on_log(self, partial)
                    return
                data = partial + chunk
                cut = data.rfind(b"\n") + 1
                ready, partial = data[:cut], data[cut:]
                if len(partial) >= 65536:
                    ready, partial = data, b""
            if ready and self.on_log is not None:
                self.on_log(self, ready)

    async def _confirm_exit(self) -> None:
        """The socket closed. Normally the exit code follows; if its reporter (the zygote)
        is gone too, notice the exit from the pid alone."""
        for _ in range(40):
            if self.exited.done():
                return
            await asyncio.sleep(0.05)
        if not pid_alive(self.pid) and not self.exited.done():
            self.exited.set_result(None)

    async def watch(self) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump_logs())
        code = await self.exited
        try:
            await asyncio.wait_for(pump, 1.0)
        except TimeoutError:
            pump.cancel()
        self.state = WorkerState.EXITED
        sig = -code if code is not None and code < 0 else None
        info = ExitInfo(
            exit_code=None if sig else code,
            signal=sig,
            oom=sig == signal.SIGKILL and _oom_kills() > self._oom_before,
        )
        if self.on_exit is not None:
            self.on_exit(self, info)


class ProcessManager:
    """Makes workers (forked from the zygote) and keeps `warm` idle ones ready."""

    def __init__(
        self, socket_path: str, *, pod: str, warm: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.socket_path = socket_path
        self.pod = pod
        self.env = env or {}
        self.warm = warm
        self.workers: dict[int, WorkerProcess] = {}
        self._idle: list[WorkerProcess] = []
        self._starting = 0
        self._ids = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawning: set[int] = set()
        self._early: dict[int, FrameChannel] = {}
        self._zygote: socket.socket | None = None
        self._zygote_writer: asyncio.StreamWriter | None = None
        self.zygote_pid: int | None = None
        self._forks: dict[int, asyncio.Future[int]] = {}
        self._by_pid: dict[int, WorkerProcess] = {}
        self._exits: dict[int, int] = {}

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            KT_IN_WORKER="1",
            KT_POD=self.pod,
            KT_SUPERVISOR_PID=str(os.getpid()),
            **self.env,
        )

    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the zygote ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the zygote; without it (it failed), workers are spawned instead."""
        ours, theirs = socket.socketpair()
        try:
            zygote = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kt.supervisor.zygote",
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=self._env(),
            )
        except OSError as exc:
            logger.warning("no zygote (%s): workers will be spawned", exc)
            ours.close()
            return
        finally:
            theirs.close()
        self.zygote_pid = zygote.pid
        self._zygote = ours  # requests are written here, blocking (they are tiny)
        # The event loop takes ownership of the socket it reads from: give it a dup.
        # Keep the writer: when it is garbage-collected it closes the transport.
        reader, self._zygote_writer = await asyncio.open_unix_connection(sock=ours.dup())
        self._task(self._read_zygote(reader))

    async def _read_zygote(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            event = orjson.loads(line)
            if "spawned" in event:
                fut = self._forks.pop(int(event["spawned"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(int(event["pid"]))
            elif "exited" in event:
                pid, code = int(event["exited"]), int(event["code"])
                worker = self._by_pid.pop(pid, None)
                if worker is None:
                    self._exits[pid] = code  # exited before we knew its pid
                elif not worker.exited.done():
                    worker.exited.set_result(code)
        if not self._closing:
            logger.info("the zygote exited: workers will be spawned from now on")
        self._zygote = None
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(OSError("the zygote exited"))

    async def _fork(self, worker_id: int) -> WorkerProcess:
        assert self._zygote is not None
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        fut: asyncio.Future[int] = loop.create_future()
        self._forks[worker_id] = fut
        try:
            request = orjson.dumps({"worker": worker_id, "socket": self.socket_path}) + b"\n"
            socket.send_fds(self._zygote, [request], [write_fd])
        finally:
            os.close(write_fd)
        try:
            pid = await asyncio.wait_for(fut, 30)
        except BaseException:
            os.close(read_fd)
            raise
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        worker = WorkerProcess(worker_id, pid, reader)
        self._by_pid[pid] = worker
        if pid in self._exits:
            worker.exited.set_result(self._exits.pop(pid))
        return worker

    async def _spawn_process(self, worker_id: int) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kt.supervisor.worker",
            self.socket_path,
            str(worker_id),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(),
        )
        assert proc.stdout is not None
        worker = WorkerProcess(worker_id, proc.pid, proc.stdout)

        async def wait() -> None:
            code = await proc.wait()
            if not worker.exited.done():
                worker.exited.set_result(code)

        self._task(wait())
        return worker

    # -- workers -------------------------------------------------------------------------
    async def spawn(self) -> WorkerProcess:
        worker_id = next(self._ids)
        self._spawning.add(worker_id)
        try:
            if self._zygote is not None:
                try:
                    worker = await self._fork(worker_id)
                except OSError as exc:
                    logger.warning("fork through the zygote failed (%s); spawning", exc)
                    worker = await self._spawn_process(worker_id)
            else:
                worker = await self._spawn_process(worker_id)
        finally:
            self._spawning.discard(worker_id)
        self.workers[worker_id] = worker
        early = self._early.pop(worker_id, None)
        if early is not None:  # it connected before we had its process record
            worker.attach(early)
        self._task(self._watch(worker))
        return worker

    async def _watch(self, worker: WorkerProcess) -> None:
        await worker.watch()
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
        while len(self._idle) + self._starting < self.warm:
            self._starting += 1
            self._task(self._spawn_warm())

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
        if self._zygote is not None:
            self._zygote.close()
        if self._zygote_writer is not None:  # its dup: the zygote sees EOF only when both close
            self._zygote_writer.close()
