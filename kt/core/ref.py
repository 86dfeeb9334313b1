"""`Ref`: the future of one remote call, usable from any thread and any event loop.

Theory of operation: a Ref is completed on the runtime's event-loop thread, but awaited
from the user's loop (or blocked on from a plain thread). It implements asyncio's
future protocol (`_asyncio_future_blocking`, `add_done_callback`, `get_loop`) so that
`await ref` and `asyncio.gather(*refs)` use it directly, without wrapping each Ref in a
Task. Done-callbacks remember the loop that registered them; the runtime hands each
loop its callbacks in one `call_soon_threadsafe` per batch of results, not one per Ref.

State changes happen under one module lock, which keeps the check-then-register race
between a waiter and the completing thread closed.

Ownership: the process that made a call owns its Ref. A Ref pickled while still pending
(nested in an argument, returned from a method, sent as a stream item) is *lent*: the
owner keeps it in this module's lend table under a number, and the payload carries only
that number (`_borrow`). The process that unpickles it is a *borrower*: it gets a fresh
pending Ref at once and asks the owner for the outcome (a WAIT frame, sent by whoever
unpickled it -- `kt.core.runtime` or the actor host); when the owner goes away first,
the borrowed Ref fails with `OwnerDiedError`. A done Ref travels with its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import itertools
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from kt.core.errors import CancelledError, GetTimeoutError, OwnerDiedError, seconds

T = TypeVar("T")
_LOCK = threading.Lock()

Callback = tuple[asyncio.AbstractEventLoop | None, Callable[[Any], Any], contextvars.Context | None]


class RefState(str, enum.Enum):
    """PENDING -> DONE | FAILED | CANCELLED; the last three are final."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


def run_callbacks(batch: list[tuple[Callback, Ref[Any]]]) -> None:
    """Run done-callbacks on the loop (or thread) that registered them."""
    for (_, fn, ctx), ref in batch:
        try:
            if ctx is not None:
                ctx.run(fn, ref)
            else:
                fn(ref)
        except Exception:  # a user's callback must not break the others
            import logging

            logging.getLogger(__name__).exception("Ref done-callback failed")


def dispatch(batch: list[tuple[Callback, Ref[Any]]]) -> None:
    """Send each callback to its loop, one call_soon_threadsafe per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callback, Ref[Any]]]] = {}
    direct: list[tuple[Callback, Ref[Any]]] = []
    for item in batch:
        loop = item[0][0]
        if loop is None:
            direct.append(item)
        else:
            by_loop.setdefault(loop, []).append(item)
    if direct:
        run_callbacks(direct)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(run_callbacks, items)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


class Ref(Generic[T]):
    """The result of a remote call: awaitable, `.result(timeout)`, `.done()`, `.cancel()`."""

    __slots__ = (
        "__weakref__",
        "_asyncio_future_blocking",
        "_callbacks",
        "_on_cancel",
        "_state",
        "_value",
        "label",
    )

    def __init__(self, label: str = "") -> None:
        self._asyncio_future_blocking = False
        self._state = RefState.PENDING
        self._value: Any = None
        self._callbacks: list[Callback] = []
        self._on_cancel: Callable[[], None] | None = None
        self.label = label

    def __repr__(self) -> str:
        return f"<kt.Ref {self.label} {self._state.value}>"

    def __reduce__(self) -> tuple[Any, ...]:
        """A done Ref travels with its outcome; a pending one is lent (see the module
        docstring) when the pickling was started by `lending`, else `PendingRefError`."""
        if self._state is RefState.PENDING:
            lends: list[int] | None = getattr(_context, "lends", None)
            if lends is None:
                raise PendingRefError(self)
            lend_id = lend(self, once=getattr(_context, "once", True))
            lends.append(lend_id)
            return (_borrow, (lend_id, self.label))
        return (_rebuild_ref, (self.label, self._state, self._value))

    # -- completion (runtime thread) ------------------------------------------------
    def _finish(self, state: RefState, value: Any) -> list[tuple[Callback, Ref[Any]]]:
        """Set the outcome; returns the callbacks to dispatch (empty if already final)."""
        with _LOCK:
            if self._state is not RefState.PENDING:
                return []
            self._state = state
            self._value = value
            callbacks, self._callbacks = self._callbacks, []
        return [(cb, self) for cb in callbacks]

    def set_result(self, value: Any) -> None:
        dispatch(self._finish(RefState.DONE, value))

    def set_exception(self, exc: BaseException) -> None:
        dispatch(self._finish(RefState.FAILED, exc))

    # -- the future protocol ----------------------------------------------------------
    def done(self) -> bool:
        return self._state is not RefState.PENDING

    def cancelled(self) -> bool:
        return self._state is RefState.CANCELLED

    def cancel(self, msg: Any = None) -> bool:
        """Stop waiting; the remote call is asked to stop but may already have run."""
        batch = self._finish(RefState.CANCELLED, CancelledError(f"{self.label} was cancelled"))
        if not batch and self._state is not RefState.CANCELLED:
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        dispatch(batch)
        return True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def add_done_callback(
        self, fn: Callable[[Any], Any], *, context: contextvars.Context | None = None
    ) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with _LOCK:
            if self._state is RefState.PENDING:
                self._callbacks.append((loop, fn, context))
                return
        if loop is not None:
            loop.call_soon(fn, self, context=context)
        else:
            fn(self)

    def remove_done_callback(self, fn: Callable[[Any], Any]) -> int:
        with _LOCK:
            keep = [cb for cb in self._callbacks if cb[1] != fn]
            removed = len(self._callbacks) - len(keep)
            self._callbacks = keep
        return removed

    def exception(self) -> BaseException | None:
        if self._state is RefState.PENDING:
            raise asyncio.InvalidStateError("result is not ready")
        if self._state is RefState.CANCELLED:
            raise asyncio.CancelledError()
        return self._value if self._state is RefState.FAILED else None

    def _outcome(self) -> T:
        if self._state is RefState.DONE:
            return self._value
        raise self._value

    def __await__(self) -> Generator[Any, None, T]:
        if self._state is RefState.PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._state is RefState.PENDING:
            raise RuntimeError("await wasn't used with future")
        return self._outcome()

    __iter__ = __await__

    # -- blocking -----------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> T:
        """Block until the result arrives.

        Raises:
            GetTimeoutError: `timeout` seconds passed first; the call keeps running.
            CancelledError: the Ref was cancelled.
        """
        if self._state is RefState.PENDING:
            event = threading.Event()
            self.on_done(lambda _ref: event.set())
            if not event.wait(timeout):
                raise GetTimeoutError(f"{self.label} not ready after {seconds(timeout or 0)}")
        if self._state is RefState.CANCELLED:
            raise self._value
        return self._outcome()

    def on_done(self, fn: Callable[[Ref[T]], Any]) -> None:
        """Call `fn(ref)` once done, on whichever thread completes it (never a user loop)."""
        with _LOCK:
            if self._state is RefState.PENDING:
                self._callbacks.append((None, fn, None))
                return
        fn(self)


class PendingRefError(Exception):
    """Raised while pickling a Ref that is still pending outside `lending`; `ref` is it.

    Internal to kt: the senders catch it and pickle again inside `lending` (actor
    creation, whose arguments are sent again on every restart, waits for `ref` instead).
    """

    def __init__(self, ref: Ref[Any]) -> None:
        super().__init__(f"{ref!r} is still pending")
        self.ref = ref


# -- lending and borrowing ----------------------------------------------------------------
Borrower = Callable[[int, "Ref[Any]"], None]
"""borrower(lend_id, ref): ask the payload's sender for lend `lend_id`'s outcome into `ref`."""

_context = threading.local()  # .lends/.once while pickling, .borrower while unpickling
_lent: dict[int, tuple[Ref[Any], bool]] = {}
_lend_ids = itertools.count(1)


def lend(ref: Ref[Any], *, once: bool) -> int:
    """Keep `ref` for a borrower; `once`: forget it after its first answer (else `release`)."""
    lend_id = next(_lend_ids)
    _lent[lend_id] = (ref, once)
    return lend_id


def lent(lend_id: int) -> Ref[Any] | None:
    """The Ref lent under `lend_id`, forgotten now if it was lent for one answer."""
    entry = _lent.get(lend_id)
    if entry is None:
        return None
    if entry[1]:
        _lent.pop(lend_id, None)
    return entry[0]


def release(lend_ids: list[int]) -> None:
    """Forget lends that no borrower will ask for any more (their call has finished)."""
    for lend_id in lend_ids:
        _lent.pop(lend_id, None)


def lent_count() -> int:
    return len(_lent)


@contextlib.contextmanager
def lending(*, once: bool) -> Iterator[list[int]]:
    """`with lending(once=...) as lends:` pending Refs pickled inside are lent; `lends`
    lists them. `once=False` for a call's arguments: a retried call is unpickled again,
    so its lends stay until `release` (when the call is done); a reply is unpickled once.
    """
    lends: list[int] = []
    _context.lends, _context.once = lends, once
    try:
        yield lends
    finally:
        _context.lends = None


@contextlib.contextmanager
def borrowing(borrower: Borrower) -> Iterator[None]:
    """`with borrowing(borrower):` lent Refs unpickled inside are asked for through it."""
    _context.borrower = borrower
    try:
        yield
    finally:
        _context.borrower = None


def _borrow(lend_id: int, label: str) -> Ref[Any]:
    ref: Ref[Any] = Ref(label)
    borrower: Borrower | None = getattr(_context, "borrower", None)
    if borrower is None:
        ref.set_exception(
            OwnerDiedError(label, "unknown", "it arrived where no owner can be asked")
        )
    else:
        borrower(lend_id, ref)
    return ref


def _rebuild_ref(label: str, state: RefState, value: Any) -> Ref[Any]:
    ref: Ref[Any] = Ref(label)
    ref._state = state
    ref._value = value
    return ref


_END = object()


class StreamRef(Generic[T]):
    """The items of a generator method, in order: `async for x in ...` or `for x in ...`.

    Each item is a Ref completed as the item arrives; the last one carries an end mark
    (or the error that ended the stream).
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._refs: list[Ref[Any]] = [Ref(label)]
        self._next = 0
        self._on_cancel: Callable[[], None] | None = None

    def _push(self, value: Any) -> list[tuple[Callback, Ref[Any]]]:
        """Runtime thread: one more item."""
        ref = self._refs[-1]
        self._refs.append(Ref(self.label))
        return ref._finish(RefState.DONE, value)

    def _close(self, exc: BaseException | None) -> list[tuple[Callback, Ref[Any]]]:
        ref = self._refs[-1]
        if exc is None:
            return ref._finish(RefState.DONE, _END)
        return ref._finish(RefState.FAILED, exc)

    def on_done(self, fn: Callable[[StreamRef[T]], Any]) -> None:
        """Call `fn(stream)` once the stream has ended (or failed), on the completing thread."""

        def ended(last: Ref[Any]) -> None:
            if last is self._refs[-1]:
                fn(self)
            else:  # an item arrived: the end is the next one
                self._refs[-1].on_done(ended)

        self._refs[-1].on_done(ended)

    # Ref-compatible completion, so the runtime can end a stream like any call.
    def _finish(self, state: RefState, value: Any) -> list[tuple[Callback, Ref[Any]]]:
        return self._close(None if state is RefState.DONE else value)

    def set_exception(self, exc: BaseException) -> None:
        dispatch(self._close(exc))

    def __aiter__(self) -> StreamRef[T]:
        return self

    async def __anext__(self) -> T:
        ref = self._refs[self._next]
        value = await ref
        if value is _END:
            raise StopAsyncIteration
        self._next += 1
        return value

    def __iter__(self) -> StreamRef[T]:
        return self

    def __next__(self) -> T:
        ref = self._refs[self._next]
        value = ref.result()
        if value is _END:
            raise StopIteration
        self._next += 1
        return value

    def cancel(self) -> bool:
        if self._on_cancel is not None:
            self._on_cancel()
        return self._refs[-1].cancel()
