"""Code sync to many pods: the pods pass the blobs on, the driver sends each about once.

Behaviours covered (8 real pods, a service with one replica on each):
- every replica imports the module from its own pod's tree of the version;
- the driver sends the project's bytes exactly once; the other pods pull them from pods
  that already hold the version (counted at each supervisor: bytes from the driver plus
  bytes from pods is the project, for every pod);
- with sync_fanout=1 the pods form a chain, and the same holds.
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
from kt.actors.driver import get_driver
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(180)
PODS = 8
CODE = "import os\n\n\nclass Where:\n    def where(self) -> str:\n        return __file__\n"


@pytest.fixture
def project(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    root = tmp_path / "project"
    name = f"many_{uuid.uuid4().hex[:8]}"
    (root / "blobs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
    (root / f"{name}.py").write_text(CODE)
    for i in range(40):
        (root / "blobs" / f"{i}.bin").write_bytes(bytes([i]) * 25_000)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("KT_WARM_WORKERS", "0")  # 8 pods on 2 cores: no idle workers
    yield root, importlib.import_module(name)
    del sys.modules[name]


@pytest.mark.parametrize("fanout", [4, 1])
def test_pods_pass_the_blobs_on(project: Any, fanout: int, monkeypatch: pytest.MonkeyPatch) -> None:
    root, module = project
    monkeypatch.setattr(kt.config, "sync_fanout", fanout)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    pusher = get_driver().pusher
    sent_before = pusher.bytes_sent
    compute = kt.Compute(
        cpus=1, replicas=PODS, name=f"many-{uuid.uuid4().hex[:6]}", backend="local"
    )
    svc = kt.cls(module.Where).to(compute, sync_dir=str(root))
    try:
        handles = svc._handles
        assert len(handles) == PODS
        wheres = [h.where.remote().result(timeout=120) for h in handles]
        assert all("/sync/trees/" in w and not w.startswith(str(root)) for w in wheres), wheres
        assert len({h.wait_placed(60) for h in handles}) == PODS  # one replica per pod
        assert pusher.bytes_sent - sent_before == total  # each blob once, to one pod
        stats = [pod_status(h)["sync"] for h in handles]
        assert all(s["bytes_received"] + s["bytes_from_pods"] == total for s in stats), stats
        assert sum(s["bytes_from_pods"] for s in stats) == (PODS - 1) * total
    finally:
        svc.teardown()


def test_a_deleted_pod_is_no_longer_a_source() -> None:
    from kt.actors.push import Pusher, _Spread
    from kt.core.runtime import shared_runtime

    pusher = Pusher(shared_runtime(caller="test", stream_logs=False))
    spread = _Spread(done={"gone": ("127.0.0.9", 7170), "kept": ("127.0.0.8", 7170)})
    pusher._spreads["v1"] = spread
    pusher._pushes[("gone", "v1")] = pusher._pushes[("kept", "v1")] = None  # type: ignore[assignment]
    pusher.forget("gone")
    assert list(spread.done) == ["kept"] and list(pusher._pushes) == [("kept", "v1")]
    assert spread.source(4) == "kept"
