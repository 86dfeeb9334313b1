"""Which files of a project are synced, and how a version is named (no pods, no sockets).

Behaviours covered:
- the root is found upward from a file (.git, pyproject.toml, setup.py), or not at all;
- .gitignore files apply below their own directory, a root .ktignore and kt's defaults
  (.git, __pycache__, virtual environments) apply everywhere, symlinks are never followed;
- the version depends on content only: same files, same version; one byte, a new one;
  a file's hash is not computed again while its size and mtime stay, unless its mtime
  was too recent to trust (a same-size edit within one timestamp tick);
- a project over the limits is refused naming its largest files and .ktignore;
- the pod's store refuses paths that leave the tree and blobs whose bytes do not match
  their hash, and builds a version's tree from hardlinks only once every blob is there;
- a file of a tree written to (it is a hardlink to its blob) is never served to another
  pod, and the next offer sets that tree aside and asks for the blob again;
- a sync cut off midway leaves the previous tree as it was and no half tree, keeps the
  blobs that arrived, and the next offer asks only for the rest.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

import kt
from kt.core import sync
from kt.core.errors import SyncError
from kt.supervisor.store import Store, SyncRefused


def _project(root: pathlib.Path) -> pathlib.Path:
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0" * 10)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "site.py").write_text("")
    (root / "data").mkdir()
    (root / "data" / ".gitignore").write_text("*.bin\n")
    (root / "data" / "keep.txt").write_text("keep")
    (root / "data" / "big.bin").write_bytes(b"x" * 100)
    (root / "top.bin").write_bytes(b"not ignored: data/.gitignore applies below data/")
    (root / ".ktignore").write_text("secrets/\n")
    (root / "secrets").mkdir()
    (root / "secrets" / "key").write_text("k")
    os.symlink("/etc", root / "etc-link")
    return root


def _sync_all(store: Store, m: sync.Manifest, root: pathlib.Path) -> None:
    """What the driver does for a pod that has nothing: offer, every blob."""
    store.offer(m.encode())
    for rel, (_, digest) in m.files.items():
        store.put(digest, memoryview((root / rel).read_bytes()))


def test_the_root_is_found_upward(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    assert sync.find_root(root / "pkg" / "mod.py") == root.resolve()
    (root / "pkg" / "setup.py").write_text("")
    assert sync.find_root(root / "pkg" / "mod.py") == (root / "pkg").resolve()
    lone = tmp_path / "lone"
    lone.mkdir()
    assert sync.find_root(lone) in (None, *lone.resolve().parents)  # no marker of its own


def test_ignore_rules(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    files = set(sync.manifest(root).files)
    assert files == {
        ".ktignore",
        "data/.gitignore",
        "data/keep.txt",
        "pkg/__init__.py",
        "pkg/mod.py",
        "pyproject.toml",
        "top.bin",
    }


def test_the_version_is_the_content(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    first = sync.manifest(root)
    assert sync.manifest(root).version == first.version
    mod = root / "pkg" / "mod.py"
    mod.write_text("VALUE = 2\n")
    second = sync.manifest(root)
    assert second.version != first.version
    assert second.files["pkg/mod.py"][1] == hashlib.sha256(b"VALUE = 2\n").hexdigest()
    mod.write_text("VALUE = 1\n")
    assert sync.manifest(root).version == first.version


def test_a_hash_is_reused_while_size_and_mtime_stay(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    mod = root / "pkg" / "mod.py"
    past = mod.stat().st_mtime_ns - 10 * 10**9  # old enough to be trusted (not racy)
    os.utime(mod, ns=(past, past))
    sync.manifest(root)
    st = mod.stat()
    mod.write_text("VALUE = 9\n")  # same size
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: trusted
    assert sync.manifest(root).files["pkg/mod.py"][1] == hashlib.sha256(b"VALUE = 1\n").hexdigest()
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert sync.manifest(root).files["pkg/mod.py"][1] == hashlib.sha256(b"VALUE = 9\n").hexdigest()


def test_a_same_size_edit_right_after_a_manifest_is_seen(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    mod = root / "pkg" / "mod.py"
    first = sync.manifest(root)
    st = mod.stat()
    mod.write_text("VALUE = 7\n")  # same size, and (on a coarse clock) the same mtime
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sync.manifest(root).version != first.version


def test_a_project_over_the_limits_is_refused_naming_the_largest(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _project(tmp_path / "p")
    (root / "data" / "huge.csv").write_bytes(b"1" * 5000)
    monkeypatch.setattr(kt.config, "sync_max_bytes", 4096)
    with pytest.raises(SyncError, match=r"data/huge.csv.*\.ktignore.*sync_max_bytes"):
        sync.manifest(root)
    monkeypatch.setattr(kt.config, "sync_max_bytes", 10**9)  # the user raised it
    assert "data/huge.csv" in sync.manifest(root).files
    monkeypatch.setattr(kt.config, "sync_max_files", 3)
    with pytest.raises(SyncError, match="8 files"):
        sync.manifest(root)
    monkeypatch.setattr(sync, "MAX_FILE", 4096)  # one file over what one frame carries
    with pytest.raises(SyncError, match=r"data/huge.csv .* may have at most"):
        sync.manifest(root)


def test_the_store_checks_what_it_is_given(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    m = sync.manifest(root)
    store = Store(str(tmp_path / "store"))
    missing = store.offer(m.encode())
    assert sorted(missing) == sorted(m.blobs())
    with pytest.raises(SyncRefused, match="does not match"):
        store.put(missing[0], memoryview(b"forged"))
    with pytest.raises(SyncRefused, match="never arrived"):
        store.commit(m.version)
    assert not os.path.exists(store.tree(m.version))  # nothing half-built
    for rel, (_, digest) in m.files.items():
        store.put(digest, memoryview((root / rel).read_bytes()))
    tree = store.commit(m.version)
    assert (pathlib.Path(tree) / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
    assert os.stat(pathlib.Path(tree) / "pkg" / "mod.py").st_nlink >= 2  # a hardlink
    assert store.offer(m.encode()) == []  # has it: nothing to send
    evil = m.encode().replace(b'"pkg/mod.py"', b'"../../escape.py"')
    with pytest.raises(SyncRefused, match="leaves the tree"):
        store.offer(evil)


def test_a_sync_cut_off_midway_keeps_the_old_tree_and_resumes(tmp_path: pathlib.Path) -> None:
    root = _project(tmp_path / "p")
    store = Store(str(tmp_path / "store"))
    old = sync.manifest(root)
    _sync_all(store, old, root)
    old_tree = pathlib.Path(store.commit(old.version))
    (root / "pkg" / "mod.py").write_text("VALUE = 2\n")
    (root / "pkg" / "more.py").write_text("MORE = 1\n")
    new = sync.manifest(root)
    missing = store.offer(new.encode())
    assert len(missing) == 2
    by_digest = {d: rel for rel, (_, d) in new.files.items()}
    store.put(missing[0], memoryview((root / by_digest[missing[0]]).read_bytes()))
    # ... and here the connection is lost: no more blobs, no commit
    assert store.versions() == [old.version]  # no half-built tree of the new version
    assert (old_tree / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
    assert store.offer(new.encode()) == missing[1:]  # the next sync sends only the rest
    store.put(missing[1], memoryview((root / by_digest[missing[1]]).read_bytes()))
    assert (pathlib.Path(store.commit(new.version)) / "pkg" / "more.py").exists()


def test_a_tree_file_written_to_is_not_served_and_its_version_is_built_again(
    tmp_path: pathlib.Path,
) -> None:
    root = _project(tmp_path / "p")
    store = Store(str(tmp_path / "store"))
    m = sync.manifest(root)
    _sync_all(store, m, root)
    tree = pathlib.Path(store.commit(m.version))
    written = tree / "pkg" / "mod.py"
    os.chmod(written, 0o644)  # as root in a container could, whatever the mode
    written.write_text("VALUE = 666\n")  # through the hardlink: the blob itself
    digest = m.files["pkg/mod.py"][1]
    with pytest.raises(SyncRefused, match="written to"):
        store.read(digest)  # never passed on to another pod
    assert store.offer(m.encode()) == [digest]  # the tree is set aside, the blob missing
    store.put(digest, memoryview((root / "pkg" / "mod.py").read_bytes()))
    rebuilt = pathlib.Path(store.commit(m.version))
    assert (rebuilt / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
    assert store.versions() == [m.version]
