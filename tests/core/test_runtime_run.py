"""`Runtime.run`, how a caller's thread waits for a coroutine on kt's loop: one not done
in time is stopped and named in a GetTimeoutError; a coroutine's own TimeoutError is its
own; a result comes back."""

from __future__ import annotations

import asyncio

import pytest

from kt.core.errors import GetTimeoutError
from kt.core.runtime import Runtime


def test_a_coroutine_not_done_in_time_is_stopped_and_named() -> None:
    runtime = Runtime(stream_logs=False)
    stopped = asyncio.Event()

    async def lookup() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()

    async def own_timeout() -> None:
        raise TimeoutError("its own")

    async def answer() -> int:
        return 7

    try:
        with pytest.raises(GetTimeoutError, match=r"kt: .*lookup did not finish within 0.2 s"):
            runtime.run(lookup(), timeout=0.2)
        assert runtime.run(asyncio.wait_for(stopped.wait(), 5), timeout=10) is True
        with pytest.raises(TimeoutError, match="its own") as info:
            runtime.run(own_timeout(), timeout=5)
        assert not isinstance(info.value, GetTimeoutError)
        assert runtime.run(answer(), timeout=5) == 7
    finally:
        runtime.stop()
