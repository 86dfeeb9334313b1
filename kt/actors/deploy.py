"""What `.to()` deployed, and whether a second `.to()` of the same thing makes it again.

Who calls it: `kt.actors.api.RemoteClass.to` (also behind `kt.fn(f).to`). A deployment
is known by what was deployed (module and qualified name) and where (the pool, and the
distribution for SPMD groups). A second `.to()` of it returns the same object when the
project version and the init arguments are unchanged and it is still alive, so nothing
restarts; otherwise the old one is torn down first (its room on the pods is freed) and
a new one is made on the new version, its `__init__` run again. Actors made with
`.remote()` are not deployments: they keep the version they were created with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kt.actors.scheduler import progress

Key = tuple[str, ...]


@dataclass
class Deployment:
    version: str | None  # the synced project's version; None when nothing is synced
    init: bytes  # the pickled init arguments
    obj: Any  # a Service, DeployedFunction or SPMD group


def key_of(target: Any, pool: str, distribution: object = None) -> Key:
    """What identifies a deployment: the class or function by name, and its pool. Local
    functions and lambdas also by their first line (many share one qualified name)."""
    qualname = getattr(target, "__qualname__", repr(target))
    where = [getattr(target, "__module__", "?") or "?", qualname, pool, repr(distribution)]
    code = getattr(target, "__code__", None)
    if code is not None and ("<locals>" in qualname or "<lambda>" in qualname):
        where.append(f"{code.co_filename}:{code.co_firstlineno}")
    return tuple(where)


def reusable(old: Deployment | None, version: str | None, init: bytes, alive: bool) -> bool:
    """The policy: the same code, the same arguments, and still up."""
    return old is not None and alive and old.version == version and old.init == init


def is_alive(obj: Any) -> bool:
    state = getattr(obj, "group_state", None)  # an SPMD group (kt.distributed)
    if state is not None:
        return str(state.value) not in ("failed", "stopped")
    return bool(obj.alive())


class Deployments:
    """This driver's deployments, by key."""

    def __init__(self) -> None:
        self._known: dict[Key, Deployment] = {}
        self._locks: dict[Key, threading.Lock] = {}
        self._lock = threading.Lock()  # guards _locks only

    def deploy(
        self, key: Key, version: str | None, init: bytes, make: Callable[[], Any], what: str
    ) -> Any:
        """One `.to()` of `key` at a time (making one may wait for image steps); other
        deployments go on meanwhile."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            old = self._known.get(key)
            if old is not None and reusable(old, version, init, is_alive(old.obj)):
                return old.obj
            if old is not None:
                why = "the code changed" if old.version != version else "new arguments"
                if not is_alive(old.obj):
                    why = "the previous one is gone"
                progress(f"{what}: {why}: made again on the new version (__init__ runs again)")
                old.obj.teardown()
            obj = make()
            self._known[key] = Deployment(version, init, obj)
            return obj
