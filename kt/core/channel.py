"""Moving frames over a stream socket: TCP between pods, Unix sockets inside a pod.

`FrameChannel` is an asyncio BufferedProtocol. Theory of operation:

- Receiving. Small frames are parsed out of one reusable ring buffer and handed to
  `on_frame` as memoryviews that are valid only during the callback (handlers copy what
  they keep). A frame larger than `BIG_FRAME` gets a buffer of its own that the socket
  reads into directly, so a 100 MiB payload is copied once, by the kernel, and out-of-band
  buffers unpickled from it stay valid for as long as the value lives. That buffer is an
  anonymous mmap, not a bytearray: its pages exist only once bytes arrive, so a length
  prefix announcing 2 GiB costs nothing until 2 GiB come (a bytearray is zeroed at once:
  the loop stalled and the RSS grew by the announced size). The ring is one too: it
  starts again at offset 0 whenever it is drained, so a quiet link (most of a
  supervisor's worker links) holds a page or two of it, not 256 KiB.
- Limits. A length prefix shorter than the fixed prefix, or longer than `max_frame`, is
  refused before anything is allocated for it (`refuse`: the owner's `on_refuse` may say
  why in a last frame, then the connection closes and nothing more is read); so is a
  header length past the frame's end, and a frame its handler fails on. A supervisor's
  caller gets PRE_AUTH_MAX_FRAME until its HELLO is accepted, `kt.config.max_frame_bytes`
  after.
- Sending. `send` appends to an outbox and schedules one flush per loop iteration, so a
  burst of calls or results leaves in one `write` (one syscall), not one per frame.
  A caller's thread may instead `write_now` a small frame itself when nothing is queued
  (a blocking call then costs no wake-up of the loop thread); `write_lock` orders the
  two writers.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from kt.core.config import config
from kt.core.protocol import LENGTH_SIZE, PREFIX, PREFIX_SIZE

logger = logging.getLogger(__name__)

BIG_FRAME = 64 * 1024
PRE_AUTH_MAX_FRAME = 16 * 1024  # a HELLO is a few hundred bytes
RING_SIZE = 256 * 1024
_LEN = struct.Struct("<I")


def _anonymous(size: int) -> mmap.mmap:
    """Zeroed memory whose pages exist once written; private, so a fork copies on write
    as it would a bytearray (a shared mapping would let a child write the parent's)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


FrameCallback = Callable[[int, int, int, int, memoryview, memoryview, memoryview], None]
"""on_frame(kind, flags, route, req_id, header, payload, frame)."""


class FrameChannel(asyncio.BufferedProtocol):
    """One framed stream; the owner supplies what to do with frames and with loss."""

    def __init__(
        self,
        on_frame: FrameCallback,
        on_lost: Callable[[Exception | None], None] | None = None,
        on_made: Callable[[FrameChannel], None] | None = None,
        *,
        max_frame: int | None = None,
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.on_made = on_made
        self.max_frame = config.max_frame_bytes if max_frame is None else max_frame
        """The longest frame accepted (length prefix included)."""
        self.on_refuse = on_refuse
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._ring = _anonymous(RING_SIZE)  # pages appear as used: see `_enter_big`
        self._ring_view = memoryview(self._ring)
        self._start = 0
        self._end = 0
        self._big: mmap.mmap | None = None
        self._big_view: memoryview | None = None
        self._big_pos = 0
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self.write_lock: threading.Lock | None = None
        """Set when another thread may write directly (see `write_now`)."""

    # -- connection lifecycle -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            self._fd = sock.fileno()
        if self.on_made is not None:
            self.on_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._big = self._big_view = None  # a frame cut short: its pages go now, not at gc
        if self.on_lost is not None:
            self.on_lost(exc)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- receiving --------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big_view is not None:
            return self._big_view[self._big_pos :]
        if self._end == RING_SIZE:
            self._compact()
        return self._ring_view[self._end :]

    def _compact(self) -> None:
        n = self._end - self._start
        if n and self._start:
            self._ring[0:n] = self._ring[self._start : self._end]
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return  # refused: what else arrives is not read
        if self._big_view is not None:
            self._big_pos += nbytes
            if self._big_pos == len(self._big_view):
                view = self._big_view
                self._big = self._big_view = None
                self._big_pos = 0
                self._deliver(view)
            return
        self._end += nbytes
        view = self._ring_view
        start, end = self._start, self._end
        while end - start >= LENGTH_SIZE:
            total = LENGTH_SIZE + _LEN.unpack_from(view, start)[0]
            if total < PREFIX_SIZE or total > self.max_frame:
                self.refuse(f"a frame of {total} bytes (at most {self.max_frame} here)")
                return
            if end - start < total:
                if total > BIG_FRAME:
                    self._enter_big(total, start, end)
                    return
                break
            self._deliver(view[start : start + total])
            if self.closed:
                return
            start += total
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start
            if RING_SIZE - end < BIG_FRAME:
                self._compact()

    def _enter_big(self, total: int, start: int, end: int) -> None:
        self._big = _anonymous(total)
        self._big_view = memoryview(self._big)
        have = end - start
        self._big_view[:have] = self._ring_view[start:end]
        self._big_pos = have
        self._start = self._end = 0

    def _deliver(self, frame: memoryview) -> None:
        _, kind, flags, hlen, route, req_id = PREFIX.unpack_from(frame, 0)
        if PREFIX_SIZE + hlen > len(frame):
            self.refuse(f"a header of {hlen} bytes in a frame of {len(frame)}")
            return
        header = frame[PREFIX_SIZE : PREFIX_SIZE + hlen]
        payload = frame[PREFIX_SIZE + hlen :]
        try:
            self.on_frame(kind, flags, route, req_id, header, payload, frame)
        except Exception as exc:
            logger.exception("frame handler failed (kind %d); closing the link", kind)
            self.refuse(f"a frame of kind {kind} could not be handled: {type(exc).__name__}")

    def refuse(self, why: str) -> None:
        """Stop reading: `on_refuse` may send a last frame saying why, then the connection
        closes once that is written."""
        if self.closed:
            return
        logger.warning("closing a connection: %s", why)
        if self.on_refuse is not None:
            self.on_refuse(why)
        self.close()
        self.closed = True  # nothing more is read or sent
        self._start = self._end = 0
        self._big = self._big_view = None

    # -- sending ----------------------------------------------------------------------
    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.flush)

    def send_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            self.send(part)

    @property
    def writing(self) -> bool:
        """Bytes are still queued here or in the transport: the memoryviews among them
        still reference their buffers (the event loop does not copy them)."""
        if self._out:
            return True
        transport = self.transport
        try:
            return transport is not None and transport.get_write_buffer_size() > 0
        except RuntimeError:  # a closed transport holds nothing
            return False

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self.transport is None or self.closed:
            return
        if self.write_lock is None:
            self._write_out()
        else:
            with self.write_lock:
                self._write_out()

    def _write_out(self) -> None:
        assert self.transport is not None
        out, self._out = self._out, []
        if self._out_size < BIG_FRAME or len(out) == 1:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        else:
            for part in out:
                self.transport.write(part)
        self._out_size = 0

    def write_now(self, data: bytes) -> bool:
        """From another thread, under `write_lock`: write `data` straight to the socket.

        Only when nothing else is waiting to be written, so order is kept; a partial
        write leaves the rest to the loop. False (nothing written): use `send`.
        """
        transport = self.transport
        if (
            self._fd < 0
            or self.closed
            or transport is None
            or self._out
            or transport.get_write_buffer_size()
        ):
            return False
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return False
        if n < len(data):
            self._out.append(data[n:])
            self._out_size += len(data) - n
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.flush)
        return True
