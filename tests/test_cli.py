"""The `kt` command against a live local pool: list, status, logs, teardown, version."""

from __future__ import annotations

import os
import subprocess
import sys

import kt
from kt.actors.driver import get_driver


class Talker:
    def talk(self, text: str) -> str:
        print(text)
        return text


def _kt(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "kt.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_cli_sees_and_tears_down_a_pool() -> None:
    compute = kt.Compute(cpus=1, replicas=1, backend="local")
    t = kt.cls(Talker).options(compute=compute).remote()
    assert t.talk("written to the pod log") == "written to the pod log"
    pool = get_driver().pool_name(compute, False)
    assert pool in _kt("list")
    status = _kt("status", pool)
    assert "Talker" in status and "alive" in status
    assert "written to the pod log" in _kt("logs", pool)
    assert "deleted 1 pod(s)" in _kt("teardown", pool)
    assert pool not in _kt("list")
    assert _kt("version").startswith("kt ")
