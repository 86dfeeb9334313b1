"""One call on many ranks, and the proxies users call groups through.

Who calls it: `kt.distributed.group.SpmdGroup`. A `FanOut` sends one method call to
some ranks of one attempt and completes a single `kt.Ref` with their results ordered by
global rank (or with the first failure, which the group chooses and words). The
proxies (`GroupMethod`, `RankView`) give a group the same calling shapes as an actor
handle: `group(x)`, `group.remote(x)`, `group.step(x)`, `group.rank(0).step(x)`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kt.core.errors import ActorDiedError
from kt.core.ref import Ref
from kt.distributed.state import RankFailure

if TYPE_CHECKING:
    from kt.actors.handle import ActorHandle


class FanOut:
    """One call sent to `ranks` of one attempt; `out` completes once all have answered.

    Set against `kt.Ref`: a Ref is one rank's answer; a FanOut gathers several and
    reports their first failure to `on_failure` (called once, on the thread that saw it).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        label: str,
        *,
        single: bool,
        on_failure: Callable[[FanOut], None],
    ) -> None:
        self.ranks = list(ranks)
        self.single = single
        self.out: Ref[Any] = Ref(label)
        self.attempt: Any = None  # the group's attempt it was sent to
        self.finished = threading.Event()  # every rank answered (or was cancelled)
        self.failures: list[tuple[RankFailure, BaseException]] = []
        self._results: list[Any] = [None] * len(self.ranks)
        self._remaining = len(self.ranks)
        self._refs: list[Ref[Any]] = []
        self._lock = threading.Lock()
        self._on_failure = on_failure
        self.out._on_cancel = self._cancel

    def send(
        self,
        handles: Sequence[ActorHandle],
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Send to every rank; a local failure (an unpicklable argument) fails `out` at once."""
        try:
            for i, rank in enumerate(self.ranks):
                ref = getattr(handles[rank], method).remote(*args, **kwargs)
                self._refs.append(ref)
                ref.on_done(functools.partial(self._one_done, i))
        except BaseException as exc:
            self.out.set_exception(exc)
            self._cancel()

    def _one_done(self, i: int, ref: Ref[Any]) -> None:
        exc: BaseException | None = None
        if not ref.cancelled():
            exc = ref.exception()
        with self._lock:
            if exc is None and not ref.cancelled():
                self._results[i] = ref.result()
            elif exc is not None:
                died = isinstance(exc, ActorDiedError)
                failure = RankFailure(self.ranks[i], died, len(self.failures))
                self.failures.append((failure, exc))
            self._remaining -= 1
            all_done = self._remaining == 0
            first_failure = exc is not None and len(self.failures) == 1
        if all_done:
            self.finished.set()
            if not self.failures:
                self.out.set_result(self._results[0] if self.single else list(self._results))
        if first_failure:
            self._on_failure(self)

    def snapshot(self) -> list[tuple[RankFailure, BaseException]]:
        with self._lock:
            return list(self.failures)

    def _cancel(self) -> None:
        for ref in list(self._refs):
            ref.cancel()


class Caller(Protocol):
    """What the proxies need from a group (SpmdGroup implements it)."""

    _name: str
    world_size: int

    def _call(
        self,
        method: str,
        ranks: Sequence[int],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        single: bool,
    ) -> Ref[Any]: ...

    def _handle_of(self, rank: int, timeout: float | None) -> ActorHandle: ...

    def _check_method(self, method: str) -> None: ...


class GroupMethod:
    """`group.step` or `group.rank(0).step`: `.remote(...)` returns a Ref, calling it blocks."""

    def __init__(self, group: Caller, method: str, ranks: Sequence[int], single: bool) -> None:
        group._check_method(method)
        self._group = group
        self._method = method
        self._ranks = list(ranks)
        self._single = single

    def remote(self, *args: Any, **kwargs: Any) -> Ref[Any]:
        return self._group._call(self._method, self._ranks, args, kwargs, single=self._single)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.remote(*args, **kwargs).result()


class RankView:
    """Some ranks of a group, called as one: `group.rank(0)` (one result) or `.ranks([...])`."""

    def __init__(self, group: Caller, ranks: Sequence[int], *, single: bool) -> None:
        bad = [r for r in ranks if not 0 <= r < group.world_size]
        if bad or not ranks:
            raise IndexError(
                f"ranks {bad or list(ranks)} are not in SPMD group {group._name} "
                f"(ranks 0..{group.world_size - 1})"
            )
        self._group = group
        self._ranks = list(ranks)
        self._single = single

    def __getattr__(self, name: str) -> GroupMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return GroupMethod(self._group, name, self._ranks, self._single)

    def remote(self, *args: Any, **kwargs: Any) -> Ref[Any]:
        return GroupMethod(self._group, "__call__", self._ranks, self._single).remote(
            *args, **kwargs
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.remote(*args, **kwargs).result()

    def method(self, name: str) -> GroupMethod:
        """The user's method `name`, where a view's own name hides it (`handle`, `remote`)."""
        return GroupMethod(self._group, name, self._ranks, self._single)

    def handle(self, timeout: float | None = None) -> ActorHandle:
        """The actor of this one rank in the current attempt (for `collective_group`).

        A restart replaces it: a handle taken before a restart names a dead actor.
        """
        if not self._single:
            raise TypeError("handle() needs one rank: use group.rank(i).handle()")
        return self._group._handle_of(self._ranks[0], timeout)
