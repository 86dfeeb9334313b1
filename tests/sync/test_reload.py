"""Hot reload: a second `.to()` after an edit runs the new code on the same pods.

Behaviours covered (real pods; the project is a temporary directory synced with
sync_dir=):
- `.to()` again with nothing changed returns the same service: same actor process,
  nothing restarted;
- after a one-line edit, `.to()` makes the service again on the new version (a new
  actor process whose __init__ ran again), the old one is torn down, and the pod's
  supervisor and zygote are the same processes;
- the same for `kt.fn(f).to(...)` and for an SPMD group.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import kt
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(120)
CODE = """
import os

VALUE = {value}
INITS = []


def get_value() -> int:
    return VALUE


class Probe:
    def __init__(self) -> None:
        INITS.append(1)

    def value(self) -> int:
        return VALUE

    def pid(self) -> int:
        return os.getpid()

    def inits(self) -> int:
        return len(INITS)
"""


@pytest.fixture
def project(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[pathlib.Path, Any]]:
    root = tmp_path / "project"
    name = f"reload_{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
    (root / f"{name}.py").write_text(CODE.format(value=1))
    monkeypatch.syspath_prepend(str(root))
    yield root / f"{name}.py", importlib.import_module(name)
    del sys.modules[name]


def _compute(backend: str = "local") -> kt.Compute:
    return kt.Compute(cpus=2, replicas=1, name=f"reload-{uuid.uuid4().hex[:6]}", backend=backend)


def _pod_pids(handle: kt.ActorHandle[Any]) -> tuple[int, int]:
    status = pod_status(handle)
    return status["pid"], status["zygote_pid"]


def test_a_service_is_made_again_only_when_the_code_changed(
    project: tuple[pathlib.Path, Any], backend: str
) -> None:
    source, module = project
    compute = _compute(backend)
    root = str(source.parent)
    svc = kt.cls(module.Probe).to(compute, sync_dir=root)
    try:
        assert svc.value() == 1
        pid = svc.pid()
        pods = _pod_pids(svc._handles[0])
        assert kt.cls(module.Probe).to(compute, sync_dir=root) is svc  # nothing changed
        assert svc.pid() == pid and svc.inits() == 1

        source.write_text(CODE.format(value=2))
        new = kt.cls(module.Probe).to(compute, sync_dir=root)
        assert new is not svc
        assert new.value() == 2
        assert new.pid() != pid and new.inits() == 1  # a new process, __init__ ran again
        assert _pod_pids(new._handles[0]) == pods  # same supervisor, same zygote
        with pytest.raises(kt.ActorDiedError):
            svc.value()  # the old one was torn down
    finally:
        kt.cls(module.Probe).to(compute, sync_dir=root).teardown()


def test_a_function_and_a_group_are_made_again_on_the_new_code(
    project: tuple[pathlib.Path, Any],
) -> None:
    source, module = project
    root = str(source.parent)
    compute = _compute()
    group_compute = compute.distribute("spmd", workers=1, procs_per_worker=2)
    f = kt.fn(module.get_value).to(compute, sync_dir=root)
    group = kt.fn(module.get_value).to(group_compute, sync_dir=root)
    try:
        assert f() == 1 and group() == [1, 1]
        assert kt.fn(module.get_value).to(compute, sync_dir=root) is f
        assert kt.fn(module.get_value).to(group_compute, sync_dir=root) is group

        source.write_text(CODE.format(value=2))
        f2 = kt.fn(module.get_value).to(compute, sync_dir=root)
        group2 = kt.fn(module.get_value).to(group_compute, sync_dir=root)
        assert f2() == 2 and group2() == [2, 2]
        assert group.group_state is kt.distributed.GroupState.STOPPED
    finally:
        for deployed in ("f2", "group2"):
            if deployed in locals():
                locals()[deployed].teardown()
