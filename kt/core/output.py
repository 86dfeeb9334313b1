"""What kt prints on the driver's terminal (actors' logs, pool progress), written on a
thread of its own, in order.

kt's loop thread completes every Ref and keeps every link's heartbeat. A write to a
stdout or stderr that nobody reads (a pager paused on its first page, a terminal held
with Ctrl-S, a parent process that piped the output and does not read it) blocks until
the reader comes back; on the loop thread, it would stop every call of the driver with
it. So `show` hands each write to the output thread, and waits for it only briefly
(WAIT_S), so that in the usual case an actor's line is out before the call that printed
it returns. While a write is blocked, nothing waits: up to MAX_PENDING writes queue,
the ones after them are dropped, and how many lines they held is printed (stderr) once
the output moves again.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable

WAIT_S = 0.25  # the longest `show` waits for its write: past it, the output is stuck
MAX_PENDING = 10_000  # writes held while the output is stuck; later ones are dropped


class Output:
    """An ordered queue of writes and the daemon thread that does them."""

    def __init__(self) -> None:
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition()
        self._writing = False
        self._stuck = False  # a write outlasted WAIT_S and has not finished yet
        self._dropped = 0
        self._thread: threading.Thread | None = None

    def show(self, write: Callable[[], None], lines: int = 1) -> None:
        """Do `write` (of `lines` lines) on the output thread after the writes before it;
        wait for it up to WAIT_S, or not at all while the output is stuck."""
        with self._cond:
            if len(self._pending) >= MAX_PENDING:
                self._dropped += lines
                return
            self._pending.append(write)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kt-output", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            if not self._stuck and not self._cond.wait_for(self._idle, WAIT_S):
                self._stuck = True

    def _idle(self) -> bool:
        return not self._pending and not self._writing

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                write = self._pending.popleft()
                self._writing = True
            try:
                write()
            except Exception:  # a closed or broken stream: what it says is lost, kt goes on
                pass
            with self._cond:
                self._writing = False
                self._stuck = False
                dropped, self._dropped = self._dropped, 0
                self._cond.notify_all()
            if dropped:
                _say(f"[kt] {dropped} lines of output dropped: nothing read them for a while")


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:  # as above
        pass


_output = Output()


def show(write: Callable[[], None], lines: int = 1) -> None:
    """`Output.show` on this process's output thread."""
    _output.show(write, lines)
