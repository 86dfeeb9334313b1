"""Files in the data store without pods: a tree packed, pickled as the store does, and
written back; paths that would leave dest refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kt.actors.files import FileTree, is_path, pack, unpack
from kt.core import serialization
from kt.core.errors import ConfigError


def test_a_tree_survives_the_store_and_big_files_travel_out_of_band(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "empty-dir").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(200_000))
    (src / "small").write_text("x")
    tree = pack(src)
    assert [rel for rel, _, _ in tree.files] == ["big", "small"] and tree.size == 200_001
    parts = serialization.dumps(tree)
    assert len(parts) == 3 and memoryview(parts[2]).nbytes == 200_000  # the big file's bytes
    back = serialization.loads(b"".join(bytes(memoryview(p)) for p in parts))
    written = unpack(back, tmp_path / "dest", "k")
    assert (Path(written) / "big").read_bytes() == (src / "big").read_bytes()
    assert (Path(written) / "small").read_text() == "x"
    assert is_path(str(src)) and is_path(src) and not is_path("no/such/path")


def test_paths_that_leave_dest_are_refused(tmp_path: Path) -> None:
    for bad in ("../escape", "/etc/passwd", "a//b", ""):
        tree = FileTree("t", True, ((bad, 0o644, b"data"),))
        with pytest.raises(ConfigError, match="leaves dest"):
            unpack(tree, tmp_path / "dest", "k")
    assert not (tmp_path / "escape").exists()


def test_an_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        pack(tmp_path / "missing")
