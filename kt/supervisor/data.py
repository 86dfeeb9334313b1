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
arena. A file starts with a header naming the buffer's use (`shm.name_value`, an id new
for each value placed in it); a reader holds a shared lock on the file while it maps it
and checks the header, and a file is reused only when nobody holds one (`shm.unread`) and
no connection still has its bytes queued to send (`Sender.writing`: the event loop writes
queued views later, without copying them), so no reader sees another value's bytes.

Each value is an *origin* (put on this pod; `values`, one per key) or a *replica*
(pulled here for this pod's getters; `replicas`, by key and the origin's value id, so a
late pull of an old value never displaces this pod's own). Replicas are caches: they
never answer `locate` or `ls`, and are evicted oldest first when a new one needs room.
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
from typing import Protocol

from kt.core import cgroup, shm

POOL_FILES = 4
"""Files of dropped values kept for reuse, at most (and at most a quarter of the free
memory)."""
MARGIN = 64 * 2**20
"""Bytes of memory left free when a value is placed: the pod's processes need some."""
REPLICA_SHARE = 0.5
"""Replicas take at most this share of the memory left to the pod (with their own)."""
_ROOM = shm.VALUE_OFFSET + shm.VALUE_SLACK  # a file's bytes beside its value's


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


class Sender(Protocol):
    """A connection a value's bytes were queued on."""

    @property
    def writing(self) -> bool:
        """Bytes are still queued on it (views of buffers, not copies)."""
        ...


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
    fid: str  # the id its file's header holds: new for each value placed in a buffer
    medium: Medium
    buffer: mmap.mmap
    file: str | None  # its /dev/shm name (Medium.SHM)
    have: int = 0  # bytes filled, from the start
    state: EntryState = EntryState.FILLING
    used: float = field(default_factory=time.monotonic)
    error: BaseException | None = None  # why a replica's pull failed
    tree: list[str] = field(default_factory=list)  # an origin's: "host:port" per node
    dead: set[str] = field(default_factory=set)
    tokens: dict[str, str] = field(default_factory=dict)  # node -> its pool's token
    start: int = shm.VALUE_OFFSET  # where its bytes begin in its file (Medium.SHM)
    owner: int = -1  # the route of the connection that reserved a pending put
    senders: list[Sender] = field(default_factory=list)  # connections its bytes went to
    device: str = ""  # the putting process's endpoint that sends its tensors directly
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def advanced(self) -> None:
        """Wake whoever waits for more bytes or the end."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, end: int, timeout: float) -> None:
        """Until `end` bytes are filled.

        Raises:
            the pull's error, or ValueGoneError: it ended first (failed, dropped).
            TimeoutError: no byte came for `timeout` s.
        """
        from kt.core.errors import ValueGoneError

        while self.have < end and self.state is not EntryState.GONE:
            await asyncio.wait_for(self._changed.wait(), timeout)
        if self.have < end:
            raise self.error or ValueGoneError(self.key)

    def sent_on(self, sender: Sender) -> None:
        """Its bytes were queued on `sender`: its file is not reused while they are."""
        self.senders = [s for s in self.senders if s.writing and s is not sender]
        self.senders.append(sender)

    def meta(self, pod: str, host: str | None) -> dict[str, object]:
        """What a getter needs to read it."""
        return {
            "n": self.size,
            "vid": self.vid,
            "fid": self.fid,
            "file": self.file,
            "host": host,
            "pod": pod,
            **({"dev": self.device} if self.device else {}),
        }

    @property
    def view(self) -> memoryview:
        """The value's bytes in its buffer."""
        start = self.start if self.medium is Medium.SHM else 0
        return memoryview(self.buffer)[start : start + self.size]

    def move_to(self, start: int) -> None:
        """A putter that wrote the file itself began the value at `start`.

        Raises:
            ValueError: `start` is outside the room its file has.
        """
        if self.medium is not Medium.SHM or self.file is None:
            raise ValueError("only a value in a file the putter wrote has a start")
        if not shm.VALUE_OFFSET <= start <= len(self.buffer) - self.size:
            raise ValueError(f"a value of {self.size} bytes cannot start at byte {start}")
        self.start = start
        shm.name_value(self.buffer, self.fid, self.size, start)

    def drop(self) -> None:
        """No longer held: waiters are told; `DataTable.discard` frees the buffer."""
        self.state = EntryState.GONE
        self.advanced()


@dataclass
class DataTable:
    pod: str
    host_key: str | None
    values: dict[str, Entry] = field(default_factory=dict)  # key -> the value put here
    replicas: dict[tuple[str, str], Entry] = field(default_factory=dict)  # (key, vid) ->
    pending: dict[str, Entry] = field(default_factory=dict)  # put id -> a reserved entry
    pool: list[tuple[str, mmap.mmap]] = field(default_factory=list)  # files kept for reuse
    bytes_sent: int = 0  # value bytes this pod sent to other processes
    bytes_to_pods: int = 0  # of which to pods pulling for their getters
    bytes_pulled: int = 0  # value bytes this pod pulled from other pods
    files_made: int = 0  # /dev/shm files made (the rest of the values reused one)
    closed: bool = False

    def allocate(self, key: str, size: int, vid: str, *, origin: bool) -> Entry:
        """A buffer for a value of `size` bytes (replicas make room by eviction).

        Raises:
            DataTooLargeError: neither /dev/shm nor memory has room for it.
        """
        from kt.core.errors import DataTooLargeError

        if size < 0:
            raise ValueError(f"a value of {size} bytes")
        if not origin:
            self._evict_for(size)
        fid = vid if origin else uuid.uuid4().hex
        reused = self._reuse(size, fid) if self.host_key is not None else None
        if reused is not None:
            return Entry(key, size, vid, fid, Medium.SHM, reused[1], reused[0])
        for _ in range(2):
            shm_free = shm.free_bytes() if self.host_key is not None else None
            memory = cgroup.available_memory()
            medium = choose_medium(size + _ROOM, shm_free=shm_free, memory_free=memory)
            if medium is not None or not self.pool:
                break
            self._empty_pool()  # the pooled files' memory, back for this value
        if medium is None:
            room = f"{memory / 2**20:.0f} MiB of memory free"
            if shm_free is not None:
                room += f", {shm_free / 2**20:.0f} MiB in /dev/shm"
            raise DataTooLargeError(key, size, self.pod, room)
        if medium is Medium.SHM:
            name, buffer = shm.new_file(_ROOM + size)
            self.files_made += 1
            try:
                shm.name_value(buffer, fid, size)
            except BaseException:
                shm.unlink(name)
                raise
            return Entry(key, size, vid, fid, medium, buffer, name)
        buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return Entry(key, size, vid, fid, medium, buffer, None)

    def _reuse(self, size: int, fid: str) -> tuple[str, mmap.mmap] | None:
        """A pooled file that fits `size` (wasting at most half of it) and nobody reads,
        its header naming `fid` now."""
        fits = sorted(
            (f for f in self.pool if size + _ROOM <= len(f[1]) <= 2 * (size + _ROOM)),
            key=lambda f: len(f[1]),
        )
        for name, buffer in fits:
            with shm.unread(name) as free:
                if not free:
                    continue
                shm.name_value(buffer, fid, size)
            self.pool.remove((name, buffer))
            return name, buffer
        return None

    def _empty_pool(self) -> None:
        """Give the pooled files' memory back."""
        for name, _ in self.pool:
            shm.unlink(name)
        self.pool.clear()

    def discard(self, entry: Entry) -> None:
        """`entry` is no longer held: its file goes to the pool, or away (unlinked: the
        mappings made of it, and bytes of it still queued to send, stay valid)."""
        entry.drop()
        if entry.file is None:
            return
        name, buffer, entry.file = entry.file, entry.buffer, None
        pooled = sum(len(b) for _, b in self.pool)
        room = cgroup.available_memory() + pooled
        if (
            self.closed
            or any(s.writing for s in entry.senders)
            or len(self.pool) >= POOL_FILES
            or pooled + len(buffer) > room // 4
        ):
            shm.unlink(name)
        else:
            self.pool.append((name, buffer))
        entry.senders.clear()

    def reserve(self, key: str, size: int, owner: int = -1) -> tuple[str, Entry]:
        """A buffer for a put by the connection `owner`, not visible until `seal`."""
        entry = self.allocate(key, size, uuid.uuid4().hex, origin=True)
        entry.owner = owner
        put_id = entry.vid
        self.pending[put_id] = entry
        return put_id, entry

    def abandon_owner(self, owner: int) -> None:
        """The connection `owner` is gone: its puts never finish."""
        for put_id in [i for i, e in self.pending.items() if e.owner == owner]:
            self.abandon(put_id)

    def write(self, put_id: str, offset: int, data: memoryview) -> None:
        entry = self._pending(put_id)
        if offset < 0 or offset + len(data) > entry.size:
            raise ValueError(f"bytes {offset}..{offset + len(data)} are outside the value")
        entry.view[offset : offset + len(data)] = data

    def seal(
        self, put_id: str, node: str, token: str, start: int | None = None, device: str = ""
    ) -> Entry:
        """The reserved value becomes its key's, replacing the one before (`start`: where
        the putter began it in its file, `Entry.move_to`; `device`: the putter's endpoint
        that sends its tensors directly, `kt.actors.direct`).

        Raises:
            LookupError: no such put is reserved.
            ValueError: `start` leaves the value no room in its file (the put stays
                reserved: its putter abandons it).
        """
        entry = self._pending(put_id)
        if start is not None:
            entry.move_to(start)
        del self.pending[put_id]
        entry.device = device
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
        return self.values.get(key)

    def held(self, key: str, vid: str) -> Entry | None:
        """This pod's copy of value `vid` of `key`, origin or replica, if it has one."""
        entry = self.values.get(key)
        if entry is None or entry.vid != vid:
            entry = self.replicas.get((key, vid))
        if entry is None or entry.state is EntryState.GONE:
            return None
        entry.used = time.monotonic()
        return entry

    def replica(self, key: str, size: int, vid: str) -> Entry:
        """A new, filling replica of value `vid` (replicas of other values of `key` go)."""
        for old in [e for (k, _), e in self.replicas.items() if k == key]:
            self.drop_replica(old)
        entry = self.allocate(key, size, vid, origin=False)
        self.replicas[(key, vid)] = entry
        return entry

    def drop_replica(self, entry: Entry) -> None:
        if self.replicas.get((entry.key, entry.vid)) is entry:
            del self.replicas[(entry.key, entry.vid)]
        self.discard(entry)

    def remove(self, key: str) -> bool:
        """Drop `key` here, replicas too; True when this pod was its origin."""
        for old in [e for (k, _), e in self.replicas.items() if k == key]:
            self.drop_replica(old)
        entry = self.values.pop(key, None)
        if entry is None:
            return False
        self.discard(entry)
        return True

    def listing(self, prefix: str) -> dict[str, int]:
        return {k: e.size for k, e in self.values.items() if k.startswith(prefix)}

    def close(self) -> None:
        self.closed = True
        for entry in [*self.values.values(), *self.replicas.values(), *self.pending.values()]:
            self.discard(entry)
        self.values.clear()
        self.replicas.clear()
        self.pending.clear()
        self._empty_pool()

    def _evict_for(self, size: int) -> None:
        """Drop the oldest ready replicas until a new one of `size` keeps replicas within
        their share of the pod's memory."""
        replicas = sorted(
            (e for e in self.replicas.values() if e.state is EntryState.READY),
            key=lambda e: e.used,
        )
        held = sum(e.size for e in self.replicas.values())
        budget = REPLICA_SHARE * (cgroup.available_memory() + held)
        while replicas and held + size > budget:
            victim = replicas.pop(0)
            held -= victim.size
            self.drop_replica(victim)
