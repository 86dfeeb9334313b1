"""The caller's side of the call channel: one event-loop thread, one link per pod.

Who calls it: handles in `kt.actors`, from the user's threads (any number) and from
inside actor processes (for handles passed to them). Theory of operation:

- Calls are built (serialized, framed) on the calling thread and pushed onto a deque;
  the first push after a flush wakes the loop with one `call_soon_threadsafe`, so a burst
  of 10,000 `.remote()` calls costs one wake-up and a few large writes, not 10,000.
- Each pod gets one `Link`: a TCP connection that authenticates with HELLO before any
  call, then multiplexes every call by request id.
- Results complete Refs on the loop thread; their waiters are handed back to the user's
  loop in batches (see `kt.core.ref`).
- Ownership (see `kt.core.ref`): a result that lends Refs (flag LENDS) is unpickled with
  a borrower that sends one WAIT per lent Ref back on the same link; a WAIT arriving
  from a pod asks for a Ref this process lent, answered from this thread when it is done.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import enum
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kt.core import dial, output, protocol, shm
from kt.core.channel import FrameChannel
from kt.core.config import config
from kt.core.errors import (
    AuthError,
    CancelledError,
    GetTimeoutError,
    KtError,
    OwnerDiedError,
    PodLostError,
    ProtocolError,
    SerializationError,
    seconds,
)
from kt.core.logdedup import LogDeduplicator
from kt.core.protocol import LEND_ID, FrameFlag, FrameKind
from kt.core.ref import (
    Borrower,
    Callback,
    PendingRefError,
    Ref,
    RefState,
    StreamRef,
    borrowing,
    dispatch,
    lending,
    lent,
    run_callbacks,
)
from kt.core.serialization import (
    Parts,
    RemoteTraceback,
    dumps_exception,
    dumps_value,
    loads,
    loads_exception,
    parts_size,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
Address = tuple[str, int]
Pending = Ref[Any] | StreamRef[Any]
DIRECT_SEND = os.environ.get("KT_DIRECT_SEND", "1") != "0"
"""A caller's thread writes a lone call to the socket itself (see Link.submit_direct)."""
# Plain ints on the hot path: enum member lookups and IntFlag's & are Python code.
_ERROR = int(FrameFlag.ERROR)
_LENDS = int(FrameFlag.LENDS)
_RESULT = int(FrameKind.RESULT)
HEARTBEAT_S = 1.0
PING_FRAME = protocol.encode(FrameKind.PING, 0)
_done = RefState.DONE
_failed = RefState.FAILED


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()


class LinkState(str, enum.Enum):
    """CONNECTING -> READY -> CLOSED; CONNECTING -> CLOSED (refused or unreachable)."""

    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


def _to_stdout(text: str) -> None:
    sys.stdout.write(text)  # sys.stdout as it is now: a redirection is followed
    sys.stdout.flush()


def undecodable(label: str, exc: BaseException) -> SerializationError:
    """The error for a result that arrived but cannot be unpickled here, naming what is
    missing (the call did run)."""
    if isinstance(exc, ModuleNotFoundError):
        why = (
            f"module {exc.name!r} is not importable in this process; return a type both "
            "sides can import, or plain data"
        )
    else:
        why = f"{type(exc).__name__}: {exc}"
    error = SerializationError(label, "the result", why, loading=True)
    error.__cause__ = exc
    return error


class Borrow:
    """A borrowed Ref waiting for its owner's answer to a WAIT."""

    __slots__ = ("owner", "ref", "target")

    def __init__(self, ref: Ref[Any], target: dict[str, Any], owner: str) -> None:
        self.ref = ref
        self.target = target  # the WAIT header that reaches the owner from this link
        self.owner = owner


class Link:
    """A caller's authenticated connection to one pod's supervisor.

    Set against the supervisor's `Peer`: a Link dials out and owns the Refs of the calls
    it carries; a Peer is the supervisor's end of some caller's Link.
    """

    def __init__(self, runtime: Runtime, address: Address, token: str) -> None:
        self.runtime = runtime
        self.address = address
        self.token = token
        self.pod = f"{address[0]}:{address[1]}"
        self.state = LinkState.CONNECTING
        self.inflight: dict[int, Pending] = {}
        self.borrowed: dict[int, Borrow] = {}
        self.ready = asyncio.Event()  # set once READY or CLOSED
        self.channel: FrameChannel | None = None
        self._queued: list[Parts] = []
        self._failure: KtError | None = None
        self.same_host = False
        self.rx = 0  # frames received: the heartbeat looks for news by it
        self._rx_seen = 0
        self._quiet_since: float | None = None

    async def open(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        welcome: asyncio.Future[None] = loop.create_future()
        self._welcome = welcome
        try:
            relayed = await dial.through_gateway(self.address, self.token, timeout)
            factory = lambda: FrameChannel(self._on_frame, self._on_lost)  # noqa: E731
            if relayed is None:
                connecting = loop.create_connection(factory, *self.address)
            else:
                connecting = loop.create_connection(factory, sock=relayed)
            _, channel = await asyncio.wait_for(connecting, timeout)
            self.channel = channel
            channel.write_lock = threading.Lock()
            hello = {
                "v": protocol.VERSION,
                "token": self.token,
                "caller": self.runtime.caller,
                "host": shm.host_key(),
                "actor": os.environ.get("KT_ACTOR_ID", ""),
            }
            channel.send(protocol.encode(FrameKind.HELLO, 0, hello))
            await asyncio.wait_for(welcome, timeout)
        except (TimeoutError, OSError) as exc:
            self._fail(PodLostError(self.pod, f"cannot connect: {exc or 'timed out'}"))
            return
        except KtError as exc:
            self._fail(exc)
            return
        for parts in self._queued:  # before READY: a direct send must not overtake these
            channel.send_parts(parts)
        self._queued.clear()
        self.state = LinkState.READY
        self.ready.set()

    def submit_direct(self, req_id: int, parts: Parts, ref: Pending) -> bool:
        """From a caller's thread: write the call to the socket now, if that keeps order.

        Returns False (nothing done) when it cannot; the caller then goes through the loop.
        """
        channel = self.channel
        if channel is None or self.state is not LinkState.READY or channel.write_lock is None:
            return False
        if self.inflight:
            return False  # a burst: the loop batches it into few writes; this is for lone calls
        data = b"".join(parts)
        with channel.write_lock:
            self.inflight[req_id] = ref
            if not channel.write_now(data):
                if self.inflight.pop(req_id, None) is not None:
                    return False  # nothing written: the caller sends it through the loop
                # the link failed meanwhile (the loop swapped `inflight` out): fail the
                # call here too, in case it went into the old dict after its calls failed
                failure = self._failure or PodLostError(self.pod, "connection lost")
                self.runtime.complete(ref._finish(_failed, failure))
                return True
        if self.state is not LinkState.READY and self.inflight.pop(req_id, None) is not None:
            # the link failed between our check and our write: fail the call like the rest
            failure = self._failure or PodLostError(self.pod, "connection lost")
            self.runtime.complete(ref._finish(_failed, failure))
        return True

    def submit(self, req_id: int, parts: Parts, ref: Pending) -> None:
        if self.state is LinkState.CLOSED:
            assert self._failure is not None
            self.runtime.complete(ref._finish(_failed, self._failure))
            return
        self.inflight[req_id] = ref
        if self.state is LinkState.READY:
            assert self.channel is not None
            self.channel.send_parts(parts)
        else:
            self._queued.append(parts)

    def send(self, frame: bytes) -> None:
        self.send_parts([frame])

    def send_parts(self, parts: Parts) -> None:
        """A frame that is not a call (CANCEL, PING, WAIT, an answer); dropped once CLOSED."""
        if self.state is LinkState.READY and self.channel is not None:
            self.channel.send_parts(parts)
        elif self.state is LinkState.CONNECTING:
            self._queued.append(parts)

    # -- borrowing (loop thread) ------------------------------------------------------------
    def borrower(self, target: dict[str, Any], owner: str) -> Borrower:
        """Ask for each Ref lent in a payload from this link with a WAIT to `target`."""

        def borrow(lend_id: int, ref: Ref[Any]) -> None:
            req_id = self.runtime.new_id()
            self.adopt(req_id, Borrow(ref, target, owner))
            header = protocol.orjson_dumps({**target, "l": ref.label})
            self.send(protocol.encode(FrameKind.WAIT, req_id, header, LEND_ID.pack(lend_id)))

        return borrow

    def adopt(self, req_id: int, borrow: Borrow) -> None:
        """Expect the answer to WAIT `req_id` on this link (the actor host sends its WAITs
        on its own channel, and hands the borrow over here first)."""
        if self.state is LinkState.CLOSED:
            self.runtime.complete(borrow.ref._finish(_failed, self._owner_gone(borrow)))
        else:
            self.borrowed[req_id] = borrow

    def _owner_gone(self, borrow: Borrow) -> OwnerDiedError:
        return OwnerDiedError(borrow.ref.label, borrow.owner, f"lost the link to pod {self.pod}")

    def _answered(self, borrow: Borrow, flags: int, payload: memoryview) -> None:
        try:
            self._answer_of(borrow, flags, payload)
        except Exception as exc:  # this Ref only
            self.runtime.complete(borrow.ref._finish(_failed, undecodable(borrow.ref.label, exc)))

    def _answer_of(self, borrow: Borrow, flags: int, payload: memoryview) -> None:
        if flags & _ERROR:
            exc = loads_exception(payload)
            if isinstance(exc, OwnerDiedError) and exc.owner == "":
                exc.owner = borrow.owner
            self.runtime.complete(borrow.ref._finish(_failed, exc))
        elif flags & _LENDS:
            with borrowing(self.borrower(borrow.target, borrow.owner)):
                value = loads(payload)
            self.runtime.complete(borrow.ref._finish(_done, value))
        else:
            self.runtime.complete(borrow.ref._finish(_done, loads(payload)))

    def _loads_lent(self, header: memoryview, payload: memoryview) -> Any:
        """A worker's RESULT or ITEM that lends Refs: its actor owns them."""
        actor = protocol.decode_header(header).get("a", "")
        with borrowing(self.borrower({"a": actor}, f"actor {actor} on pod {self.pod}")):
            return loads(payload)

    def _on_frame(
        self,
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> None:
        """One frame; whatever goes wrong with it fails its call only, never the link."""
        self.rx += 1
        try:
            self._handle_frame(kind, flags, route, req_id, header, payload, frame)
        except ProtocolError:
            raise  # not kt's protocol: the link is unusable
        except Exception:
            logger.exception("kt: a %s frame from pod %s failed", FrameKind(kind).name, self.pod)

    def _handle_frame(
        self,
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> None:
        if kind == _RESULT:
            ref = self.inflight.pop(req_id, None)
            if ref is None:
                borrow = self.borrowed.pop(req_id, None)
                if borrow is not None:
                    self._answered(borrow, flags, payload)
                return  # else cancelled or already failed
            state = _done
            try:
                if flags & _ERROR:
                    state, value = _failed, loads_exception(payload)
                elif flags & _LENDS:
                    value = self._loads_lent(header, payload)
                else:
                    value = loads(payload)
            except Exception as exc:  # this call's result only: the link goes on
                state, value = _failed, undecodable(ref.label, exc)
            self.runtime.complete(ref._finish(state, value))
        elif kind == FrameKind.ITEM:
            stream = self.inflight.get(req_id)
            if isinstance(stream, StreamRef):
                try:
                    lends = flags & _LENDS
                    item = self._loads_lent(header, payload) if lends else loads(payload)
                except Exception as exc:  # ends this stream with the error
                    del self.inflight[req_id]
                    self.runtime.complete(stream._finish(_failed, undecodable(stream.label, exc)))
                    return
                self.runtime.complete(stream._push(item))
        elif kind == FrameKind.WAIT:
            self.runtime.answer(self, route, req_id, payload)
        elif kind == FrameKind.LOG:
            self.runtime.print_log(protocol.decode_header(header).get("src", ""), payload)
        elif kind == FrameKind.WELCOME:
            self.same_host = bool(protocol.decode_header(header).get("shm"))
            if not self._welcome.done():
                self._welcome.set_result(None)
        elif kind == FrameKind.REFUSED:
            info = protocol.decode_header(header)
            said = f"pod {self.pod} refused the connection: {info.get('message')}"
            error = AuthError(said) if info.get("error") == "auth" else ProtocolError(said)
            if not self._welcome.done():
                self._welcome.set_exception(error)
            self._fail(error)
        elif kind == FrameKind.DIED:
            listener = self.runtime.on_died
            if listener is not None:
                listener(self.address, protocol.decode_header(header))
        elif kind == FrameKind.PONG:
            pass
        else:
            raise ProtocolError(f"unexpected frame kind {kind} from {self.pod}")

    def silence(self, now: float) -> float:
        """How long this link has had calls (or borrows) waiting and heard nothing from
        its pod, as of the heartbeat's looks; a look that finds no news sends a PING."""
        if self.state is not LinkState.READY or not (self.inflight or self.borrowed):
            self._rx_seen, self._quiet_since = self.rx, None
            return 0.0
        if self.rx != self._rx_seen:
            self._rx_seen, self._quiet_since = self.rx, None
            return 0.0
        if self._quiet_since is None:
            self._quiet_since = now
        self.send(PING_FRAME)
        return now - self._quiet_since

    def lose(self, why: str) -> None:
        """Give the link up as lost (its calls fail with PodLostError) and drop the socket."""
        channel = self.channel
        self._fail(PodLostError(self.pod, why))
        if channel is not None:
            channel.abort()

    def _on_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the pod"
        error = PodLostError(self.pod, reason)
        if not self._welcome.done():
            self._welcome.set_exception(error)
        self._fail(error)

    def _fail(self, error: KtError) -> None:
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self._failure = error
        self.ready.set()
        self.runtime.forget(self)
        if self.runtime.on_link_lost is not None:
            self.runtime.on_link_lost(self.address)  # before the calls fail: retries see it
        inflight, self.inflight = self.inflight, {}
        borrowed, self.borrowed = self.borrowed, {}
        self._queued.clear()
        for ref in inflight.values():
            self.runtime.complete(ref._finish(_failed, error))
        for borrow in borrowed.values():
            self.runtime.complete(borrow.ref._finish(_failed, self._owner_gone(borrow)))
        if self.channel is not None:
            self.channel.abort()


class Runtime:
    """The event-loop thread of one process that makes calls, and its links to pods."""

    def __init__(self, *, caller: str | None = None, stream_logs: bool = True) -> None:
        self.caller = caller or f"driver-{os.getpid()}"
        self.stream_logs = stream_logs
        # Before the loop: a bad KT_DEDUP_LOGS_* setting raises here, leaking nothing; only
        # a runtime that prints (a driver's) reads them, not every actor's.
        self._dedup = (
            LogDeduplicator(
                window=config.dedup_logs_window,
                enabled=config.dedup_logs,
                allow=config.dedup_logs_allow,
                skip=config.dedup_logs_skip,
            )
            if stream_logs
            else LogDeduplicator(enabled=False)
        )
        self.loop = new_event_loop()
        self._ids = itertools.count(1)
        self._links: dict[Address, Link] = {}
        self._inbox: collections.deque[tuple[Address, str, int, Parts, Pending]] = (
            collections.deque()
        )
        self._wake_scheduled = False
        self._ready: list[tuple[Callback, Ref[Any]]] = []
        self._dispatch_scheduled = False
        self._arena: shm.ShmArena | None = None
        self._dedup_timer: asyncio.TimerHandle | None = None
        self.on_died: Callable[[Address, dict[str, Any]], None] | None = None
        """Set by the driver: an actor it owns died (a DIED frame)."""
        self.on_link_lost: Callable[[Address], None] | None = None
        """Set by the driver: an established link to a pod broke."""
        self._thread = threading.Thread(target=self._run, name="kt-runtime", daemon=True)
        self._thread.start()
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._heartbeats()))
        atexit.register(self.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _heartbeats(self) -> None:
        """Every HEARTBEAT_S, each link with calls waiting that heard nothing since the
        last look gets a PING; one silent for kt.config.heartbeat_timeout is lost. A
        stopped (SIGSTOP) or partitioned supervisor keeps its socket open: only silence
        shows it."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = self.loop.time()
            for link in list(self._links.values()):
                silent = link.silence(now)
                if silent >= config.heartbeat_timeout:
                    link.lose(f"no answer for {silent:.0f} s (stopped or unreachable)")

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def new_id(self) -> int:
        return next(self._ids)

    def shm_for(self, address: Address | None) -> shm.ShmArena | None:
        """The arena for large arguments to `address`, if it shares this host's /dev/shm."""
        link = self._links.get(address) if address is not None else None
        if link is None or not link.same_host:
            return None
        if self._arena is None:
            self._arena = shm.ShmArena()
        return self._arena

    # -- calls (any thread) -------------------------------------------------------------
    def submit(self, address: Address, token: str, req_id: int, parts: Parts, ref: Pending) -> None:
        """Send one framed call; `ref` completes when its RESULT (or a failure) arrives."""
        if DIRECT_SEND and not self._inbox and not self.on_loop_thread:
            link = self._links.get(address)
            if link is not None and link.submit_direct(req_id, parts, ref):
                return
        self._inbox.append((address, token, req_id, parts, ref))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            if self.on_loop_thread:
                self.loop.call_soon(self._drain)
            else:
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._wake_scheduled = False
        inbox = self._inbox
        links = self._links
        touched: set[Link] = set()
        while inbox:
            # Popped only once submitted: while a call is on its way to its link, the
            # inbox is not empty, so no caller's thread writes past it (submit_direct).
            address, token, req_id, parts, ref = inbox[0]
            link = links.get(address)
            if link is None:
                link = self._open_link(address, token)
            link.submit(req_id, parts, ref)
            inbox.popleft()
            touched.add(link)
        for link in touched:  # the batch is complete: write now, not next iteration
            if link.channel is not None:
                link.channel.flush()

    def _open_link(self, address: Address, token: str) -> Link:
        link = Link(self, address, token)
        self._links[address] = link
        self.loop.create_task(link.open())
        return link

    async def connect(self, address: Address, token: str) -> Link:
        """The link to `address`, once it is READY (loop thread).

        Raises:
            PodLostError, AuthError: it could not be opened.
        """
        link = self._links.get(address) or self._open_link(address, token)
        await link.ready.wait()
        if link.state is not LinkState.READY:
            assert link._failure is not None
            raise link._failure
        return link

    # -- lending (loop thread) --------------------------------------------------------------
    def answer(self, link: Link, route: int, req_id: int, payload: memoryview) -> None:
        """A borrower's WAIT for a Ref this process lent: answer once the Ref is done."""
        (lend_id,) = LEND_ID.unpack_from(payload)
        ref = lent(lend_id)
        if ref is None:
            gone = KtError(f"no Ref is lent under number {lend_id} by {self.caller} any more")
            self._send_answer(link, route, req_id, None, gone)
            return
        ref.on_done(
            lambda r: self.loop.call_soon_threadsafe(self._answer_ref, link, route, req_id, r)
        )

    def _answer_ref(self, link: Link, route: int, req_id: int, ref: Ref[Any]) -> None:
        if ref.cancelled():
            self._send_answer(
                link, route, req_id, None, CancelledError(f"{ref.label} was cancelled")
            )
        else:
            self._send_answer(link, route, req_id, ref._value, ref.exception())

    def _send_answer(
        self, link: Link, route: int, req_id: int, value: Any, exc: BaseException | None
    ) -> None:
        flags = 0
        if exc is None:
            try:
                try:
                    parts = dumps_value(value, "a lent Ref's value")
                except PendingRefError:  # the value holds pending Refs: lend them too
                    with lending(once=True):
                        parts = dumps_value(value, "a lent Ref's value")
                    flags = _LENDS
            except SerializationError as error:
                exc = error
        if exc is not None:
            cause = exc.__cause__
            tb = str(cause) if isinstance(cause, RemoteTraceback) else ""
            parts = [dumps_exception(exc, f"a Ref lent by {self.caller}", tb)]
            flags = _ERROR
        prefix = protocol.encode_prefix(
            FrameKind.RESULT, req_id, b"", parts_size(parts), flags=flags, route=route
        )
        link.send_parts([prefix, *parts])

    def fail_link(self, address: Address, error: KtError) -> bool:
        """Close the link to `address` as lost (loop thread): its calls fail with `error`.
        False when there is no such link."""
        link = self._links.get(address)
        if link is None:
            return False
        link._fail(error)
        return True

    def forget(self, link: Link) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]

    def send_control(self, address: Address, token: str, frame: bytes) -> None:
        """A frame that expects no reply (CANCEL, PING)."""

        def send() -> None:
            link = self._links.get(address) or self._open_link(address, token)
            link.send(frame)

        self.loop.call_soon_threadsafe(send)

    def discard(self, address: Address, req_id: int) -> None:
        """Forget a call whose Ref was cancelled (its RESULT, if any, is dropped)."""

        def drop() -> None:
            link = self._links.get(address)
            if link is not None:
                link.inflight.pop(req_id, None)

        self.loop.call_soon_threadsafe(drop)

    # -- results (loop thread) ------------------------------------------------------------
    def complete(self, batch: list[tuple[Callback, Ref[Any]]]) -> None:
        """Callbacks bound to no loop (a thread blocked in ref.result) run now; those of
        event loops are gathered and handed over once per loop turn."""
        for item in batch:
            if item[0][0] is None:
                run_callbacks([item])
            else:
                self._ready.append(item)
        if self._ready and not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        ready, self._ready = self._ready, []
        dispatch(ready)

    def print_log(self, source: str, payload: memoryview) -> None:
        if not self.stream_logs:
            return
        text = bytes(payload).decode("utf-8", "replace")
        now = self.loop.time()
        self._write_logs(
            [out for ln in text.splitlines() for out in self._dedup.feed(source, ln, now)]
        )

    def _write_logs(self, lines: list[str]) -> None:
        """Print `lines`, and set the timer for the next summary (`kt.core.logdedup`)."""
        if lines:
            text = "".join(f"{line}\n" for line in lines)
            output.show(lambda: _to_stdout(text), len(lines))  # never blocks this loop
        deadline = self._dedup.next_deadline()
        if deadline is not None and self._dedup_timer is None:
            self._dedup_timer = self.loop.call_at(deadline, self._flush_logs)

    def _flush_logs(self) -> None:
        self._dedup_timer = None
        self._write_logs(self._dedup.flush(self.loop.time()))

    # -- running coroutines on the loop -------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop thread and wait for it (not from the loop thread).

        Raises:
            GetTimeoutError: not done within `timeout` seconds; it is cancelled.
        """
        if self.on_loop_thread:
            coro.close()
            raise RuntimeError("kt: a blocking call was made on kt's own event-loop thread")
        what = getattr(coro, "__qualname__", "a kt operation")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # its own TimeoutError
                raise
            future.cancel()  # nobody waits for it any more
            raise GetTimeoutError(
                f"kt: {what} did not finish within {seconds(timeout or 0)}; it was stopped"
            ) from None

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the loop thread without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_blocking_inline(self) -> None:
        """From now on the loop runs its blocking helpers (run_in_executor, to_thread)
        inline. For the exit: Python shuts its thread pools before atexit handlers run, and
        the teardown's clients still use them (aiohttp reads .netrc that way)."""
        self.loop.set_default_executor(_InlineExecutor())

    def stop(self) -> None:
        global _shared
        with _shared_lock:
            if _shared is self:
                _shared = None
        if not self.loop.is_running():
            return

        def close_all() -> None:
            self._write_logs(self._dedup.drain())  # held summaries print before the exit
            for link in list(self._links.values()):
                if link.channel is not None:
                    link.channel.close()
            # What still waits (a detached pod's Process.wait, a pool's reaper) is
            # cancelled and given a turn to finish, not left for "Task was destroyed".
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.call_soon, self.loop.stop)

        self.loop.call_soon_threadsafe(close_all)
        self._thread.join(timeout=2)


_shared: Runtime | None = None
_shared_lock = threading.Lock()


def shared_runtime(*, caller: str | None = None, stream_logs: bool = True) -> Runtime:
    """This process's one runtime: made on first use (with these settings), and again
    after it was stopped. The driver and, inside an actor, the actor host share it."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Runtime(caller=caller, stream_logs=stream_logs)
        return _shared


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each submitted function at once, in the caller's thread (a ThreadPoolExecutor
    by type only: asyncio's own loop takes no other kind as its default executor)."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller's future carries it
            future.set_exception(exc)
        return future
