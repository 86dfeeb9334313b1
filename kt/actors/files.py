"""Files and directories in the data store: `kt.put(key, "data/train/")`, `kt.get(key, dest=)`.

Who calls it: `kt.actors.datastore`. A path becomes a `FileTree`: each regular file's
relative posix path, mode and bytes; the bytes of a file are its mapping (pickle 5 takes
them out of band, so they are copied once, into the value's buffer, and never pickled).
Getting writes them under `dest`, each file to a temporary name first and then renamed,
so a reader of `dest` never sees half a file. Symbolic links to files are followed, links
to directories are not (as `cp -r`); paths leaving `dest` are refused.
"""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt.core.errors import ConfigError


@dataclass(frozen=True)
class FileTree:
    """What `kt.put(key, path)` stores: a file, or a directory's files."""

    name: str  # the basename of what was put
    is_dir: bool
    files: tuple[tuple[str, int, Any], ...]  # (relative posix path, mode, bytes-like)

    @property
    def size(self) -> int:
        return sum(len(memoryview(data)) for _, _, data in self.files)


def is_path(value: object) -> bool:
    """`kt.put` stores files for a path object, or for a str naming an existing path."""
    return isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.exists(value))


def pack(value: str | os.PathLike[str]) -> FileTree:
    """The files at `value`, mapped (not read) for the put.

    Raises:
        ConfigError: no such file or directory, or one that cannot be read.
    """
    root = Path(value)
    try:
        if root.is_file():
            return FileTree(root.name, False, (_file(root, root.name),))
        if not root.is_dir():
            raise ConfigError(f"kt.put: no such file or directory: {str(value)!r}")
        files = []
        for directory, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = Path(directory, name)
                if path.is_file():  # a socket, a fifo, a dangling link: not data
                    files.append(_file(path, path.relative_to(root).as_posix()))
        return FileTree(root.resolve().name, True, tuple(files))
    except OSError as exc:
        raise ConfigError(f"kt.put: cannot read {str(value)!r}: {exc}") from None


def _file(path: Path, rel: str) -> tuple[str, int, Any]:
    mode = path.stat().st_mode & 0o777
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return rel, mode, b""
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return rel, mode, pickle.PickleBuffer(data)


def unpack(tree: FileTree, dest: str | os.PathLike[str], key: str) -> str:
    """Write `tree` at `dest` (a directory's files under it; a file at it, or inside it
    when it is a directory); returns the path written.

    Raises:
        ConfigError: a path in the tree leaves `dest`, or `dest` cannot be written.
    """
    target = Path(dest)
    if not tree.is_dir and target.is_dir():
        target = target / tree.name
    try:
        for rel, mode, data in tree.files:
            path = target / rel if tree.is_dir else target
            if tree.is_dir and not _inside(rel):
                raise ConfigError(f"{key!r} holds a path that leaves dest: {rel!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        if tree.is_dir:
            target.mkdir(parents=True, exist_ok=True)  # an empty directory too
    except OSError as exc:
        raise ConfigError(f"kt.get({key!r}, dest={str(dest)!r}): {exc}") from None
    return str(target)


def _inside(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts
