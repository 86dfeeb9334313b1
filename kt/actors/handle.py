"""Actor handles and method proxies: the caller's end of the hot path.

`c.incr.remote(2)` serializes the arguments on the calling thread, frames them with a
header cached per method, and pushes the frame to the runtime (`kt.core.runtime`). A
handle whose actor is still being placed keeps calls in a backlog, sent in order once
the actor has an address. Handles pickle: in another actor's process they reconnect
straight to the target's pod.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import orjson

from kt.core import protocol
from kt.core.errors import (
    ActorDiedError,
    ArgumentError,
    KtError,
    PodLostError,
    ShutdownError,
    check_move,
    seconds,
)
from kt.core.methods import RUN_METHOD, Arity, MethodKind, hook_name
from kt.core.protocol import FrameFlag, FrameKind
from kt.core.ref import PendingRefError, Ref, StreamRef, lending, release
from kt.core.serialization import Parts, dumps_call, parts_size

if TYPE_CHECKING:
    from kt.core.runtime import Runtime

_LENDS = int(FrameFlag.LENDS)
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Address = tuple[str, int]


class ActorMethod(Generic[P, R]):
    """`handle.method`: `.remote(...)` returns a Ref, calling it blocks for the result."""

    __slots__ = ("_arity", "_handle", "_header", "_label", "_name", "_streams")

    def __init__(
        self, handle: ActorHandle, name: str, kind: MethodKind, arity: Arity | None = None
    ) -> None:
        self._handle = handle
        self._name = name
        self._streams = kind.streams
        self._arity = arity
        self._header = orjson.dumps({"a": handle._actor_id, "m": name})
        self._label = f"{handle._cls_name}.{name}"

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> Ref[R]:
        """Send the call; its Ref.

        Raises:
            ArgumentError: the arguments do not fit the method (nothing is sent).
        """
        arity = self._arity
        if arity is not None:
            why = arity.refusal(self._label, args, kwargs)
            if why is not None:
                raise ArgumentError(why)
        h = self._handle
        for v in args:
            if isinstance(v, Ref):
                return h._call_with_refs(self, args, kwargs)
        for v in kwargs.values():
            if isinstance(v, Ref):
                return h._call_with_refs(self, args, kwargs)
        if h._held:  # an earlier call waits for its Ref arguments: this one goes after it
            return h._hold(self, args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Serialize and send now (no Ref among the arguments themselves)."""
        h = self._handle
        runtime = h._runtime()
        shm = runtime.shm_for(h._address)
        lends: list[int] = []
        flags = 0
        try:
            parts = dumps_call(args, kwargs, self._label, shm)
        except PendingRefError:  # a Ref inside an argument still runs: lend it (kt.core.ref)
            with lending(once=False) as lends:
                parts = dumps_call(args, kwargs, self._label, shm)
            flags = _LENDS
        header = self._header
        if h._retries and not self._streams:
            ref: Any = h._submit_retrying(header, parts, self._label, flags)
        else:
            req_id = runtime.new_id()
            prefix = protocol.encode_prefix(
                FrameKind.CALL, req_id, header, parts_size(parts), flags=flags
            )
            ref = StreamRef(self._label) if self._streams else Ref(self._label)
            ref._on_cancel = functools.partial(h._cancel_call, req_id)
            h._submit(req_id, [prefix, header, *parts], ref)
        if lends:
            ref.on_done(lambda _: release(lends))  # the call is over: nobody asks again
        return ref

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        ref = self.remote(*args, **kwargs)
        if isinstance(ref, StreamRef):
            return list(ref)
        return ref.result()


class HandleState(str, enum.Enum):
    """PLACING -> BOUND <-> HELD; PLACING | BOUND | HELD -> FAILED, which is final.

    PLACING and HELD keep calls in the backlog (the actor has no address yet, or is being
    restarted or its pod checked); BOUND sends them to `address`; FAILED fails each with
    `failure`. `address` is set exactly in BOUND, `failure` exactly in FAILED.
    """

    PLACING = "placing"
    BOUND = "bound"
    HELD = "held"
    FAILED = "failed"


_HANDLE_MOVES = {
    (HandleState.PLACING, HandleState.BOUND),
    (HandleState.PLACING, HandleState.FAILED),
    (HandleState.BOUND, HandleState.BOUND),  # the same pod, checked and kept
    (HandleState.BOUND, HandleState.HELD),
    (HandleState.BOUND, HandleState.FAILED),
    (HandleState.HELD, HandleState.HELD),
    (HandleState.HELD, HandleState.BOUND),
    (HandleState.HELD, HandleState.FAILED),
    (HandleState.PLACING, HandleState.HELD),  # a restart before the first placement ended
}


class ActorHandle(Generic[T]):
    """A reference to one actor of class `T`. Cheap to copy and to pickle; every copy
    calls the same actor. mypy checks its method calls with `kt.mypy_plugin`.

    Set against `ActorMethod`: the handle knows where the actor lives; a method proxy knows
    how to frame one method's calls.
    """

    def __init__(
        self,
        actor_id: str,
        cls_name: str,
        methods: dict[str, MethodKind],
        *,
        address: Address | None = None,
        token: str = "",
        name: str | None = None,
        arities: dict[str, Arity] | None = None,
    ) -> None:
        self._actor_id = actor_id
        self._arities = arities or {}  # where the class is known here (not pickled)
        self._cls_name = cls_name
        self._name = name
        self._methods = methods
        self._address = address
        self._token = token
        self._proxies: dict[str, ActorMethod[Any, Any]] = {}
        self._lock = threading.Lock()
        self._backlog: list[tuple[int, Parts, Any]] = []
        self._failure: BaseException | None = None
        self._state = HandleState.BOUND if address is not None else HandleState.PLACING
        self._placed = threading.Event()  # set in BOUND and FAILED: _wait_placed returns
        self._generation = 0  # counts moves to HELD (retries wait to move past one)
        self._epoch = _epoch[0]
        self._retries = 0  # max_task_retries; only the owning driver restarts actors
        self._on_rebind: list[Callable[[], None]] = []
        self._held: collections.deque[_Held] = collections.deque()
        self._pumping = False
        if address is not None:
            self._placed.set()

    def __repr__(self) -> str:
        return f"<kt.ActorHandle {self._cls_name} {self._actor_id}>"

    def __getattr__(self, name: str) -> ActorMethod[Any, Any]:
        if name.startswith("_") and name != "__call__":
            raise AttributeError(name)
        proxy = self._proxies.get(name)
        if proxy is None:
            kind = self._methods.get(name)
            if kind is None:
                raise AttributeError(
                    f"{self._cls_name} has no method {name!r} (methods: {sorted(self._methods)})"
                )
            proxy = self._proxies[name] = ActorMethod(self, name, kind, self._arities.get(name))
        return proxy

    def _runtime(self) -> Runtime:
        """The process's runtime, for a handle made since the last kt.shutdown().

        Raises:
            ShutdownError: the handle was made before kt.shutdown() (its pods are gone).
        """
        if self._epoch != _epoch[0]:
            raise ShutdownError()
        return _get_runtime()

    # -- placement ----------------------------------------------------------------------
    def _move(self, to: HandleState) -> bool:
        """Lock held: the one place the handle's state changes; False once FAILED.

        Raises:
            InvalidTransition: the table has no such move.
        """
        if self._state is HandleState.FAILED:
            return False
        check_move(_HANDLE_MOVES, repr(self), self._state, to)
        self._state = to
        if to is HandleState.HELD:
            self._generation += 1
        if to in (HandleState.BOUND, HandleState.FAILED):
            self._placed.set()
        else:
            self._placed.clear()
        if to is not HandleState.BOUND:
            self._address = None
        return True

    def _bind(self, address: Address, token: str) -> None:
        """The actor now has an address: send the backlog, in order."""
        runtime = self._runtime()
        with self._lock:
            if not self._move(HandleState.BOUND):
                return
            # The backlog goes into the runtime before the address is published: a call
            # made meanwhile waits for the lock, then queues behind it (a call that saw
            # the address first could go to the socket at once and overtake them all).
            for req_id, parts, ref in self._backlog:
                runtime.submit(address, token, req_id, parts, ref)
            self._backlog = []
            self._token = token
            self._address = address

    def _unbind(self) -> None:
        """The actor is being restarted (or its pod checked): new calls wait."""
        with self._lock:
            self._move(HandleState.HELD)
            waiting, self._on_rebind = self._on_rebind, []
        for fn in waiting:
            fn()

    def _fail(self, exc: BaseException) -> None:
        """The actor is gone for good: every queued and future call raises `exc`."""
        with self._lock:
            if not self._move(HandleState.FAILED):
                return
            self._failure = exc
            backlog, self._backlog = self._backlog, []
            waiting, self._on_rebind = self._on_rebind, []
        for _, _, ref in backlog:
            ref.set_exception(exc)
        for fn in waiting:
            fn()

    def _submit_retrying(self, header: bytes, parts: Parts, label: str, flags: int) -> Ref[Any]:
        """A call that is sent again (up to max_task_retries) when its actor dies under it."""
        outer: Ref[Any] = Ref(label)
        size = parts_size(parts)
        runtime = self._runtime()

        def attempt(left: int) -> None:
            if outer.done():
                return
            req_id = runtime.new_id()
            prefix = protocol.encode_prefix(FrameKind.CALL, req_id, header, size, flags=flags)
            inner: Ref[Any] = Ref(label)
            generation = self._generation

            def done(r: Ref[Any]) -> None:
                exc = r.exception() if not r.cancelled() else None
                if isinstance(exc, ActorDiedError | PodLostError) and left > 0:
                    self._after_restart(generation, lambda: attempt(left - 1))
                else:
                    _copy_outcome(r, outer)

            inner.on_done(done)
            self._submit(req_id, [prefix, header, *parts], inner)

        attempt(self._retries)
        return outer

    def _after_restart(self, generation: int, fn: Callable[[], None]) -> None:
        """Run `fn` once the handle has moved past `generation` (unbound or failed)."""
        with self._lock:
            if self._generation == generation and self._state is not HandleState.FAILED:
                self._on_rebind.append(fn)
                return
        fn()

    def _submit(self, req_id: int, parts: Parts, ref: Any) -> None:
        address = self._address  # the fast path: set exactly while BOUND
        if address is None:
            with self._lock:
                if self._state is HandleState.FAILED:
                    ref.set_exception(self._failure)
                    return
                if self._state is not HandleState.BOUND:
                    self._backlog.append((req_id, parts, ref))
                    return
                address = self._address
                assert address is not None
        self._runtime().submit(address, self._token, req_id, parts, ref)

    def _wait_placed(self, timeout: float | None = None) -> Address:
        if not self._placed.wait(timeout):
            raise KtError(f"{self!r} was not placed within {seconds(timeout or 0)}")
        with self._lock:
            if self._state is HandleState.FAILED:
                assert self._failure is not None
                raise self._failure
            address = self._address
        if address is None:  # held again meanwhile (a restart): wait for the next address
            return self._wait_placed(timeout)
        return address

    def _cancel_call(self, req_id: int) -> None:
        address = self._address
        if address is None:
            return
        runtime = self._runtime()
        header = {"a": self._actor_id}
        runtime.send_control(
            address, self._token, protocol.encode(FrameKind.CANCEL, req_id, header)
        )
        runtime.discard(address, req_id)

    def _call_with_refs(
        self, method: ActorMethod[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Ref[Any]:
        """Resolve Ref arguments first, then call: the method never sees a Ref. The call
        waits in `_held`, and calls made on this handle meanwhile wait behind it, so the
        actor runs them in the order they were made (as Ray does)."""
        refs = [v for v in (*args, *kwargs.values()) if isinstance(v, Ref)]
        remaining = [len(refs)]

        def call() -> Ref[Any]:
            a = tuple(v.result() if isinstance(v, Ref) else v for v in args)
            kw = {k: (v.result() if isinstance(v, Ref) else v) for k, v in kwargs.items()}
            return method._call(a, kw)

        if method._streams:  # a stream cannot wait inside a Ref: wait here (its errors too)
            a = tuple(v.result() if isinstance(v, Ref) else v for v in args)
            kw = {k: (v.result() if isinstance(v, Ref) else v) for k, v in kwargs.items()}
            return self._hold(method, a, kw) if self._held else method._call(a, kw)
        entry = _Held(Ref(method._label))

        def arrived(_: Any) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
                entry.call = call
            self._pump()

        with self._lock:
            self._held.append(entry)
        for ref in refs:
            ref.on_done(arrived)
        return entry.out

    def _hold(
        self, method: ActorMethod[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call made while an earlier one waits for its Ref arguments: send it after."""
        if method._streams:  # a stream cannot wait inside a Ref: wait for the queue here
            for earlier in list(self._held):
                with contextlib.suppress(Exception):  # its outcome is its caller's to see
                    earlier.out.result()
            return method._call(args, kwargs)
        entry = _Held(Ref(method._label), lambda: method._call(args, kwargs))
        with self._lock:
            self._held.append(entry)
        self._pump()
        return entry.out

    def _pump(self) -> None:
        """Send the held calls that are ready, in order, from one thread at a time. An
        entry leaves the queue only once sent, so a call made meanwhile queues behind."""
        while True:
            with self._lock:
                if self._pumping or not self._held or self._held[0].call is None:
                    return
                entry = self._held[0]
                self._pumping = True
            try:
                assert entry.call is not None
                _forward(entry.out, entry.call)
            finally:
                with self._lock:
                    self._held.popleft()
                    self._pumping = False

    # -- for kt's own upper layers (kt.distributed) ---------------------------------------
    def run_hook(self, hook: Callable[..., R], *args: Any, **kwargs: Any) -> Ref[R]:
        """Run `hook(instance, *args, **kwargs)` in the actor's process, in call order.

        `hook` must be registered with `kt.core.methods.actor_hook`: the frame carries
        its name, and the actor runs only registered hooks.
        """
        method: ActorMethod[Any, R] = ActorMethod(self, RUN_METHOD, MethodKind.SYNC)
        return method.remote(hook_name(hook), *args, **kwargs)

    @property
    def address(self) -> Address | None:
        """The (host, port) of the actor's pod; None while it is placed or restarted."""
        return self._address

    def wait_placed(self, timeout: float | None = None) -> Address:
        """The (host, port) of the actor's pod, once it is placed.

        Raises:
            KtError: it was not placed within `timeout`; or the error that ended it.
        """
        return self._wait_placed(timeout)

    # -- pickling --------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Callable[..., ActorHandle], tuple[Any, ...]]:
        address = self._wait_placed(timeout=600)
        return (
            _rebuild,
            (self._actor_id, self._cls_name, dict(self._methods), address, self._token, self._name),
        )


class _Held:
    """A call waiting in a handle's queue: `call` is set once its arguments are ready."""

    __slots__ = ("call", "out")

    def __init__(self, out: Ref[Any], call: Callable[[], Ref[Any]] | None = None) -> None:
        self.out = out
        self.call = call


_epoch = [0]  # bumped by kt.shutdown(): handles made before it refuse to call


def _get_runtime() -> Runtime:
    """The process's runtime (kt.actors.driver imports this module, so import it late)."""
    global _get_runtime
    from kt.actors.driver import get_runtime

    _get_runtime = get_runtime  # every later call goes straight there
    return get_runtime()


def _forward(out: Ref[Any], call: Callable[[], Ref[Any]]) -> None:
    """Make the call now; `out` gets its outcome, or the error that making it raised."""
    try:
        inner = call()
    except BaseException as exc:
        out.set_exception(exc)
        return
    inner.on_done(lambda r: _copy_outcome(r, out))


def _copy_outcome(src: Ref[Any], dst: Ref[Any]) -> None:
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _rebuild(
    actor_id: str,
    cls_name: str,
    methods: dict[str, MethodKind],
    address: Address,
    token: str,
    name: str | None,
) -> ActorHandle:
    return ActorHandle(actor_id, cls_name, methods, address=address, token=token, name=name)
