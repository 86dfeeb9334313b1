"""kt's output thread (`kt.core.output`): writes in order; a stuck write holds up its
caller for WAIT_S at most, and later callers not at all; what did not fit is counted.
"""

from __future__ import annotations

import threading
import time

import pytest

from kt.core import output


def test_writes_keep_their_order_and_a_stuck_one_holds_up_no_caller(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(output, "MAX_PENDING", 5)
    monkeypatch.setattr(output, "WAIT_S", 1.0)  # a loaded machine may be slow to switch
    out = output.Output()
    written: list[int] = []
    out.show(lambda: written.append(0))
    assert written == [0]  # out before `show` returns: the usual case
    unblock = threading.Event()
    began = time.monotonic()
    out.show(lambda: (unblock.wait(30), written.append(1)))  # a reader gone away
    assert time.monotonic() - began < 5  # WAIT_S, and some slack
    began = time.monotonic()
    for i in range(2, 12):  # 5 queue, 5 are dropped, none waits
        out.show(lambda i=i: written.append(i), lines=3)
    assert time.monotonic() - began < 2
    assert written == [0]
    unblock.set()
    deadline = time.monotonic() + 10
    while len(written) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the count is said after the write that was stuck
    assert written == [0, 1, 2, 3, 4, 5, 6]
    assert "[kt] 15 lines of output dropped" in capsys.readouterr().err
    out.show(lambda: written.append(99))  # moving again: waited for, as before
    assert written[-1] == 99


def test_a_write_that_raises_is_lost_and_the_thread_goes_on() -> None:
    out = output.Output()
    written: list[str] = []

    def broken() -> None:
        raise OSError("the stream is closed")

    out.show(broken)
    out.show(lambda: written.append("after"))
    assert written == ["after"]
