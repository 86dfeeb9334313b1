"""Worker processes of one pod: a warm pool, spawning, exit detection, log capture.

Who calls it: `kt.supervisor.server.Supervisor`. A `WorkerProcess` is a Python process
running `kt.supervisor.worker`, forked from the zygote (kt and cloudpickle already
imported) or spawned when there is none, connected back over the pod's Unix socket. The
manager keeps `warm` of them unassigned so that placing an actor costs a message, not a
process spawn, and replaces each one it hands out. One record per worker, one state
table (`WorkerState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kt.core import cgroup
from kt.core.channel import FrameChannel
from kt.core.errors import check_move
from kt.core.liveness import pid_alive

logger = logging.getLogger(__name__)


class WorkerState(str, enum.Enum):
    """A worker's life; every change goes through `WorkerProcess._move` and WORKER_MOVES.

    SPAWNING -> STARTING -> IDLE -> ASSIGNED -> EXITED, and
    SPAWNING | STARTING -> ASSIGNED (taken before it was ready: frames wait for it),
    SPAWNING | STARTING | IDLE -> EXITED (it failed to start, or died unused).
    """

    SPAWNING = "spawning"  # its process is being made: no pid yet
    STARTING = "starting"  # it runs; its HELLO has not arrived
    IDLE = "idle"  # connected, warm, nobody's
    ASSIGNED = "assigned"  # an actor's; frames sent before it connected wait in its backlog
    EXITED = "exited"  # final


_W = WorkerState
WORKER_MOVES = {
    (_W.SPAWNING, _W.STARTING),
    (_W.STARTING, _W.IDLE),
    (_W.IDLE, _W.ASSIGNED),
    (_W.SPAWNING, _W.ASSIGNED),
    (_W.STARTING, _W.ASSIGNED),
    *((s, _W.EXITED) for s in (_W.SPAWNING, _W.STARTING, _W.IDLE, _W.ASSIGNED)),
}
_FREE = {_W.IDLE: 0, _W.STARTING: 1, _W.SPAWNING: 2}  # the readiest is handed out first
FORK_SEND_S = 30.0  # a zygote that takes no fork request for this long is given up
FORK_REPORT_S = 30.0  # a fork is spawned instead once the zygote reports nothing this long
CONNECT_TIMEOUT_S = 60.0  # a warm worker that has not said HELLO by then is killed
SPAWNS_AT_ONCE = 4
"""Fresh interpreters starting at once, each until it says HELLO or exits: with the
zygote gone in a burst, spawning every waiting worker at once forked the supervisor
dozens of times in one turn of its loop and starved it past its driver's heartbeat."""


@dataclass
class ExitInfo:
    exit_code: int | None
    signal: int | None
    oom: bool


def _oom_kills() -> int:
    """The pod's OOM-kill count so far (its memory cgroup's; 0 when unreadable)."""
    return cgroup.oom_kills()


class WorkerProcess:
    """One worker, from the moment its id is chosen until its exit is known.

    It is the only record of the worker: the zygote's reports (pid, exit code), an early
    HELLO (a forked worker can connect before the fork's report arrives) and the
    supervisor's frames all land here. Frames sent before the worker has connected wait
    in `_backlog`.
    """

    def __init__(self, worker_id: int, pod: str) -> None:
        loop = asyncio.get_running_loop()
        self.id = worker_id
        self.pod = pod
        self.pid: int | None = None
        self.state = WorkerState.SPAWNING
        self.channel: FrameChannel | None = None
        self.label = "worker"
        """What it runs (an actor's class), for its log lines."""
        self.on_log: Callable[[WorkerProcess, bytes], None] | None = None
        self.on_exit: Callable[[WorkerProcess, ExitInfo], None] | None = None
        self.spawned: asyncio.Future[int] = loop.create_future()
        """Its pid once the process exists; OSError when it could not be made."""
        self.connected: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        """The exit code (negative: killed by that signal; None: unknown)."""
        self._backlog: list[bytes | bytearray | memoryview] = []
        self._oom_before = _oom_kills()
        self.fork_given_up = False
        """The zygote did not report its fork in time: it is spawned instead."""
        self.peer_pid: int | None = None
        """The pid of the process that connected as this worker (SO_PEERCRED)."""

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.id} pid={self.pid} {self.state.value}>"

    @property
    def log_source(self) -> str:
        return f"({self.label} pid={self.pid} pod={self.pod})"

    def _move(self, to: WorkerState) -> None:
        check_move(WORKER_MOVES, f"worker {self.id}", self.state, to)
        self.state = to

    def _ready_if_connected(self) -> None:
        if self.state is _W.STARTING and self.channel is not None:
            self._move(_W.IDLE)

    def started(self, pid: int, *, forked: bool = False) -> bool:
        """Its process exists (the zygote's report, or a spawn). False, and nothing
        changed, for a fork reported after it was given up (it is spawned instead)."""
        if forked and self.fork_given_up:
            return False
        self.pid = pid
        if not self.spawned.done():
            self.spawned.set_result(pid)
        if self.state is _W.SPAWNING:
            self._move(_W.STARTING)
        self._ready_if_connected()
        return True

    def attach(self, channel: FrameChannel) -> None:
        """Its HELLO arrived on `channel`: send what waited, watch for the socket's end."""
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
        self._ready_if_connected()

    def assign(self) -> None:
        self._move(_W.ASSIGNED)

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self.channel is not None:
            self.channel.send(frame)
        elif self.state is not _W.EXITED:
            self._backlog.append(frame)

    def kill(self) -> None:
        if self.pid is not None and self.state is not _W.EXITED:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def failed_to_start(self, exc: OSError) -> None:
        if not self.spawned.done():
            self.spawned.set_exception(exc)
            self.spawned.exception()  # retrieved: whoever waits sees it, nobody must
        self._move(_W.EXITED)

    async def _confirm_exit(self) -> None:
        """The socket closed. Normally the exit code follows; if its reporter (the zygote)
        is gone too, notice the exit from the pid alone."""
        for _ in range(40):
            if self.exited.done():
                return
            await asyncio.sleep(0.05)
        if self.pid is not None and not pid_alive(self.pid) and not self.exited.done():
            self.exited.set_result(None)

    async def watch(self, stdout: asyncio.StreamReader) -> WorkerState:
        """Forward its output until it exits, then report how it ended; returns the
        state it was in."""
        pump = asyncio.get_running_loop().create_task(self._pump_logs(stdout))
        code = await self.exited
        try:
            await asyncio.wait_for(pump, 1.0)
        except TimeoutError:
            pump.cancel()
        was = self.state
        self._move(_W.EXITED)
        sig = -code if code is not None and code < 0 else None
        info = ExitInfo(
            exit_code=None if sig else code,
            signal=sig,
            oom=sig == signal.SIGKILL and _oom_kills() > self._oom_before,
        )
        if self.on_exit is not None:
            self.on_exit(self, info)
        return was

    async def _pump_logs(self, stdout: asyncio.StreamReader) -> None:
        """Whole lines to `on_log`: `print` writes its text and its newline apart, and a
        line cut between two reads would show as two. A partial line is held until its
        newline, 64 KiB, 0.2 s without more output (a progress bar), or the end."""
        partial = b""
        while True:
            try:
                read = stdout.read(65536)
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


class ProcessManager:
    """Makes workers (forked from the zygote) and keeps `warm` unassigned ones ready.

    `workers` holds every worker not yet EXITED, whatever its state; nothing else tracks
    a worker. A worker is made by `_new` (SPAWNING at once) and its process by `_run`,
    which then watches it until it exits.
    """

    def __init__(
        self, socket_path: str, *, pod: str, warm: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.socket_path = socket_path
        self.pod = pod
        self.env = env or {}
        self.warm = warm
        self.workers: dict[int, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._zygote: socket.socket | None = None
        self._zygote_lock = asyncio.Lock()
        self._zygote_writer: asyncio.StreamWriter | None = None
        self._zygote_gone: asyncio.Event | None = None
        self.zygote_pid: int | None = None
        self._zygote_heard = 0.0  # loop time of its last report (`_fork` waits on it)
        self._spawn_room: asyncio.Semaphore | None = None  # SPAWNS_AT_ONCE; made on the loop

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
        self._zygote_gone = asyncio.Event()
        self._zygote = ours  # requests are written here (`_send_with_fd`)
        # The event loop takes ownership of the socket it reads from: give it a dup (which
        # shares the file's flags: both ends are non-blocking from then on).
        # Keep the writer: when it is garbage-collected it closes the transport.
        reader, self._zygote_writer = await asyncio.open_unix_connection(sock=ours.dup())
        self._task(self._read_zygote(reader))

    async def _read_zygote(self, reader: asyncio.StreamReader) -> None:
        """The zygote's reports, in the order it made them: a worker's pid always comes
        before its exit code, so both find the worker."""
        try:
            while line := await reader.readline():
                self._zygote_said(orjson.loads(line))
        except OSError as exc:  # a reset, when it was killed with data unread
            logger.debug("the zygote's socket: %s", exc)
        if not self._closing:
            logger.info("the zygote exited: workers will be spawned from now on")
        self._zygote = None
        assert self._zygote_gone is not None
        self._zygote_gone.set()  # forks asked of it and never reported are spawned instead

    def _zygote_said(self, event: dict[str, Any]) -> None:
        self._zygote_heard = asyncio.get_running_loop().time()
        if "spawned" in event:
            worker = self.workers.get(int(event["spawned"]))
            pid = int(event["pid"])
            if worker is None or not worker.started(pid, forked=True):  # too late: spawned
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif "exited" in event:
            pid, code = int(event["exited"]), int(event["code"])
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is not None and not worker.exited.done():
                worker.exited.set_result(code)

    async def _fork(self, worker: WorkerProcess) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            request = orjson.dumps({"worker": worker.id, "socket": self.socket_path}) + b"\n"
            async with self._zygote_lock:  # one request at a time: they must not interleave
                await self._request_fork(request, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert self._zygote_gone is not None
        gone = asyncio.get_running_loop().create_task(self._zygote_gone.wait())
        either: list[asyncio.Future[Any]] = [worker.spawned, gone]
        # Give up only once the zygote has been silent for FORK_REPORT_S: a burst's requests
        # queue in its socket, and the last one waits for all the forks before it.
        sent = loop.time()
        try:
            while not (worker.spawned.done() or gone.done()):
                left = max(sent, self._zygote_heard) + FORK_REPORT_S - loop.time()
                if left <= 0:
                    break
                await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not worker.spawned.done() and worker.peer_pid is not None:
            # The zygote died between its fork and its report, and the child connected:
            # it is this worker (its pid from the socket); its exit is noticed by pid.
            worker.started(worker.peer_pid, forked=True)
        if not worker.spawned.done():
            os.close(read_fd)
            worker.fork_given_up = True
            raise OSError(
                "the zygote exited"
                if self._zygote_gone.is_set()
                else f"the zygote reported nothing for {FORK_REPORT_S:g} s"
            )
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        return reader

    async def _request_fork(self, request: bytes, fd: int) -> None:
        """Write one fork request (under `_zygote_lock`).

        Raises:
            OSError: the zygote is gone, or took nothing for FORK_SEND_S (then it is given
                up: a request written in part leaves its stream out of step).
        """
        sock = self._zygote  # read under the lock: it may have exited while we waited
        if sock is None:
            raise OSError("the zygote exited")
        try:
            await asyncio.wait_for(_send_with_fd(sock, request, fd), FORK_SEND_S)
        except TimeoutError:
            logger.warning("the zygote took no fork request for %g s: spawning", FORK_SEND_S)
            self._zygote = None
            sock.close()
            raise OSError(f"the zygote took no fork request for {FORK_SEND_S:g} s") from None

    async def _spawn(self, worker: WorkerProcess) -> asyncio.StreamReader:
        if self._spawn_room is None:
            self._spawn_room = asyncio.Semaphore(SPAWNS_AT_ONCE)
        room = self._spawn_room
        await room.acquire()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kt.supervisor.worker",
                self.socket_path,
                str(worker.id),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env(),
            )
        except BaseException:
            room.release()
            raise
        released = False

        def release(_: Any) -> None:  # once it is up (HELLO) or gone
            nonlocal released
            if not released:
                released = True
                room.release()

        worker.connected.add_done_callback(release)
        worker.exited.add_done_callback(release)
        assert proc.stdout is not None
        worker.started(proc.pid)

        async def wait() -> None:
            code = await proc.wait()
            if not worker.exited.done():
                worker.exited.set_result(code)

        self._task(wait())
        return proc.stdout

    # -- workers -------------------------------------------------------------------------
    def _new(self) -> WorkerProcess:
        worker = WorkerProcess(next(self._ids), self.pod)
        self.workers[worker.id] = worker
        self._task(self._run(worker))
        return worker

    async def _run(self, worker: WorkerProcess) -> None:
        """Make the worker's process, then watch it until it exits."""
        try:
            stdout = None
            if self._zygote is not None:
                try:
                    stdout = await self._fork(worker)
                except OSError as exc:
                    logger.warning("fork through the zygote failed (%s); spawning", exc)
            if stdout is None:
                stdout = await self._spawn(worker)
        except OSError as exc:
            logger.warning("worker %d could not be started: %s", worker.id, exc)
            worker.failed_to_start(OSError(f"no worker process could be started: {exc}"))
            self.workers.pop(worker.id, None)
            return
        self._task(self._connect_or_kill(worker))
        was = await worker.watch(stdout)
        self.workers.pop(worker.id, None)
        if was is _W.IDLE:  # not one that died starting: that would spawn in a loop
            self.top_up()

    async def _connect_or_kill(self, worker: WorkerProcess) -> None:
        """A worker that never says HELLO would be waited for, or counted warm, for ever."""
        both: list[asyncio.Future[Any]] = [worker.connected, worker.exited]
        await asyncio.wait(both, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if not worker.connected.done() and not worker.exited.done():
            logger.warning(
                "worker %d did not connect within %g s: killed", worker.id, CONNECT_TIMEOUT_S
            )
            worker.kill()

    def connected(self, worker_id: int, channel: FrameChannel) -> bool:
        """A worker said HELLO; False if no worker of that id is known here, or if the
        process that connected is not the one made for it: a child the zygote forked
        just before it died, whose worker was spawned anew (that stray is killed)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.channel is not None:
            return False
        peer = _peer_pid(channel)
        if worker.pid is not None:
            mine = peer is None or peer == worker.pid
        else:  # a fork not reported yet is whoever connects, unless it was given up
            mine = not worker.fork_given_up
        if not mine:
            logger.warning("worker %d: pid %s is not its process: killed", worker_id, peer)
            if peer is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(peer, signal.SIGKILL)
            return False
        worker.peer_pid = peer
        worker.attach(channel)
        return True

    def top_up(self) -> None:
        """Start workers until `warm` of them are unassigned (idle, or on their way)."""
        if self._closing:
            return
        free = sum(w.state in _FREE for w in self.workers.values())
        for _ in range(self.warm - free):
            self._new()

    async def acquire(self) -> WorkerProcess:
        """The readiest unassigned worker (a new one when none is), once its process
        exists; frames sent to it wait until it connects.

        Raises:
            OSError: no process could be made for it.
        """
        free = [w for w in self.workers.values() if w.state in _FREE]
        worker = min(free, key=lambda w: (_FREE[w.state], w.id)) if free else self._new()
        worker.assign()
        self.top_up()
        await asyncio.shield(worker.spawned)
        return worker

    def close(self) -> None:
        self._closing = True
        for worker in list(self.workers.values()):
            worker.kill()
        if self._zygote is not None:
            self._zygote.close()
        if self._zygote_writer is not None:  # its dup: the zygote sees EOF only when both close
            self._zygote_writer.close()


async def _send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send `data` with `fd` attached to its first byte on a non-blocking stream socket,
    waiting for room when the peer is slow to read (a burst of forks fills the buffer)."""
    loop = asyncio.get_running_loop()
    sent = 0
    while sent < len(data):
        try:
            if sent == 0:
                sent = socket.send_fds(sock, [data], [fd])
            else:
                sent += sock.send(data[sent:])
        except BlockingIOError:
            await _writable(loop, sock)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    room: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not room.done():
            room.set_result(None)

    fd = sock.fileno()  # once: a socket closed meanwhile says -1, and the entry would stay
    loop.add_writer(fd, wake)
    try:
        await room
    finally:
        loop.remove_writer(fd)


def _peer_pid(channel: FrameChannel) -> int | None:
    """The pid at the other end of a Unix socket (Linux SO_PEERCRED); None elsewhere."""
    transport = channel.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[0])
