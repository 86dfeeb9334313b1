"""Large arguments and results, through shared memory (same host) and over TCP (KT_SHM=0
in a second driver process): contents intact, an array kept by the actor is never
overwritten by later calls."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

import kt


class Keeper:
    def __init__(self) -> None:
        self.kept: list[np.ndarray] = []

    def keep(self, x: np.ndarray) -> int:
        self.kept.append(x)
        return int(x.sum())

    def sums(self) -> list[int]:
        return [int(k.sum()) for k in self.kept]

    def echo(self, x: np.ndarray) -> np.ndarray:
        return x


def test_large_arguments_and_results_round_trip(pool: kt.Compute) -> None:
    k = kt.cls(Keeper).options(compute=pool, cpus=0).remote()
    arrays = [np.full(3 * 2**20, i, dtype=np.uint8) for i in range(1, 5)]
    assert [k.keep(a) for a in arrays] == [int(a.sum()) for a in arrays]
    assert k.sums() == [int(a.sum()) for a in arrays]  # nothing was overwritten
    back = [k.echo(a) for a in arrays]
    assert all(np.array_equal(b, a) for a, b in zip(arrays, back, strict=True))
    kt.kill(k)


TCP_DRIVER = textwrap.dedent(
    """
    import numpy as np, kt
    class Echo:
        def echo(self, x):
            return x
    e = kt.cls(Echo).options(compute=kt.Compute(cpus=1, replicas=1, backend="local")).remote()
    a = np.arange(12 * 2**20, dtype=np.uint8)
    b = e.echo(a)
    print("equal", bool(np.array_equal(a, b)))
    """
)


def test_large_payloads_over_tcp_when_shm_is_off() -> None:
    env = dict(os.environ, KT_SHM="0")
    out = subprocess.run(
        [sys.executable, "-c", TCP_DRIVER], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "equal True" in out.stdout
