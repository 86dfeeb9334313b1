"""A failure in handling one frame stays with that frame's call (issue 11).

Behaviours covered:
- a result whose class exists only on the pod fails its own call with
  SerializationError (naming the module it could not import) within a second, while a
  call to another actor on the same pod, made at the same time, succeeds, and the link
  stays up for later calls to both;
- such an item ends its stream with the same error;
- such a value behind a lent Ref fails that Ref only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

import kt


def _pod_only() -> Any:
    """An object of a class that only this process can import."""
    where = tempfile.mkdtemp(prefix="kt-pod-only-")
    with open(os.path.join(where, "pod_only_mod.py"), "w") as f:
        f.write("class Secret:\n    pass\n")
    sys.path.insert(0, where)
    import pod_only_mod  # type: ignore[import-not-found]

    return pod_only_mod.Secret()


class Maker:
    def secret(self) -> Any:
        return _pod_only()

    def items(self) -> Iterator[Any]:
        yield 1
        yield _pod_only()
        yield 3

    def slow_secret(self) -> Any:
        time.sleep(0.5)
        return _pod_only()

    def lend_secret(self, other: kt.ActorHandle) -> kt.Ref[Any]:
        return other.slow_secret.remote()

    def ok(self) -> int:
        return 1


@pytest.mark.timeout(90)
def test_an_undecodable_result_fails_its_call_only(pool: kt.Compute) -> None:
    maker = kt.cls(Maker).options(compute=pool, cpus=0).remote()
    other = kt.cls(Maker).options(compute=pool, cpus=0).remote()
    assert other.ok() == 1
    start = time.monotonic()
    bad, good = maker.secret.remote(), other.ok.remote()
    with pytest.raises(kt.SerializationError, match="'pod_only_mod' is not importable"):
        bad.result(timeout=10)
    assert time.monotonic() - start < 1.0
    assert good.result(timeout=10) == 1
    assert maker.ok() == 1 and other.ok() == 1  # the link to the pod is still up


@pytest.mark.timeout(90)
def test_an_undecodable_item_ends_its_stream(pool: kt.Compute) -> None:
    maker = kt.cls(Maker).options(compute=pool, cpus=0).remote()
    got: list[Any] = []
    with pytest.raises(kt.SerializationError, match="pod_only_mod"):
        for item in maker.items.remote():
            got.append(item)
    assert got == [1]
    assert maker.ok() == 1


@pytest.mark.timeout(90)
def test_an_undecodable_lent_value_fails_that_ref_only(pool: kt.Compute) -> None:
    maker = kt.cls(Maker).options(compute=pool, cpus=0).remote()
    other = kt.cls(Maker).options(compute=pool, cpus=0).remote()
    lent = maker.lend_secret(other)
    with pytest.raises(kt.SerializationError, match="pod_only_mod"):
        kt.get(lent, timeout=30)
    assert maker.ok() == 1 and other.ok() == 1
