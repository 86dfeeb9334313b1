"""Code sync, the driver's side: which files of the user's project go to the pods.

Who calls it: `kt.actors` when it deploys (`.to()`, `.remote()` of an actor), and the
supervisor's store (`kt.supervisor.store`) for the manifest's layout. Pure file-system
reads, no sockets.

Theory of operation: the project root is found upward from the caller's file (a
directory holding `.git`, `pyproject.toml` or `setup.py`), or given (`sync_dir=`). Every
file under it that `.gitignore` files (each applying below its own directory, as git
reads them), a root `.ktignore` and kt's own defaults (`.git`, `__pycache__`, virtual
environments) do not exclude is listed in a `Manifest`: relative path -> (size, sha256).
A file's hash is computed again only when its size or mtime changed since the last
manifest of this process, and the walk itself is skipped when no directory it visited
and no file it listed changed (a stat of each, no ignore matching): an actor start on
an unchanged project costs about a stat per file. The version is the hash of the whole
listing, so an unchanged project has the same version and a pod that has it needs
nothing more.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pathspec

from kt.core.config import config
from kt.core.errors import ConfigError, SyncError

MARKERS = (".git", "pyproject.toml", "setup.py")
DEFAULT_IGNORES = (
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".venv*/",
    "venv/",
    ".tox/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    "node_modules/",
    "*.egg-info/",
)


@dataclass(frozen=True)
class Manifest:
    """One version of a project: what a pod must hold to run it."""

    root: str
    files: dict[str, tuple[int, str]]  # relative posix path -> (size, sha256 hex)
    version: str
    paths: tuple[str, ...] = ()
    """The driver's sys.path entries inside the root, relative, in order ("." for the
    root itself): a worker of this version puts the tree's equivalents first."""
    local_paths: tuple[str, ...] = field(default=(), compare=False)
    """The same entries as absolute paths on the driver: a worker drops them."""

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())

    def blobs(self) -> dict[str, int]:
        """sha256 -> size, each distinct content once."""
        return {digest: size for size, digest in self.files.values()}

    def encode(self) -> bytes:
        """The manifest as the pod receives it (orjson; never pickled)."""
        listing = {"version": self.version, "files": self.files, "paths": self.paths}
        return orjson.dumps(listing)

    def header(self) -> dict[str, object]:
        """What a CREATE_ACTOR carries for a worker of this version."""
        return {"v": self.version, "paths": list(self.paths), "drop": list(self.local_paths)}


def find_root(start: str | os.PathLike[str]) -> Path | None:
    """The nearest directory at or above `start` that holds a project marker."""
    here = Path(start).resolve()
    if here.is_file():
        here = here.parent
    for candidate in (here, *here.parents):
        if any((candidate / marker).exists() for marker in MARKERS):
            return candidate
    return None


def _not_user_code() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # kt itself
    dirs.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _caller_file() -> str | None:
    """The innermost frame of user code: the user's file that deployed (not kt, the
    standard library or an installed package). None when there is none (a thread kt
    started, an interactive session)."""
    skip = _not_user_code()
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<") and not os.path.realpath(name).startswith(skip):
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return None


def resolve_root(sync_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """The directory to sync: `sync_dir` itself, else the project of the caller's file
    (None: nothing to sync; `False`: sync turned off)."""
    if sync_dir is False:
        return None
    if sync_dir not in (None, True):
        path = Path(sync_dir).resolve()  # type: ignore[arg-type]
        if not path.is_dir():
            raise ConfigError(f"sync_dir={str(sync_dir)!r} is not a directory")
        return path
    caller = _caller_file()
    return find_root(caller) if caller else None


MAX_FILE = 2**31  # bytes in one synced file: a blob travels in one frame
RACY_NS = 1_000_000_000
"""A file or directory whose mtime is this close to when it was read may change again
within the same timestamp tick (git's "racy clean" problem): it is not trusted."""
_hashes: dict[str, tuple[int, int, str]] = {}  # absolute path -> (size, mtime_ns, sha256)


def _digest(path: str, size: int, mtime_ns: int) -> str:
    known = _hashes.get(path)
    if known is not None and known[0] == size and known[1] == mtime_ns:
        return known[2]
    hashed_at = time.time_ns()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if mtime_ns < hashed_at - RACY_NS:
        _hashes[path] = (size, mtime_ns, digest)
    return digest


def _spec(lines: list[str]) -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines)


def walk(root: Path, dirs: dict[str, int] | None = None) -> list[tuple[str, os.stat_result]]:
    """Every file to sync under `root`: (relative posix path, its stat), sorted; `dirs`
    gets the mtime of each directory visited."""
    rules: list[tuple[str, pathspec.PathSpec]] = [("", _spec(list(DEFAULT_IGNORES)))]
    ktignore = root / ".ktignore"
    if ktignore.is_file():
        rules.append(("", _spec(ktignore.read_text().splitlines())))
    found: list[tuple[str, os.stat_result]] = []

    def ignored(rel: str, is_dir: bool) -> bool:
        probe = rel + "/" if is_dir else rel
        for base, spec in rules:
            if base and not probe.startswith(base):
                continue
            if spec.match_file(probe[len(base) :]):
                return True
        return False

    def visit(directory: Path, rel_dir: str) -> None:
        if dirs is not None:
            dirs[rel_dir] = directory.stat().st_mtime_ns
        gitignore = directory / ".gitignore"
        if gitignore.is_file():
            rules.append((rel_dir, _spec(gitignore.read_text().splitlines())))
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = rel_dir + entry.name
                if entry.is_symlink():
                    continue  # a link may point out of the project: never follow
                if entry.is_dir():
                    if not ignored(rel, True):
                        visit(Path(entry.path), rel + "/")
                elif entry.is_file() and not ignored(rel, False):
                    found.append((rel, entry.stat()))

    visit(root, "")
    return found


def _check_limits(root: Path, listing: list[tuple[str, os.stat_result]]) -> None:
    max_files, max_bytes = config.sync_max_files, config.sync_max_bytes
    total = sum(st.st_size for _, st in listing)
    huge = [(rel, st.st_size) for rel, st in listing if st.st_size > MAX_FILE]
    if huge:  # a blob travels in one frame, whose length is a u32
        shown = ", ".join(f"{rel} ({size / 2**30:.1f} GiB)" for rel, size in huge[:5])
        raise SyncError(
            f"{shown} under {root}: a synced file may have at most {MAX_FILE / 2**30:g} GiB. "
            "List it in .ktignore and move it with kt.put/kt.get or a volume"
        )
    if len(listing) <= max_files and total <= max_bytes:
        return
    largest = sorted(listing, key=lambda item: -item[1].st_size)[:5]
    shown = ", ".join(f"{rel} ({st.st_size / 2**20:.0f} MiB)" for rel, st in largest)
    dirs: dict[str, int] = {}
    for rel, _ in listing:
        top = rel.split("/", 1)[0]
        dirs[top] = dirs.get(top, 0) + 1
    crowded = ", ".join(
        f"{d} ({n} files)" for d, n in sorted(dirs.items(), key=lambda x: -x[1])[:3]
    )
    raise SyncError(
        f"the project at {root} is too large to sync: {len(listing)} files, "
        f"{total / 2**30:.1f} GiB (limits: {max_files} files, {max_bytes / 2**30:g} GiB). "
        f"Largest files: {shown}; most files under: {crowded}. List what the pods do not "
        "need in a .ktignore at the project root (gitignore syntax), pass sync_dir= a "
        "smaller directory, sync_dir=False, or raise kt.config.sync_max_files / "
        "sync_max_bytes."
    )


def _sys_paths(root: Path, files: dict[str, tuple[int, str]]) -> tuple[tuple[str, ...], ...]:
    """The driver's sys.path entries that the synced tree replaces: those inside the root
    with synced files under them (a virtual environment inside the project is ignored, so
    its site-packages stays the pod's own)."""
    dirs = {"."}
    for rel in files:
        parts = rel.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    rel_paths: list[str] = []
    local: list[str] = []
    for entry in sys.path:
        absolute = Path(entry or os.getcwd()).resolve()
        if absolute != root and root not in absolute.parents:
            continue
        rel = absolute.relative_to(root).as_posix()
        if rel in dirs and rel not in rel_paths:
            rel_paths.append(rel)
            local.append(entry)
    return tuple(rel_paths), tuple(local)


@dataclass
class _Walked:
    manifest: Manifest
    dirs: dict[str, int]
    stats: dict[str, tuple[int, int]]

    def unchanged(self, root: Path) -> bool:
        base = str(root)
        try:
            for rel, mtime in self.dirs.items():
                if os.stat(f"{base}/{rel}").st_mtime_ns != mtime:
                    return False
            for rel, (size, mtime) in self.stats.items():
                st = os.stat(f"{base}/{rel}")
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    return False
        except OSError:
            return False
        return True


_walked: dict[Path, _Walked] = {}


def manifest(root: Path) -> Manifest:
    """The project under `root` as it is now.

    Raises:
        SyncError: too many files or bytes, or a file kept changing while it was read.
    """
    known = _walked.get(root)
    if known is not None and known.unchanged(root):
        paths, local = _sys_paths(root, known.manifest.files)
        if (paths, local) == (known.manifest.paths, known.manifest.local_paths):
            return known.manifest
    for attempt in (1, 2):
        dirs: dict[str, int] = {}
        walked_at = time.time_ns()
        listing = walk(root, dirs)
        _check_limits(root, listing)
        files: dict[str, tuple[int, str]] = {}
        changed = None
        for rel, st in listing:
            path = str(root / rel)
            try:
                digest = _digest(path, st.st_size, st.st_mtime_ns)
                after = os.stat(path)
            except FileNotFoundError:
                changed = rel
                break
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                _hashes.pop(path, None)
                changed = rel
                break
            files[rel] = (st.st_size, digest)
        if changed is None:
            version = hashlib.sha256(orjson.dumps(files, option=orjson.OPT_SORT_KEYS))
            paths, local = _sys_paths(root, files)
            made = Manifest(str(root), files, version.hexdigest()[:32], paths, local)
            stats = {rel: (st.st_size, st.st_mtime_ns) for rel, st in listing}
            newest = max([*dirs.values(), *(m for _, m in stats.values())], default=0)
            if newest < walked_at - RACY_NS:  # else walk again next time
                _walked[root] = _Walked(made, dirs, stats)
            return made
        if attempt == 2:
            raise SyncError(
                f"{root / changed} changed or disappeared while it was being synced, twice; "
                "the pods keep the version they had. Sync again once it is written, or "
                "list it in .ktignore"
            )
    raise AssertionError("unreachable")
