"""Code sync on real pods: the project's files reach the pod over the call channel, and
each actor imports the version it was created with.

Behaviours covered (one pool of its own, bytes counted at the supervisor's /status):
- a project of 2,000 files syncs once: the supervisor receives exactly its bytes
  (ignored files stay behind), and the actor imports the module from the pod's tree of
  that version, with that tree as its working directory, not from the driver's copy;
- after a one-line edit, only that file's bytes cross the wire; an actor created after
  the edit runs the new code, the one created before still the old; the supervisor and
  the zygote are the same processes;
- a module the pod cannot import names itself and the synced root;
- sync_dir=False sends nothing;
- a file edited between the manifest and its upload is synced again with a new
  manifest (the actor runs the edited code); one that differs from its manifest fails
  naming the file.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import uuid

import pytest

import kt
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(120)
PROBE = """
import os

VALUE = {value}


class Probe:
    def value(self) -> int:
        return VALUE

    def where(self) -> tuple[str, str]:
        return __file__, os.getcwd()
"""


@pytest.fixture
def project(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> tuple[pathlib.Path, str]:
    root = tmp_path / "project"
    name = f"proj_{uuid.uuid4().hex[:8]}"
    (root / name).mkdir(parents=True)
    (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
    (root / name / "__init__.py").write_text("")
    (root / name / "probe.py").write_text(PROBE.format(value=1))
    (root / "data").mkdir()
    for i in range(1996):
        (root / "data" / f"{i:04d}.txt").write_text(f"row {i}\n" * 3)
    (root / ".gitignore").write_text("scratch/\n")
    (root / "scratch").mkdir()
    (root / "scratch" / "big.log").write_bytes(b"x" * 100_000)  # ignored: never sent
    monkeypatch.syspath_prepend(str(root))
    yield root, name
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def test_only_changed_bytes_travel_and_each_actor_keeps_its_version(
    project: tuple[pathlib.Path, str], backend: str
) -> None:
    root, name = project
    probe = importlib.import_module(f"{name}.probe")
    compute = kt.Compute(cpus=1, replicas=1, name=f"sync-{uuid.uuid4().hex[:6]}", backend=backend)
    make = kt.cls(probe.Probe).options(compute=compute, cpus=0, sync_dir=str(root))
    files = [p for p in root.rglob("*") if p.is_file() and "scratch" not in p.parts]
    assert len(files) == 2000
    try:
        old = make.remote()
        assert old.value() == 1
        module_file, cwd = old.where()
        assert not module_file.startswith(str(root)), module_file
        tree = pathlib.Path(cwd)
        assert module_file == str(tree / name / "probe.py") and "trees" in tree.parts
        first = pod_status(old)
        assert first["sync"]["bytes_received"] == sum(p.stat().st_size for p in files)
        assert len(first["sync"]["versions"]) == 1

        edited = root / name / "probe.py"
        edited.write_text(PROBE.format(value=2))
        new = make.remote()
        assert new.value() == 2
        assert old.value() == 1  # created before the edit: keeps its version
        second = pod_status(new)
        sent = second["sync"]["bytes_received"] - first["sync"]["bytes_received"]
        assert sent == edited.stat().st_size  # the one file, nothing else
        assert len(second["sync"]["versions"]) == 2
        assert (second["pid"], second["zygote_pid"]) == (first["pid"], first["zygote_pid"])
        assert pathlib.Path(new.where()[1]) != tree

        third = make.remote()  # nothing changed: nothing sent
        assert third.value() == 2
        assert pod_status(third)["sync"]["bytes_received"] == second["sync"]["bytes_received"]
    finally:
        for handle in ("old", "new", "third"):
            if handle in locals():
                kt.kill(locals()[handle])


def test_a_module_the_pod_cannot_import_names_the_synced_root(
    project: tuple[pathlib.Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = project
    extra = f"extra_{uuid.uuid4().hex[:8]}"  # on the driver's path, excluded by .ktignore
    (root / "lib").mkdir()
    (root / "lib" / "kept.py").write_text("")
    (root / "lib" / f"{extra}.py").write_text(
        "class Far:\n    def hi(self) -> str:\n        return 'hi'\n"
    )
    (root / ".ktignore").write_text("lib/extra_*.py\n")
    monkeypatch.syspath_prepend(str(root / "lib"))
    far = importlib.import_module(extra)
    compute = kt.Compute(cpus=1, replicas=1, name=f"sync-{uuid.uuid4().hex[:6]}", backend="local")
    handle = kt.cls(far.Far).options(compute=compute, cpus=0, sync_dir=str(root)).remote()
    try:
        with pytest.raises(kt.ActorDiedError) as info:
            handle.hi()
        message = str(info.value)
        assert f"module {extra!r} cannot be imported" in message, message
        assert "synced project at" in message and ".ktignore" in message
    finally:
        kt.kill(handle)
        del sys.modules[extra]


def test_sync_dir_false_sends_nothing(project: tuple[pathlib.Path, str]) -> None:
    root, name = project
    probe = importlib.import_module(f"{name}.probe")
    compute = kt.Compute(cpus=1, replicas=1, name=f"sync-{uuid.uuid4().hex[:6]}", backend="local")
    handle = kt.cls(probe.Probe).options(compute=compute, cpus=0, sync_dir=False).remote()
    try:
        assert handle.value() == 1
        module_file, _ = handle.where()
        assert module_file == str(root / name / "probe.py")  # the driver's own copy
        synced = pod_status(handle)["sync"]
        assert synced == {
            "bytes_received": 0,
            "bytes_from_pods": 0,
            "blobs_received": 0,
            "versions": [],
        }
    finally:
        kt.kill(handle)


def test_a_file_changed_before_its_upload_is_synced_again(
    project: tuple[pathlib.Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    root, name = project
    probe = importlib.import_module(f"{name}.probe")
    compute = kt.Compute(cpus=1, replicas=1, name=f"sync-{uuid.uuid4().hex[:6]}", backend="local")
    handle = kt.cls(probe.Probe).options(compute=compute, cpus=0, sync_dir=str(root)).remote()
    # The manifest was made in .remote(); the pod is still starting, so the upload that
    # follows reads the file after this edit: its hash no longer matches the manifest.
    (root / name / "probe.py").write_text(PROBE.format(value=3))
    try:
        assert handle.value() == 3  # synced again with a new manifest, and created on it
        assert "syncing again with a new manifest" in caplog.text
    finally:
        kt.kill(handle)


def test_a_file_that_keeps_changing_fails_naming_it(tmp_path: pathlib.Path) -> None:
    from kt.actors.push import _batches
    from kt.core import sync

    (tmp_path / "pyproject.toml").write_text("")
    made = sync.manifest(tmp_path)
    (tmp_path / "pyproject.toml").write_text("changed")
    wanted = [(digest, rel) for rel, (_, digest) in made.files.items()]
    with pytest.raises(kt.SyncError, match=r"pyproject\.toml changed after the manifest"):
        list(_batches(str(tmp_path), wanted))
