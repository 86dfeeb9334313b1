"""Running real torchrun from the tests: a free port and a clean environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launcher_env(**extra: str) -> dict[str, str]:
    """The test's environment minus OMP_NUM_THREADS, so torchrun applies its own default."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(extra)
    return env


def torchrun(
    args: Sequence[str], env: dict[str, str], timeout: float = 120
) -> subprocess.Popen[str]:
    """Start `python -m torch.distributed.run ARGS` (the torchrun console script's module)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for a torchrun; its stdout, or an AssertionError with its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{err[-3000:]}"
    return out
