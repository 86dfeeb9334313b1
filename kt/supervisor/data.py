"""The data store, the pod's side: the values this pod holds, and the broadcast tree of each.

Who calls it: `kt.supervisor.server.Supervisor`, for STORE frames (`kt.actors.datastore`
is the other end). Nothing here is unpickled: a value is the bytes of its pickle, as the
putter made them.

Theory of operation. A value is held in one buffer: a /dev/shm file when this host has
one with room (a getter sharing the host maps the file, no copy), else anonymous memory.
Room is checked before the buffer is made (`choose_medium`): a value that does not fit is
refused whole. A put is `reserve` (the buffer, not yet visible), filled (by the putter
through the file, or in `write` chunks), then `seal`, which makes it the key's value,
replacing any older one.

Fresh pages cost more than the copy into them (about 0.7 s per GiB to fault in here, 0.08
s to copy), so the files of values removed or replaced are kept (`POOL_FILES`, a share of
the free memory) and reused for new values that fit, as Ray's object store reuses its
arena. A file starts with a header naming the value in it (`shm.name_value`); a reader holds a
shared lock on the file while it maps it and checks the header, and a file is reused only
when nobody holds one (`shm.unread`), so no reader ever sees another value's bytes.

Each value is an *origin* (put on this pod) or a *replica* (pulled here for this pod's
getters). Replicas are caches: they never answer `locate` or `ls`, are checked against
the origin's value id, and are evicted oldest first when a new replica needs the room.
An origin keeps the broadcast tree of its value: pods that pull it join in arrival
order and each pulls from its parent in a heap of `fanout` children per node (the origin
is node 0), so the origin sends the value about `fanout` times however many pods get it.
A replica serves its chunks while it is still filling, so a deep tree is pipelined.
"""

from __future__ import annotations

import asyncio
import enum
import mmap
import time
import uuid
from dataclasses import dataclass, field

from kt.core import cgroup, shm

POOL_FILES = 4
"""Files of dropped values kept for reuse, at most (and at most a quarter of the free
memory)."""
MARGIN = 64 * 2**20
"""Bytes of memory left free when a value is placed: the pod's processes need some."""
REPLICA_SHARE = 0.5
"""Replicas take at most this share of the memory left to the pod (with their own)."""


class Medium(str, enum.Enum):
    SHM = "shm"  # a /dev/shm file: getters on this host map it
    MEMORY = "memory"  # anonymous memory of the supervisor: getters are sent the bytes


def choose_medium(size: int, *, shm_free: int | None, memory_free: int) -> Medium | None:
    """Where a value of `size` bytes goes: /dev/shm when it has room (`shm_free` None: not
    usable), else memory; None when neither has room. /dev/shm pages are memory too."""
    if size + MARGIN > memory_free:
        return None
    if shm_free is not None and size + MARGIN <= shm_free:
        return Medium.SHM
    return Medium.MEMORY


def parent(index: int, fanout: int) -> int:
    """The node a tree's `index`-th node pulls from (node 0, the origin, has none)."""
    if index <= 0:
        raise ValueError("the origin pulls from nobody")
    return (index - 1) // max(1, fanout)


def route(nodes: list[str], dead: set[str], node: str, fanout: int) -> str:
    """The source `node` pulls from: its parent in `nodes` (the tree in arrival order,
    joined now if it is new), or the nearest live ancestor when the parent is `dead`."""
    if node not in nodes:
        nodes.append(node)
    index = nodes.index(node)
    while index > 0:
        index = parent(index, fanout)
        if nodes[index] not in dead:
            return nodes[index]
    return nodes[0]


class EntryState(str, enum.Enum):
    """FILLING -> READY; either -> GONE (replaced, removed, evicted, or its pull failed)."""

    FILLING = "filling"
    READY = "ready"
    GONE = "gone"


@dataclass
class Entry:
    key: str
    size: int
    vid: str  # the origin's id of this value: a replica of another put is not it
    medium: Medium
    buffer: mmap.mmap
    file: str | None  # its /dev/shm name (Medium.SHM)
    origin: bool
    have: int = 0  # bytes filled, from the start
    state: EntryState = EntryState.FILLING
    used: float = field(default_factory=time.monotonic)
    error: BaseException | None = None  # why a replica's pull failed
    tree: list[str] = field(default_factory=list)  # an origin's: "host:port" per node
    dead: set[str] = field(default_factory=set)
    tokens: dict[str, str] = field(default_factory=dict)  # node -> its pool's token
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def advanced(self) -> None:
        """Wake whoever waits for more bytes or the end."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, end: int) -> None:
        """Until `end` bytes are filled; raises the pull's error if it fails first."""
        while self.have < end and self.state is not EntryState.GONE:
            await self._changed.wait()
        if self.have < end:
            raise self.error or LookupError(f"{self.key!r} is no longer held here")

    def meta(self, pod: str, host: str | None) -> dict[str, object]:
        """What a getter needs to read it."""
        return {"n": self.size, "vid": self.vid, "file": self.file, "host": host, "pod": pod}

    @property
    def view(self) -> memoryview:
        """The value's bytes in its buffer."""
        start = shm.VALUE_OFFSET if self.medium is Medium.SHM else 0
        return memoryview(self.buffer)[start : start + self.size]

    def drop(self) -> None:
        """No longer held: waiters are told; `DataTable.discard` frees the buffer."""
        self.state = EntryState.GONE
        self.advanced()


@dataclass
class DataTable:
    pod: str
    host_key: str | None
    values: dict[str, Entry] = field(default_factory=dict)
    pending: dict[str, Entry] = field(default_factory=dict)  # put id -> a reserved entry
    pool: list[tuple[str, mmap.mmap]] = field(default_factory=list)  # files kept for reuse
    bytes_sent: int = 0  # value bytes this pod sent to other processes
    bytes_to_pods: int = 0  # of which to pods pulling for their getters
    bytes_pulled: int = 0  # value bytes this pod pulled from other pods
    files_made: int = 0  # /dev/shm files made (the rest of the values reused one)

    def allocate(self, key: str, size: int, vid: str, *, origin: bool) -> Entry:
        """A buffer for a value of `size` bytes (replicas make room by eviction).

        Raises:
            DataTooLargeError: neither /dev/shm nor memory has room for it.
        """
        from kt.core.errors import DataTooLargeError

        if not origin:
            self._evict_for(size)
        reused = self._reuse(size, vid) if self.host_key is not None else None
        if reused is not None:
            return Entry(key, size, vid, Medium.SHM, reused[1], reused[0], origin)
        for _ in range(2):
            shm_free = shm.free_bytes() if self.host_key is not None else None
            memory = cgroup.available_memory()
            medium = choose_medium(size + shm.VALUE_OFFSET, shm_free=shm_free, memory_free=memory)
            if medium is not None or not self.pool:
                break
            self._empty_pool()  # the pooled files' memory, back for this value
        if medium is None:
            room = f"{memory / 2**20:.0f} MiB of memory free"
            if shm_free is not None:
                room += f", {shm_free / 2**20:.0f} MiB in /dev/shm"
            raise DataTooLargeError(key, size, self.pod, room)
        if medium is Medium.SHM:
            name, buffer = shm.new_file(shm.VALUE_OFFSET + size)
            self.files_made += 1
            shm.name_value(buffer, vid, size)
            return Entry(key, size, vid, medium, buffer, name, origin)
        buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return Entry(key, size, vid, medium, buffer, None, origin)

    def _reuse(self, size: int, vid: str) -> tuple[str, mmap.mmap] | None:
        """A pooled file that fits `size` (wasting at most half of it) and nobody reads,
        its header naming `vid` now."""
        fits = sorted(
            (
                f
                for f in self.pool
                if size + shm.VALUE_OFFSET <= len(f[1]) <= 2 * (size + shm.VALUE_OFFSET)
            ),
            key=lambda f: len(f[1]),
        )
        for name, buffer in fits:
            with shm.unread(name) as free:
                if not free:
                    continue
                shm.name_value(buffer, vid, size)
            self.pool.remove((name, buffer))
            return name, buffer
        return None

    def _empty_pool(self) -> None:
        """Give the pooled files' memory back."""
        for name, _ in self.pool:
            shm.unlink(name)
        self.pool.clear()

    def discard(self, entry: Entry) -> None:
        """`entry` is no longer held: its file goes to the pool, or away."""
        entry.drop()
        if entry.file is None:
            return
        name, buffer, entry.file = entry.file, entry.buffer, None
        pooled = sum(len(b) for _, b in self.pool)
        room = cgroup.available_memory() + pooled
        if len(self.pool) >= POOL_FILES or pooled + len(buffer) > room // 4:
            shm.unlink(name)  # mappings made of it stay valid
            return
        try:  # after this turn of the loop: frames of it queued now are written by then
            asyncio.get_running_loop().call_soon(self.pool.append, (name, buffer))
        except RuntimeError:
            self.pool.append((name, buffer))

    def reserve(self, key: str, size: int) -> tuple[str, Entry]:
        """A buffer for a put, not visible until `seal`."""
        entry = self.allocate(key, size, uuid.uuid4().hex, origin=True)
        put_id = entry.vid
        self.pending[put_id] = entry
        return put_id, entry

    def write(self, put_id: str, offset: int, data: memoryview) -> None:
        entry = self._pending(put_id)
        if offset < 0 or offset + len(data) > entry.size:
            raise ValueError(f"bytes {offset}..{offset + len(data)} are outside the value")
        entry.view[offset : offset + len(data)] = data

    def seal(self, put_id: str, node: str, token: str) -> Entry:
        """The reserved value becomes its key's, replacing the one before."""
        entry = self.pending.pop(put_id, None) or self._pending(put_id)
        entry.have = entry.size
        entry.state = EntryState.READY
        entry.tree = [node]
        entry.tokens = {node: token}
        self._replace(entry)
        return entry

    def abandon(self, put_id: str) -> None:
        entry = self.pending.pop(put_id, None)
        if entry is not None:
            self.discard(entry)

    def _pending(self, put_id: str) -> Entry:
        entry = self.pending.get(put_id)
        if entry is None:
            raise LookupError(f"no put {put_id!r} is reserved on pod {self.pod}")
        return entry

    def _replace(self, entry: Entry) -> None:
        old = self.values.get(entry.key)
        self.values[entry.key] = entry
        if old is not None and old is not entry:
            self.discard(old)

    def origin(self, key: str) -> Entry | None:
        entry = self.values.get(key)
        return entry if entry is not None and entry.origin else None

    def held(self, key: str, vid: str) -> Entry | None:
        """This pod's copy of value `vid` of `key`, origin or replica, if it has one."""
        entry = self.values.get(key)
        if entry is None or entry.vid != vid or entry.state is EntryState.GONE:
            return None
        entry.used = time.monotonic()
        return entry

    def replica(self, key: str, size: int, vid: str) -> Entry:
        """A new, filling replica of value `vid` (replacing an older copy of `key`)."""
        entry = self.allocate(key, size, vid, origin=False)
        self._replace(entry)
        return entry

    def remove(self, key: str) -> bool:
        """Drop `key` here; True when this pod was its origin."""
        entry = self.values.pop(key, None)
        if entry is None:
            return False
        self.discard(entry)
        return entry.origin

    def listing(self, prefix: str) -> dict[str, int]:
        return {k: e.size for k, e in self.values.items() if e.origin and k.startswith(prefix)}

    def close(self) -> None:
        for entry in [*self.values.values(), *self.pending.values()]:
            entry.drop()
            if entry.file is not None:
                shm.unlink(entry.file)
        self.values.clear()
        self.pending.clear()
        self._empty_pool()

    def _evict_for(self, size: int) -> None:
        """Drop the oldest ready replicas until a new one of `size` keeps replicas within
        their share of the pod's memory."""
        replicas = sorted(
            (e for e in self.values.values() if not e.origin and e.state is EntryState.READY),
            key=lambda e: e.used,
        )
        held = sum(e.size for e in self.values.values() if not e.origin)
        budget = REPLICA_SHARE * (cgroup.available_memory() + held)
        while replicas and held + size > budget:
            victim = replicas.pop(0)
            held -= victim.size
            del self.values[victim.key]
            self.discard(victim)
