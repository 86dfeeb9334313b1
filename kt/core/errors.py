"""Every error kt raises, in one tree, each with one meaning; [ran] says whether the call
(or the actor's creation) may have run.

    KtError
    ├── ConfigError            a spec or option is invalid, found before anything ran [no]
    │   └── SyncError          the project cannot be synced as it is (too large, a file
    │                          that keeps changing, a pod that refused a blob) [no]
    ├── ImageError             a step of the pool's kt.Image failed on a pod: names the
    │                          step, its exit code and its last lines of output [no]
    ├── ShutdownError          kt.shutdown() ran: handles and Refs made before it are void [no]
    ├── SerializationError     an argument could not be pickled [no]; with `loading`, a
    │                          result arrived that cannot be unpickled here [yes]
    ├── RemoteError            user code raised and its type cannot be rebuilt here [yes]
    ├── ActorDiedError         the actor's process is gone, `cause` says how (a DeathCause:
    │                          killed, exited, signaled, OOM, init failed, pod lost) [maybe]
    ├── ActorNotFoundError     the pod has no such actor (never created there, or the pod
    │                          was replaced) [no]
    ├── GroupFailedError       an SPMD group is out of restarts; names the rank and pod
    │                          whose failure ended it [maybe]
    ├── PodLostError           the pod or its connection vanished [maybe]
    ├── OwnerDiedError         a borrowed Ref's owner is gone before handing over its outcome
    │                          [maybe]
    ├── GetTimeoutError        waiting for a Ref ran out of time; the call keeps running [maybe]
    ├── CancelledError         the Ref was cancelled before its result arrived [maybe]
    ├── PlacementError         the request can never fit, or did not fit in time [no]
    ├── LaunchError            the pod a request waited for did not start [no]
    ├── AuthError              the supervisor refused the token [no]
    ├── ProtocolError          a peer sent bytes that are not kt frames, or another version [no]
    └── InvalidTransition      a state machine was asked for a move its table does not allow

Each error carries fields and turns them into a sentence in `__str__`; `__reduce__`
keeps them picklable so that they cross the wire like any other exception.
"""

from __future__ import annotations

import asyncio
import difflib
import enum
from collections.abc import Collection, Iterable
from typing import Any


class KtError(Exception):
    """Base of every kt error."""


class ConfigError(KtError, ValueError):
    """A spec, option or argument is invalid; nothing was started."""


class SyncError(ConfigError):
    """The user's project could not be brought to a pod; the pod keeps its previous
    version."""


class SyncSourceFailed(SyncError):
    """A pod could not fetch blobs from the pod it was told to pull from (that source
    refused or went away); the driver tries another source."""


class SyncFileChanged(SyncError):
    """A file changed between the manifest and its upload (kt retries with a new
    manifest once, then raises it)."""


class ImageError(KtError):
    """A step of a kt.Image failed on a pod; no actor of that image started there."""

    def __init__(self, step: str, pod: str, exit_code: int | None, output: str) -> None:
        super().__init__(step, pod, exit_code, output)
        self.step = step
        self.pod = pod
        self.exit_code = exit_code
        self.output = output

    def __str__(self) -> str:
        how = f"failed with exit code {self.exit_code}" if self.exit_code is not None else "failed"
        tail = f"; its last lines:\n{self.output}" if self.output else ""
        return f"image step {self.step} {how} on pod {self.pod}{tail}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.pod, self.exit_code, self.output))


# What Ray (and kubetorch) users type, and kt's name for it.
_OTHER_NAMES = {
    "num_cpus": "cpus",
    "num_gpus": "gpus",
    "cpu": "cpus",
    "gpu": "gpus",
    "max_retries": "max_task_retries",
    "scheduling_strategy": "placement",
    "runtime_env": "env",
}


def check_option_names(what: str, given: Iterable[str], known: Collection[str]) -> None:
    """Refuse names that are not options, suggesting the one meant.

    Raises:
        ConfigError: ``unknown option 'num_cpus' of X.options: did you mean 'cpus'?``
    """
    for name in given:
        if name in known:
            continue
        guess = _OTHER_NAMES.get(name)
        if guess not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            guess = close[0] if close else None
        hint = (
            f": did you mean {guess!r}?"
            if guess
            else f"; the options are {', '.join(sorted(known))}"
        )
        raise ConfigError(f"unknown option {name!r} of {what}{hint}")


def seconds(value: float) -> str:
    """A duration for a message: `10 s`, `0.25 s` (never `9.999995223000042 s`)."""
    return f"{value:.0f} s" if value >= 100 else f"{value:.3g} s"


class ShutdownError(KtError):
    """This process's kt runtime was shut down; handles and Refs made before it are void."""

    def __str__(self) -> str:
        return (
            "kt was shut down in this process (kt.shutdown(), or the interpreter is exiting): "
            "handles and Refs made before it no longer work. Create the actor again "
            "(kt.get_actor finds a detached named actor)."
        )


class SerializationError(KtError, TypeError):
    """An argument or a result could not be pickled, so the call never ran; or (with
    `loading`) a result arrived that cannot be unpickled here: the call ran.

    `path` names the argument or attribute that failed (``argument 'x' .lock``).
    """

    def __init__(self, what: str, path: str, cause: str, *, loading: bool = False) -> None:
        super().__init__(what, path, cause)
        self.what = what
        self.path = path
        self.cause = cause
        self.loading = loading

    def __str__(self) -> str:
        if self.loading:
            return f"could not unpickle {self.path} of {self.what} here: {self.cause}"
        return (
            f"could not pickle {self.path} of {self.what}: {self.cause}. "
            "Pass a picklable value (or create the object inside the actor)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_serialization, (self.what, self.path, self.cause, self.loading))


def _rebuild_serialization(what: str, path: str, cause: str, loading: bool) -> SerializationError:
    return SerializationError(what, path, cause, loading=loading)


class ArgumentError(KtError, TypeError):
    """A call's arguments do not fit the method's signature: raised by the caller before
    anything is sent, naming the class, the method and its signature."""


class RemoteError(KtError):
    """User code raised remotely and its exception type cannot be rebuilt here."""

    def __init__(self, type_name: str, message: str, traceback: str, where: str) -> None:
        super().__init__(type_name, message, traceback, where)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.where = where

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message} (raised in {self.where})\n{self.traceback}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback, self.where))


class DeathCause(str, enum.Enum):
    """How an actor's process ended; the restart policy decides on it."""

    KILLED = "killed"  # kt.kill: never restarted
    EXITED = "exited"  # the process exited by itself (sys.exit, os._exit, a crash)
    SIGNALED = "signaled"  # a signal other than kt.kill's and the OOM killer's
    OOM = "oom"  # the kernel's OOM killer (the pod's memory limit)
    INIT_FAILED = "init_failed"  # its __init__ raised
    POD_LOST = "pod_lost"  # its pod went away
    UNKNOWN = "unknown"


class ActorDiedError(KtError):
    """The actor's process is gone: its state is lost and the call may have started.

    Set against `PodLostError`: here the process is known to have ended, and `cause`
    says how.
    """

    def __init__(
        self,
        actor: str,
        pod: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        oom: bool = False,
        reason: str = "",
        cause: DeathCause | None = None,
        last_lines: tuple[str, ...] = (),
    ) -> None:
        super().__init__(actor, pod, exit_code, signal, oom, reason)
        self.last_lines = last_lines
        """The last lines (at most 20) the actor printed before it died."""
        self.actor = actor
        self.pod = pod
        self.exit_code = exit_code
        self.signal = signal
        self.oom = oom
        self.reason = reason
        if cause is None:
            if oom:
                cause = DeathCause.OOM
            elif signal is not None:
                cause = DeathCause.SIGNALED
            elif exit_code is not None:
                cause = DeathCause.EXITED
            else:
                cause = DeathCause.UNKNOWN
        self.cause = cause

    def __str__(self) -> str:
        if self.oom:
            how = "was OOM-killed (raise its memory request)"
        elif self.signal is not None:
            how = f"was killed by signal {self.signal}"
        elif self.exit_code is not None:
            how = f"exited with code {self.exit_code}"
        else:
            how = "is gone"
        why = f": {self.reason}" if self.reason else ""
        said = "".join(f"\n    {line}" for line in self.last_lines)
        printed = f"\n  its last output:{said}" if said else ""
        return f"actor {self.actor} on pod {self.pod} {how}{why}{printed}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_actor_died,
            (
                self.actor,
                self.pod,
                self.exit_code,
                self.signal,
                self.oom,
                self.reason,
                self.cause.value,
                self.last_lines,
            ),
        )


def _rebuild_actor_died(
    actor: str,
    pod: str,
    exit_code: int | None,
    signal: int | None,
    oom: bool,
    reason: str,
    cause: str = DeathCause.UNKNOWN.value,
    last_lines: tuple[str, ...] = (),
) -> ActorDiedError:
    return ActorDiedError(
        actor,
        pod,
        exit_code=exit_code,
        signal=signal,
        oom=oom,
        reason=reason,
        cause=DeathCause(cause),
        last_lines=tuple(last_lines),
    )


class ActorNotFoundError(KtError):
    """The pod has no such actor: it was never created there, or the pod was replaced.
    The call did not run."""

    def __init__(self, actor: str, pod: str) -> None:
        super().__init__(actor, pod)
        self.actor = actor
        self.pod = pod

    def __str__(self) -> str:
        return (
            f"pod {self.pod} has no actor {self.actor}: it was never created there, or the "
            "pod was replaced; get a new handle (kt.get_actor for a named actor)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.actor, self.pod))


class DataKeyError(KtError, KeyError):
    """No value is stored under `key` (`kt.get`, `kt.rm`); `nearest` are the closest keys
    that exist."""

    def __init__(self, key: str, nearest: tuple[str, ...] = ()) -> None:
        super().__init__(key, tuple(nearest))
        self.key = key
        self.nearest = tuple(nearest)

    def __str__(self) -> str:
        near = f"; nearest: {', '.join(map(repr, self.nearest))}" if self.nearest else ""
        return f"no value is stored under key {self.key!r}{near} (kt.ls lists the keys)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.nearest))


class ValueGoneError(KtError):
    """The value of `key` a read began on is no longer held where it was read (replaced,
    removed, or a replica dropped) while it was being read; `kt.get` looks it up again."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"the value of {self.key!r} was replaced or removed while it was read"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key,))


class DataTooLargeError(KtError, MemoryError):
    """The pod that would hold a value has no room for it; nothing was written."""

    def __init__(self, key: str, size: int, pod: str, room: str) -> None:
        super().__init__(key, size, pod, room)
        self.key = key
        self.size = size
        self.pod = pod
        self.room = room

    def __str__(self) -> str:
        return (
            f"the value of {self.key!r} ({self.size / 2**20:.1f} MiB) does not fit on pod "
            f"{self.pod} ({self.room}); nothing was stored. Give its pool more memory "
            "(kt.Compute(memory=...)), remove keys it no longer needs (kt.rm), or put a "
            "smaller value"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.size, self.pod, self.room))


class StateDictMismatchError(KtError, ValueError):
    """`kt.get(key, into=...)`: the stored state dict does not fit the one given; nothing
    was copied."""


class GroupFailedError(KtError):
    """An SPMD group is out of restarts: `rank` on `pod` failed last; create it again."""

    def __init__(self, group: str, rank: int, pod: str, reason: str) -> None:
        super().__init__(group, rank, pod, reason)
        self.group = group
        self.rank = rank
        self.pod = pod
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"SPMD group {self.group} failed: rank {self.rank} on pod {self.pod} "
            f"{self.reason}; create the group again"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.group, self.rank, self.pod, self.reason))


class PodLostError(KtError):
    """The pod or the connection to it vanished; the call may or may not have run."""

    def __init__(self, pod: str, reason: str = "") -> None:
        super().__init__(pod, reason)
        self.pod = pod
        self.reason = reason

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"lost pod {self.pod}{why}; the call may or may not have run"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pod, self.reason))


class OwnerDiedError(KtError):
    """A borrowed Ref can never resolve: the process that owns it (the one that made the
    call) went away before it handed over the outcome. The call itself may have run."""

    def __init__(self, ref: str, owner: str, reason: str = "") -> None:
        super().__init__(ref, owner, reason)
        self.ref = ref
        self.owner = owner
        self.reason = reason

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"{self.ref}: its owner, {self.owner}, is gone{why}; the Ref was passed on "
            "before it resolved, and only the owner could hand over its outcome"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.ref, self.owner, self.reason))


class GetTimeoutError(KtError, TimeoutError):
    """Waiting for a result ran out of time; the remote call itself keeps running."""


class CancelledError(KtError, asyncio.CancelledError):
    """The Ref was cancelled before its result arrived.

    Also an asyncio.CancelledError, so that a task awaiting a cancelled Ref is cancelled
    (and `asyncio.wait_for` turns it into a timeout) as with any future.
    """


class PlacementError(KtError):
    """A request can never fit its pool, or did not fit within `placement_timeout`."""


class LaunchError(KtError):
    """A pod of the pool did not start, so the actors waiting for it were not created.

    Set against `PlacementError`: the request fits; the pod it was to run on failed.
    """

    def __init__(self, pool: str, pod: str, reason: str) -> None:
        super().__init__(pool, pod, reason)
        self.pool = pool
        self.pod = pod
        self.reason = reason

    def __str__(self) -> str:
        return f"pod {self.pod} of pool {self.pool} did not start: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pool, self.pod, self.reason))


class AuthError(KtError):
    """A credential was refused: the pool's token (by a supervisor or the gateway), or
    this driver's Kubernetes identity (RBAC: the message names the permission)."""


class ProtocolError(KtError):
    """A peer sent something that is not a kt frame of this version."""


def check_move(
    moves: Collection[tuple[enum.Enum, enum.Enum]],
    subject: str,
    start: enum.Enum,
    finish: enum.Enum,
) -> None:
    """Every state machine's table check.

    Raises:
        InvalidTransition: `moves` has no move from `start` to `finish`.
    """
    if (start, finish) not in moves:
        raise InvalidTransition(subject, str(start.value), str(finish.value))


class InvalidTransition(KtError):
    """A state machine was asked for a move that its table does not allow."""

    def __init__(self, subject: str, start: str, finish: str) -> None:
        super().__init__(subject, start, finish)
        self.subject = subject
        self.start = start
        self.finish = finish

    def __str__(self) -> str:
        return f"{self.subject}: no transition from {self.start} to {self.finish}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.subject, self.start, self.finish))
