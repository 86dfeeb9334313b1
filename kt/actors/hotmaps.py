"""A putter's writable mappings of data store files, kept a while for its next put.

Who uses it: `kt.actors.datastore`, when a process that shares a pod's /dev/shm writes a
value into the file the pod reserved for it.

Why: a pod reuses the files of dropped values (`kt.supervisor.data`), so a process that
puts again soon writes into a file it has mapped before. Mapping a file anew costs its
page tables (25 ms per GiB here, made at once), unmapping it as much again, against
82 ms per GiB for the copy itself on two threads. Ray's object store stays mapped in
every client for the same reason.

What it costs: a mapping keeps its file's memory even after the pod unlinks the file.
So a mapping is dropped when its file is gone (`sweep`, before each put: a file's
name is never given to another, so a name still there is the file that was mapped), after
`IDLE_S` without a write (a timer), when more than `FILES` are kept, and at once when a
pod refuses a value for want of room (`cool`: the put then asks again).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from kt.core import shm

FILES = 4  # mappings kept at most
IDLE_S = 10.0  # a mapping is dropped this long after its last write


@dataclass
class _Kept:
    name: str
    mapping: mmap.mmap
    used: float = 0.0
    writers: int = 0  # writes under way: the mapping is not dropped meanwhile


class Use:
    """A kept mapping, held by one write for the length of a `with` block."""

    def __init__(self, kept: _Kept) -> None:
        self._kept = kept

    def __enter__(self) -> mmap.mmap:
        return self._kept.mapping

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        with _lock:
            self._kept.writers -= 1
            self._kept.used = time.monotonic()
            _trim()
            _arm()


_kept: dict[str, _Kept] = {}
_lock = threading.Lock()
_timer: threading.Timer | None = None
mapped = 0  # files mapped by this process (each a miss of the kept ones)


def writable(name: str) -> Use:
    """`name`'s file (a pod's, from `shm.new_file`) mapped shared and writable, its page
    tables made: the one kept from an earlier write, if any.

    Raises:
        ValueError: the name is not a kt file.
        OSError: the file is gone.
    """
    global mapped
    with _lock:
        kept = _kept.get(name)
        if kept is None:
            kept = _kept[name] = _Kept(name, shm.open_for_writing(name))
            mapped += 1
        kept.writers += 1
        return Use(kept)


def sweep() -> None:
    """Drop the mappings of files that are gone (their pod unlinked them)."""
    with _lock:
        for kept in list(_kept.values()):
            if not kept.writers and not os.path.exists(os.path.join(shm.SHM_DIR, kept.name)):
                _drop(kept)


def cool() -> bool:
    """Drop every mapping no write is using; whether there was any."""
    with _lock:
        idle = [kept for kept in _kept.values() if not kept.writers]
        for kept in idle:
            _drop(kept)
        return bool(idle)


def kept() -> list[str]:
    """The files mapped now."""
    with _lock:
        return list(_kept)


def _drop(kept: _Kept) -> None:
    del _kept[kept.name]
    kept.mapping.close()


def _trim() -> None:
    """At most `FILES` kept: the least recently written go first."""
    idle = sorted((k for k in _kept.values() if not k.writers), key=lambda k: k.used)
    for kept in idle[: max(0, len(_kept) - FILES)]:
        _drop(kept)


def _arm() -> None:
    """A timer to drop idle mappings, when there are some and none is set."""
    global _timer
    if _timer is None and _kept:
        _timer = threading.Timer(IDLE_S, _tick)
        _timer.daemon = True
        _timer.start()


def _tick() -> None:
    global _timer
    with _lock:
        _timer = None
        now = time.monotonic()
        for kept in list(_kept.values()):
            if not kept.writers and now - kept.used >= IDLE_S:
                _drop(kept)
        _arm()


def _forget() -> None:
    """In a forked child: the parent's mappings and timer are not this process's to keep
    (their memory is released as the child lets go of them)."""
    global _lock, _timer
    _lock = threading.Lock()
    _timer = None
    _kept.clear()


os.register_at_fork(after_in_child=_forget)
