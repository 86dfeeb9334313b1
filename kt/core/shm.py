"""Large payloads through shared memory when caller and callee share a host.

Who uses it: `kt.core.serialization` (to write and read buffers), the runtime and the
worker (which decide per link whether the far side shares this host's /dev/shm).

Theory of operation. Over TCP every large argument costs a copy into the kernel, one
out of it at each hop, and fresh pages on the receiving side (on small VMs, faulting in
fresh memory is slower than copying it). When both ends share /dev/shm, the sender
instead copies the buffers once into a segment from its own `ShmArena` (a pool of
/dev/shm files it keeps mapped, so their pages are already faulted in), and sends
only the segment's name and offsets. The receiver maps the file and rebuilds arrays as
views on it: no copy at all on that side.

A segment is reused only when its receiver is done with it: the receiver takes a
shared `flock` on the file before it marks the segment claimed, and releases it when the
last view on its mapping is garbage; the sender reuses a segment only when it is
claimed and an exclusive `flock` succeeds. A segment never claimed (its call was lost)
stays out of the pool. Segment files are unlinked when the sender exits (a worker,
which leaves by `os._exit`, calls `release_all` first); files of processes that no
longer exist are swept when an arena is made and by the supervisor whenever one of its
workers exits (a SIGKILLed worker cleans nothing up itself).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import mmap
import os
import re
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from kt.core.liveness import pid_alive

SHM_DIR = "/dev/shm"
SHM_THRESHOLD = 1 << 20
"""Out-of-band buffers of at least this many bytes in total take the shared-memory path."""
_Job = TypeVar("_Job")
_HEADER = 64  # claimed flag (u64) and padding, before the data
_NAME = re.compile(r"kt-shm-(\d+)-[0-9a-f]+-\d+")
_CLAIMED = struct.Struct("<Q")


def host_key() -> str | None:
    """Names this host's /dev/shm: equal keys mean a file written here is visible there.

    None (shared memory off) where there is no /dev/shm, or when KT_SHM=0. Processes
    whose KT_SHM_DOMAIN differs never share memory, as if on different hosts (so a test
    can give local pods the layout of a cluster: memory shared inside a pod, not across).
    """
    if os.environ.get("KT_SHM") == "0":
        return None
    domain = os.environ.get("KT_SHM_DOMAIN", "")
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}:{domain}"


@dataclass
class Segment:
    name: str
    size: int
    fd: int
    map: mmap.mmap

    def claimed(self) -> bool:
        return bool(_CLAIMED.unpack_from(self.map, 0)[0])

    def free(self) -> bool:
        """Claimed by its receiver, and no receiver holds it any more."""
        if not self.claimed():
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True


class ShmArena:
    """The sending side: a pool of mapped /dev/shm segments, reused once released."""

    def __init__(self) -> None:
        self._segments: list[Segment] = []
        self._lock = threading.Lock()
        self._count = 0
        self._tag = os.urandom(4).hex()
        sweep_dead()
        weakref.finalize(self, _unlink_all, self._segments)
        _ALL_SEGMENTS.append(self._segments)

    def write(self, buffers: list[memoryview]) -> tuple[str, list[int]]:
        """Copy `buffers` into one segment; returns its name and each buffer's offset."""
        total = sum(b.nbytes for b in buffers)
        seg = self._acquire(total)
        offsets = []
        pos = _HEADER
        for buf in buffers:
            offsets.append(pos)
            pos += buf.nbytes
        write_at(seg.map, _HEADER, buffers)  # a large one on the copy threads
        return seg.name, offsets

    def _acquire(self, nbytes: int) -> Segment:
        with self._lock:
            for seg in sorted(self._segments, key=lambda s: s.size):
                if seg.size - _HEADER >= nbytes and seg.free():
                    break
            else:
                seg = self._create(max(nbytes + _HEADER, 1 << 20))
            _CLAIMED.pack_into(seg.map, 0, 0)
            return seg

    def _create(self, nbytes: int) -> Segment:
        size = 1 << (nbytes - 1).bit_length()  # powers of two: reused for nearby sizes
        self._count += 1
        name = f"kt-shm-{os.getpid()}-{self._tag}-{self._count}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        seg = Segment(name, size, fd, mmap.mmap(fd, size))
        self._segments.append(seg)
        return seg


def new_file(size: int) -> tuple[str, mmap.mmap]:
    """A fresh /dev/shm file of `size` bytes owned by this process, mapped shared (the data
    store's values); unlinked by `unlink`, or swept once this process is gone."""
    global _files
    _files += 1
    name = f"kt-shm-{os.getpid()}-{_FILE_TAG}-{_files}"
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return name, mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.unlink(os.path.join(SHM_DIR, name))
        raise
    finally:
        os.close(fd)


_FILE_TAG = os.urandom(4).hex()
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_files = 0


def _open(name: str, flags: int) -> int:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a kt shared-memory file: {name!r}")
    return os.open(os.path.join(SHM_DIR, name), flags)


def open_for_writing(name: str) -> mmap.mmap:
    """Another process's file from `new_file`, mapped shared and writable, to fill it
    (its page tables made at once: a quarter of the cost of faulting them in one by one).

    Raises:
        ValueError: the name is not a kt file.
        OSError: the file is gone.
    """
    fd = _open(name, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | _POPULATE)
    finally:
        os.close(fd)


def open_for_reading(name: str) -> mmap.mmap:
    """A file from `new_file` as a private copy-on-write mapping (writes stay in this
    process), its pages made as they are touched, with a shared lock held while the
    mapping lives: its owner does not reuse a file someone reads (`unread`).

    Raises:
        ValueError: the name is not a kt file.
        OSError: the file is gone.
    """
    fd = _open(name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mapping = _Mapping(fd, size, flags=mmap.MAP_PRIVATE, prot=prot)
    except BaseException:
        os.close(fd)
        raise
    mapping.fd = fd
    weakref.finalize(mapping, os.close, fd)
    return mapping


def read_into(mapping: mmap.mmap, pieces: list[tuple[int, memoryview]]) -> None:
    """Fill each buffer from the file `mapping` (from `open_for_reading`) maps, at its
    offset, with read(2): one copy, and the mapping's own pages are never touched. Large
    reads go in `COPY_PIECE` pieces on the copy threads.

    Raises:
        OSError: the file is shorter than a piece.
    """
    fd = mapping.fd if isinstance(mapping, _Mapping) else None
    if fd is None:
        raise OSError("not a mapping from open_for_reading")

    def read(job: tuple[int, memoryview]) -> None:
        offset, target = job
        done = 0
        while done < target.nbytes:
            got = os.preadv(fd, [target[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the file ended at byte {offset + done}")
            done += got

    jobs = [(offset + at, view) for offset, target in pieces for at, view in _split(target)]
    _run(read, jobs, sum(target.nbytes for _, target in pieces))


def write_at(mapping: mmap.mmap, start: int, views: list[memoryview]) -> None:
    """Copy `views` (byte views) one after another into `mapping` from byte `start`. Large
    copies go in `COPY_PIECE` pieces on the copy threads when numpy is loaded (its copy
    lets go of the GIL; an mmap's slice assignment does not, so without it this thread
    copies alone). Its views on `mapping` end with the call: the caller may close it.

    Raises:
        ValueError: they do not fit.
    """
    total = sum(view.nbytes for view in views)
    if start < 0 or start + total > len(mapping):
        raise ValueError(f"{total} bytes from {start} do not fit in {len(mapping)}")
    np = sys.modules.get("numpy")
    copy: Callable[[tuple[int, memoryview]], None]
    if np is None:

        def copy(job: tuple[int, memoryview]) -> None:
            at, piece = job
            mapping[at : at + piece.nbytes] = piece

    else:
        target = np.frombuffer(mapping, dtype=np.uint8)

        def copy(job: tuple[int, memoryview]) -> None:
            at, piece = job
            np.copyto(target[at : at + piece.nbytes], np.frombuffer(piece, dtype=np.uint8))

    jobs, pos = [], start
    for view in views:
        jobs += [(pos + at, piece) for at, piece in _split(view)]
        pos += view.nbytes
    _run(copy, jobs, total if np is not None else 0)


COPY_PIECE = 8 * 2**20
"""A large copy's unit on the copy threads."""
PARALLEL_FROM = 16 * 2**20
"""Copies of this many bytes in all are shared among the copy threads: one thread copies
384 MiB into a mapped file in 58 ms here, two in 32 (read(2): 88 against 46)."""
COPIERS = 4  # copy threads at most, and no more than this process's CPUs
# this process's copy threads: (the pid they were made in, them)
_pool: tuple[int, concurrent.futures.ThreadPoolExecutor | None] = (-1, None)


def _copiers() -> concurrent.futures.ThreadPoolExecutor | None:
    """This process's copy threads, made on first use (again in a forked child); None on
    one CPU."""
    global _pool
    if _pool[0] != os.getpid():
        cpus = min(COPIERS, len(os.sched_getaffinity(0)))
        executor = (
            concurrent.futures.ThreadPoolExecutor(cpus, thread_name_prefix="kt-copy")
            if cpus > 1
            else None
        )
        _pool = (os.getpid(), executor)
    return _pool[1]


def _split(view: memoryview) -> Iterator[tuple[int, memoryview]]:
    """`view` in `COPY_PIECE` pieces, each with its offset."""
    for at in range(0, view.nbytes, COPY_PIECE):
        yield at, view[at : at + COPY_PIECE]


def _run(fn: Callable[[_Job], None], jobs: list[_Job], total: int) -> None:
    """`fn` of every job: on the copy threads when `total` bytes is worth it, else here.
    Returns once every job has ended, with `jobs` emptied: a pool thread may hold its
    work a moment after it is done, and views in it would keep their mapping open.

    Raises:
        Exception: the first job's error.
    """
    pool = _copiers() if total >= PARALLEL_FROM else None
    if pool is None:
        for job in jobs:
            fn(job)
        return
    try:
        futures = [pool.submit(lambda i: fn(jobs[i]), i) for i in range(len(jobs))]
        concurrent.futures.wait(futures)
    finally:
        jobs.clear()
    for future in futures:
        future.result()


@contextlib.contextmanager
def unread(name: str) -> Iterator[bool]:
    """Whether no process reads the file now (True: none can start to until the block
    ends, so its owner may write a new value's header into it)."""
    try:
        fd = _open(name, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # drops the lock


_VALUE_HEADER = struct.Struct("<8s32sQQ")  # magic, placement id, size, where it starts
_VALUE_MAGIC = b"ktvalue2"
VALUE_OFFSET = 64  # where a data store value starts in its file, at the earliest
VALUE_SLACK = 4096
"""Room after the header for the putter to start the value later (`value_start`)."""


def name_value(buffer: mmap.mmap, fid: str, size: int, start: int = VALUE_OFFSET) -> None:
    """Write the header of a data store file: it holds `size` bytes placed as `fid` (an
    id new each time a value is placed in a file), from byte `start`."""
    _VALUE_HEADER.pack_into(buffer, 0, _VALUE_MAGIC, fid.encode(), size, start)


def value_start(source_address: int, position: int) -> int:
    """Where in its file a value starts so that the byte at `position` of it lands at the
    same offset within a page as `source_address`, whence it is copied. A large copy
    between addresses a few dozen bytes apart within their pages is 2.7x slower with
    glibc's memcpy on some CPUs (AMD EPYC here: 0.35 against 0.13 s per GiB)."""
    return VALUE_OFFSET + (source_address - position - VALUE_OFFSET) % VALUE_SLACK


def address(view: memoryview) -> int | None:
    """Where a buffer's bytes are in this process's memory; None when numpy, which tells
    it, is not loaded (a value with arrays loaded it)."""
    np = sys.modules.get("numpy")
    return None if np is None else int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def value_view(buffer: mmap.mmap, fid: str, size: int) -> memoryview:
    """The bytes placed as `fid` in a mapped data store file.

    Raises:
        FileNotFoundError: the file holds another value now (it was dropped and reused).
    """
    magic, held, length, start = _VALUE_HEADER.unpack_from(buffer, 0)
    if magic != _VALUE_MAGIC or held != fid.encode() or length != size:
        raise FileNotFoundError(f"the file no longer holds value {fid[:8]}")
    return memoryview(buffer)[start : start + size]


def unlink(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))


def free_bytes() -> int:
    """What /dev/shm can still take."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class _Mapping(mmap.mmap):
    """A receiver's mapping; its finalizer releases the segment for reuse."""

    fd: int  # the open file it maps (`read_into` reads it)


def attach(name: str, offsets: list[int], lengths: list[int]) -> list[memoryview]:
    """The receiving side: views on a sender's segment (valid while any view lives).

    Raises:
        ValueError: the name is not a kt segment.
        OSError: the segment is gone (its sender exited).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a kt shared-memory segment: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        mapping = _Mapping(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    weakref.finalize(mapping, os.close, fd)
    _CLAIMED.pack_into(mapping, 0, 1)
    view = memoryview(mapping)
    return [view[o : o + n] for o, n in zip(offsets, lengths, strict=True)]


_ALL_SEGMENTS: list[list[Segment]] = []  # every arena's segments, for release_all


def release_all() -> None:
    """Unlink every segment this process made: for exits that skip finalizers."""
    for segments in _ALL_SEGMENTS:
        _unlink_all(segments)


def _unlink_all(segments: list[Segment]) -> None:
    for seg in segments:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, seg.name))


def sweep_dead() -> None:
    """Remove segments left by kt processes that died without cleaning up."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        m = _NAME.fullmatch(name)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
