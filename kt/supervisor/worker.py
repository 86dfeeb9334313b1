"""The worker main loop: the process that holds one actor and runs its methods.

Started warm by the process manager (`python -m kt.supervisor.worker SOCKET ID`), it
connects to the supervisor's Unix socket and waits. CREATE_ACTOR turns it into an actor;
each CALL runs one method:

- sync methods run inline on the loop thread, so calls run in submission order;
  with `max_concurrency > 1` they run on a thread pool of that size instead;
- `async def` methods run as tasks, so they interleave (and await other actors);
- generator methods (sync or async) stream ITEM frames, then a RESULT ends the stream.

Every reply echoes the request's `route` so the supervisor can relay it without a lookup.

Refs lent and borrowed (`kt.core.ref`) go through this process's caller runtime, never
through the loop that runs sync methods (a sync method blocked in `kt.get` on a borrowed
Ref would wait for itself): the runtime keeps a *home link* to this pod's supervisor,
which relays WAITs for this actor's lent Refs to it and delivers the answers to WAITs
this host sent. A WAIT for a Ref that arrived in a call is sent on the host's own
channel, so that the caller sees it before the call's RESULT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import site
import socket
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from kt.core import protocol, serialization, shm
from kt.core.channel import FrameChannel
from kt.core.errors import (
    ActorDiedError,
    DeathCause,
    ImageError,
    KtError,
    OwnerDiedError,
    SerializationError,
    SyncError,
)
from kt.core.methods import RUN_METHOD, MethodKind, method_kind, resolve_hook
from kt.core.protocol import LEND_ID, FrameFlag, FrameKind
from kt.core.ref import Borrower, PendingRefError, Ref, borrowing, lending
from kt.core.runtime import Borrow, Link, LinkState, new_event_loop, shared_runtime
from kt.core.shm import ShmArena

# Plain ints on the hot path: enum member lookups and IntFlag's & are Python code.
_SHM_OK = int(FrameFlag.SHM_OK)
_LENDS = int(FrameFlag.LENDS)
_CALL, _CREATE, _CANCEL = int(FrameKind.CALL), int(FrameKind.CREATE_ACTOR), int(FrameKind.CANCEL)


class ActorHost:
    """Holds the actor instance and runs calls on it."""

    def __init__(self, channel: FrameChannel, pod: str) -> None:
        self.channel = channel
        self.pod = pod
        self.instance: Any = None
        self.cls_name = "Actor"
        self.actor_id = ""
        self.init_error = ""
        self._arena: ShmArena | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.loop = asyncio.get_running_loop()
        self._methods: dict[bytes, tuple[str, Callable[..., Any], int]] = {}
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self._home: Link | None = None

    def on_frame(
        self,
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> None:
        if kind == _CALL:
            self.call(route, req_id, flags, header, payload)
        elif kind == _CREATE:
            self.create(route, req_id, header, payload)
        elif kind == _CANCEL:
            task = self._tasks.get(req_id)
            if task is not None:
                task.cancel()

    # -- replies -----------------------------------------------------------------------
    def reply(
        self,
        route: int,
        req_id: int,
        value: Any,
        what: str,
        kind: int = FrameKind.RESULT,
        shm: bool = False,
    ) -> None:
        header, flags = b"", 0
        try:
            try:
                parts = serialization.dumps_value(value, what, self.arena() if shm else None)
            except PendingRefError:  # the result holds a Ref still running: lend it
                self.home()  # borrowers will ask for it there
                with lending(once=True):
                    parts = serialization.dumps_value(value, what, self.arena() if shm else None)
                header, flags = protocol.orjson_dumps({"a": self.actor_id}), _LENDS
        except (SerializationError, OSError, KtError) as exc:
            self.reply_error(route, req_id, exc, what)
            return
        size = serialization.parts_size(parts)
        prefix = protocol.encode_prefix(kind, req_id, header, size, flags=flags, route=route)
        self.channel.send_parts([prefix, header, *parts])

    # -- ownership ------------------------------------------------------------------------
    def home(self) -> Link:
        """This process's caller link to its own supervisor, opened on first use (blocks).

        Raises:
            PodLostError, AuthError: the supervisor cannot be reached.
        """
        if self._home is None or self._home.state is LinkState.CLOSED:
            host, _, port = os.environ.get("KT_SUPERVISOR_ADDR", "").rpartition(":")
            runtime = shared_runtime(caller=f"actor-{os.getpid()}", stream_logs=False)
            coro = runtime.connect((host, int(port)), os.environ.get("KT_TOKEN", ""))
            self._home = runtime.run(coro, timeout=60)
        return self._home

    def borrower(self, route: int) -> Borrower:
        """Ask the caller on `route` for each Ref it lent in a call's arguments."""
        owner = "the caller that passed it"

        def borrow(lend_id: int, ref: Ref[Any]) -> None:
            try:
                home = self.home()
            except (OSError, KtError) as exc:
                ref.set_exception(OwnerDiedError(ref.label, owner, f"no link to the pod: {exc}"))
                return
            req_id = home.runtime.new_id()
            # Adopted before the WAIT leaves: its answer comes back on the home link, on
            # the runtime's thread, and one that arrived first would find no borrower.
            home.runtime.run(_adopt(home, req_id, Borrow(ref, {"r": route}, owner)), timeout=60)
            header = protocol.orjson_dumps({"r": route, "l": ref.label})
            self.channel.send(
                protocol.encode(FrameKind.WAIT, req_id, header, LEND_ID.pack(lend_id), route=route)
            )
            self.channel.flush()  # now: the method about to run may block this loop

        return borrow

    def arena(self) -> ShmArena:
        if self._arena is None:
            self._arena = ShmArena()
        return self._arena

    def reply_error(
        self, route: int, req_id: int, exc: BaseException, what: str, header: bytes = b""
    ) -> None:
        tb = "".join(traceback.format_exception(exc))
        where = f"{what} on pod {self.pod} (pid {os.getpid()})"
        payload = serialization.dumps_exception(exc, where, tb)
        self.channel.send(
            protocol.encode(
                FrameKind.RESULT, req_id, header, payload, flags=FrameFlag.ERROR, route=route
            )
        )

    # -- creation ------------------------------------------------------------------------
    def create(self, route: int, req_id: int, header: memoryview, payload: memoryview) -> None:
        spec = protocol.decode_header(header)
        self.cls_name = spec.get("cls", "Actor")
        self.actor_id = spec.get("actor", "")
        os.environ["KT_ACTOR_ID"] = self.actor_id  # names this actor in its runtime's HELLOs
        what = f"{self.cls_name}.__init__"
        # Before unpickling: torch and friends read their environment at import.
        os.environ.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
        sys.argv = [self.cls_name]  # argparse in user code names the actor, not zygote.py
        try:
            if spec.get("image"):
                use_image(str(spec["image"]))
            if spec.get("sync"):
                use_synced_tree(spec["sync"])
            cls, args, kwargs = serialization.loads(bytes(payload))
            concurrency = int(spec.get("max_concurrency", 1))
            if concurrency > 1:
                self.pool = concurrent.futures.ThreadPoolExecutor(concurrency, "kt-actor")
            self.instance = cls(*args, **kwargs)
        except BaseException as exc:
            tree = os.environ.get("KT_SYNCED_TREE")
            if isinstance(exc, ModuleNotFoundError) and tree:
                exc = ModuleNotFoundError(
                    f"module {exc.name!r} cannot be imported on pod {self.pod}: it is not in "
                    f"the synced project at {tree}, nor installed there. Is it outside "
                    "sync_dir, or excluded by .gitignore or .ktignore?",
                    name=exc.name,
                )
            self.init_error = f"its __init__ raised {type(exc).__name__}: {exc}"[:400]
            info = protocol.orjson_dumps({"init_error": self.init_error})
            self.reply_error(route, req_id, exc, what, info)
            return
        self.reply(route, req_id, None, what)

    # -- calls ---------------------------------------------------------------------------
    def _resolve(self, header: memoryview) -> tuple[str, Callable[..., Any], int]:
        key = bytes(header)
        entry = self._methods.get(key)
        if entry is None:
            name = protocol.decode_header(header)["m"]
            if name == RUN_METHOD:
                return (f"{self.cls_name}.{name}", self._run_in_actor, MethodKind.SYNC)
            if name.startswith("__") and name != "__call__":
                raise AttributeError(f"{self.cls_name} has no public method {name!r}")
            fn = getattr(self.instance, name)
            entry = (f"{self.cls_name}.{name}", fn, method_kind(fn))
            self._methods[key] = entry
        return entry

    def _run_in_actor(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        """A registered hook, `hook(instance, ...)`, in this process (kt.distributed's)."""
        return resolve_hook(hook)(self.instance, *args, **kwargs)

    def call(
        self, route: int, req_id: int, flags: int, header: memoryview, payload: memoryview
    ) -> None:
        what = self.cls_name
        shm = bool(flags & _SHM_OK)
        if self.init_error:
            died = ActorDiedError(
                self.actor_id, self.pod, reason=self.init_error, cause=DeathCause.INIT_FAILED
            )
            self.reply_error(route, req_id, died, what)
            return
        try:
            what, fn, kind = self._resolve(header)
            data = payload if len(payload) > 65536 else bytes(payload)
            if flags & _LENDS:  # Refs still pending in the caller: borrow them
                with borrowing(self.borrower(route)):
                    args, kwargs = serialization.loads(data)
            else:
                args, kwargs = serialization.loads(data)
        except BaseException as exc:
            self.reply_error(route, req_id, exc, what)
            return
        if kind == MethodKind.SYNC:
            if self.pool is None:
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:
                    self.reply_error(route, req_id, exc, what)
                    return
                self.reply(route, req_id, value, what, shm=shm)
            else:
                future = self.loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
                future.add_done_callback(lambda f: self._done(route, req_id, what, shm, f))
        elif kind == MethodKind.ASYNC:
            coro = fn(*args, **kwargs)
            task = self.loop.create_task(_contained(coro))
            self._tasks[req_id] = task
            task.add_done_callback(lambda t: self._done(route, req_id, what, shm, t, coro))
        elif kind == MethodKind.ASYNC_GEN:
            task = self.loop.create_task(
                self._stream_async(route, req_id, what, shm, fn(*args, **kwargs))
            )
            self._tasks[req_id] = task
        else:
            self.loop.run_in_executor(
                None, self._stream_sync, route, req_id, what, shm, fn(*args, **kwargs)
            )

    def _done(
        self,
        route: int,
        req_id: int,
        what: str,
        shm: bool,
        fut: asyncio.Future[Any],
        coro: Coroutine[Any, Any, Any] | None = None,
    ) -> None:
        self._tasks.pop(req_id, None)
        if fut.cancelled():
            if coro is not None:  # cancelled before it started: it never will
                coro.close()
            self.reply_error(route, req_id, asyncio.CancelledError(f"{what} was cancelled"), what)
            return
        exc = fut.exception()
        if exc is None and type(value := fut.result()) is _Raised:
            exc = value.exc
        if exc is not None:
            self.reply_error(route, req_id, exc, what)
        else:
            self.reply(route, req_id, value, what, shm=shm)

    async def _stream_async(self, route: int, req_id: int, what: str, shm: bool, gen: Any) -> None:
        try:
            async for item in gen:
                self.reply(route, req_id, item, what, FrameKind.ITEM, shm)
        except BaseException as exc:
            self.reply_error(route, req_id, exc, what)
        else:
            self.reply(route, req_id, None, what)
        finally:
            self._tasks.pop(req_id, None)

    def _stream_sync(self, route: int, req_id: int, what: str, shm: bool, gen: Any) -> None:
        """Runs on a thread; each item is handed to the loop as it is produced."""
        send = self.loop.call_soon_threadsafe
        try:
            for item in gen:
                send(self.reply, route, req_id, item, what, FrameKind.ITEM, shm)
        except BaseException as exc:
            send(self.reply_error, route, req_id, exc, what)
        else:
            send(self.reply, route, req_id, None, what)


class _Raised:
    """An async method's SystemExit or KeyboardInterrupt, held as a value: raised out of
    its task it would end the event loop, and so the actor."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _contained(coro: Any) -> Any:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        return _Raised(exc)


async def serve(socket_path: str, worker_id: int) -> None:
    loop = asyncio.get_running_loop()
    lost = loop.create_future()
    host: ActorHost | None = None

    def on_frame(*frame: Any) -> None:
        assert host is not None
        host.on_frame(*frame)

    def on_lost(exc: Exception | None) -> None:
        if not lost.done():
            lost.set_result(None)

    channel = FrameChannel(on_frame, on_lost)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    await loop.create_unix_connection(lambda: channel, sock=sock)
    host = ActorHost(channel, os.environ.get("KT_POD", ""))
    channel.send(protocol.encode(FrameKind.HELLO, 0, {"worker": worker_id}))
    await lost


def extend_sys_path() -> None:
    """The driver's sys.path (local backend), so its modules import by reference here."""
    extra = os.environ.get("KT_SYS_PATH")
    if extra:
        for entry in reversed(extra.split(os.pathsep)):
            if entry not in sys.path:
                sys.path.insert(0, entry)


async def _adopt(link: Link, req_id: int, borrow: Borrow) -> None:
    link.adopt(req_id, borrow)


def use_image(key: str) -> None:
    """What the pool's kt.Image steps left (`kt.supervisor.image`): their environment,
    and the venv's site-packages ahead of the pod's own. Before the class is unpickled.

    Raises:
        ImageError: the image was never prepared on this pod.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise ImageError(key[:40], os.environ.get("KT_POD", "?"), None, "not an image key")
    path = os.path.join(os.environ.get("KT_IMAGE_ROOT", ""), "images", f"{key}.json")
    try:
        with open(path) as f:
            outcome = json.load(f)
    except FileNotFoundError:
        raise ImageError(key, os.environ.get("KT_POD", "?"), None, "never prepared") from None
    os.environ.update({str(k): str(v) for k, v in outcome["env"].items()})
    os.environ["KT_IMAGE_FILES"] = os.path.join(os.environ.get("KT_IMAGE_ROOT", ""), "files")
    if outcome.get("site"):
        before = list(sys.path)
        site.addsitedir(outcome["site"])  # its .pth files too
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before


def use_synced_tree(sync: dict[str, Any]) -> None:
    """Import the user's code from its synced version (`kt.supervisor.store`): the tree's
    equivalents of the driver's project entries go first on sys.path, the driver's own
    project paths go, and the working directory is the tree's root (as Ray's
    working_dir). Done once, before the actor's class is unpickled.

    Raises:
        SyncError: the version's tree is not on this pod.
    """
    tree = os.path.join(os.environ.get("KT_SYNC_ROOT", ""), "trees", str(sync["v"]))
    if not os.path.isdir(tree):
        raise SyncError(f"version {sync['v']} of the project was never synced to this pod")
    dropped = {os.path.abspath(p or os.getcwd()) for p in sync.get("drop", [])}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in dropped]
    for rel in reversed(sync.get("paths", [])):
        sys.path.insert(0, os.path.normpath(os.path.join(tree, rel)))
    os.chdir(tree)
    os.environ["KT_SYNCED_TREE"] = tree


def run(socket_path: str, worker_id: int) -> None:
    """Serve until the supervisor closes the socket, then exit (never returns).

    However the loop ends -- the socket closed (the pod is going away), a SystemExit
    from a callback or signal handler of user code, any other escape -- the process
    leaves through `os._exit`, never through interpreter finalization: native threads
    of user libraries (gloo's, in a rank) that touch Python objects while the
    interpreter finalizes abort the process ("terminate called without an active
    exception"), and atexit handlers would run user code after kt reported the exit.
    """
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        loop.run_until_complete(serve(socket_path, worker_id))
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        shm.release_all()  # os._exit skips the arenas' finalizers
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    extend_sys_path()
    run(sys.argv[1], int(sys.argv[2]))
