"""How an actor process leaves: never through interpreter finalization.

Behaviours covered:
- an actor holding a live gloo process group (never destroyed, as a rank that forgets
  `destroy_process_group`) whose event loop is ended by a `SystemExit` from user code
  exits with that code, and no atexit handler runs: the process left by `os._exit`, so
  gloo's threads cannot meet a finalizing interpreter (the "terminate called without an
  active exception" abort);
- the exit is reported to callers as ActorDiedError with the code, and the process is
  gone (psutil).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time

import psutil
import pytest

import kt

pytest.importorskip("torch")


class Leaver:
    def __init__(self, marker: str) -> None:
        import atexit
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        atexit.register(lambda: pathlib.Path(marker).write_text("finalized"))

    def pid(self) -> int:
        return os.getpid()

    async def leave(self) -> None:
        import sys

        asyncio.get_running_loop().call_later(0.2, sys.exit, 3)  # ends the worker's loop


@pytest.mark.timeout(60)
def test_an_actor_ended_by_system_exit_skips_interpreter_finalization(
    pool: kt.Compute, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "atexit-ran"
    actor = kt.cls(Leaver).options(compute=pool, cpus=0).remote(str(marker))
    pid = actor.pid()
    actor.leave()
    with pytest.raises(kt.ActorDiedError) as info:
        for _ in range(100):
            actor.pid()
            time.sleep(0.1)
    assert info.value.exit_code == 3
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not marker.exists(), "the actor process ran interpreter finalization"
