"""Shared fixtures: a private KT_HOME per test process, and local pools shared per module.

Pools are real: supervisor processes on loopback addresses, real actor processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

os.environ.setdefault("KT_BACKEND", "local")
os.environ["KT_HOME"] = tempfile.mkdtemp(prefix="kt-test-home-")


@pytest.fixture(scope="session", autouse=True)
def _teardown_driver() -> Iterator[None]:
    yield
    import kt

    kt.shutdown()
    shutil.rmtree(os.environ["KT_HOME"], ignore_errors=True)  # pod records and logs


@pytest.fixture(scope="module")
def pool() -> object:
    """A one-pod local pool with room for many actors."""
    import kt

    return kt.Compute(cpus=16, replicas=1, backend="local")
