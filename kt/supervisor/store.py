"""Code sync, the pod's side: a content-addressed blob store and one tree per version.

Who calls it: `kt.supervisor.server.Supervisor`, for SYNC frames. Blobs live at
`blobs/<first two hex>/<sha256>`, read-only, written once (to a temporary name, checked
against their hash, then renamed). A version's tree is built from hardlinks to its blobs
in a temporary directory and renamed into `trees/<version>` when complete, so a tree is
either whole or absent, and a worker started on version N keeps importing N while N+1
arrives. Nothing here is unpickled: manifests are orjson, blobs raw bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import orjson

_HEX = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9a-f]{32}")


class SyncRefused(Exception):
    """A manifest or blob that must not be stored (bad hash, a path out of the tree)."""


@dataclass
class Pending:
    files: dict[str, tuple[int, str]]
    paths: list[str]


@dataclass
class Store:
    root: str
    bytes_received: int = 0  # from the driver
    bytes_from_pods: int = 0  # pulled from other pods of the pool
    blobs_received: int = 0
    pending: dict[str, Pending] = field(default_factory=dict)
    written: dict[str, tuple[int, int]] = field(default_factory=dict)
    """sha256 -> (size, mtime_ns) of each blob as written: trees are hardlinks to blobs,
    so a process that writes a file of its tree writes the blob; such a blob no longer
    counts as held."""

    def __post_init__(self) -> None:
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "trees"), exist_ok=True)

    def tree(self, version: str) -> str:
        return os.path.join(self.root, "trees", version)

    def _blob(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", digest[:2], digest)

    def versions(self) -> list[str]:
        return sorted(v for v in os.listdir(os.path.join(self.root, "trees")) if v[0] != ".")

    def offer(self, data: bytes) -> list[str]:
        """A manifest: the hashes this pod lacks for it ([] when the tree exists or is
        built now from blobs it has).

        Raises:
            SyncRefused: not a manifest, or a path that leaves the tree.
        """
        try:
            listing = orjson.loads(data)
            version = str(listing["version"])
            files = {str(k): (int(v[0]), str(v[1])) for k, v in listing["files"].items()}
            paths = [str(p) for p in listing.get("paths", [])]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise SyncRefused(f"not a manifest: {exc}") from None
        if not _VERSION.fullmatch(version):
            raise SyncRefused(f"bad version {version!r}")
        for rel, (_, digest) in files.items():
            _check_path(rel)
            if not _HEX.fullmatch(digest):
                raise SyncRefused(f"bad hash for {rel!r}")
        for rel in paths:
            if rel != ".":
                _check_path(rel)
        if os.path.isdir(self.tree(version)):
            if all(self._intact(d) for _, d in files.values()):
                return []
            self._set_aside(version)  # a file of it was written to: build it again
        self.pending[version] = Pending(files, paths)
        missing = sorted({d for _, d in files.values() if not self._intact(d)})
        if not missing:
            self.commit(version)
        return missing

    def _intact(self, digest: str) -> bool:
        """The blob is here as it was written (an unknown one is trusted by its name)."""
        try:
            st = os.stat(self._blob(digest))
        except FileNotFoundError:
            return False
        known = self.written.get(digest)
        if known is None or known == (st.st_size, st.st_mtime_ns):
            return True
        os.unlink(self._blob(digest))  # trees holding it keep their (changed) inode
        del self.written[digest]
        return False

    def _set_aside(self, version: str) -> None:
        """Rename a damaged tree out of the way: processes running in it keep it."""
        aside = tempfile.mkdtemp(dir=os.path.join(self.root, "trees"), prefix=".damaged-")
        os.rename(self.tree(version), os.path.join(aside, version))

    def read(self, digest: str) -> bytes:
        """A blob this pod holds, for a pod that pulls it.

        Raises:
            SyncRefused: not a hash, or not here.
        """
        if not _HEX.fullmatch(digest):
            raise SyncRefused(f"bad hash {digest!r}")
        if not self._intact(digest):
            raise SyncRefused(f"blob {digest[:12]} is not on this pod (or was written to)")
        try:
            with open(self._blob(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SyncRefused(f"blob {digest[:12]} is not on this pod") from None

    def put(self, digest: str, data: memoryview, *, from_peer: bool = False) -> None:
        """One blob; its bytes must hash to its name."""
        if not _HEX.fullmatch(digest):
            raise SyncRefused(f"bad hash {digest!r}")
        if from_peer:
            self.bytes_from_pods += len(data)
        else:
            self.bytes_received += len(data)
        self.blobs_received += 1
        if hashlib.sha256(data).hexdigest() != digest:
            raise SyncRefused(f"blob {digest[:12]} does not match its hash")
        path = self._blob(digest)
        if self._intact(digest):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".in-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
        st = os.stat(path)
        self.written[digest] = (st.st_size, st.st_mtime_ns)

    def commit(self, version: str) -> str:
        """Build the tree of a pending version from its blobs; returns its path.

        Raises:
            SyncRefused: unknown version, or a blob it needs is missing.
        """
        final = self.tree(version)
        if os.path.isdir(final):
            self.pending.pop(version, None)
            return final
        pending = self.pending.get(version)
        if pending is None:
            raise SyncRefused(f"no manifest was offered for version {version}")
        building = tempfile.mkdtemp(dir=os.path.join(self.root, "trees"), prefix=".build-")
        try:
            for rel, (_, digest) in pending.files.items():
                blob = self._blob(digest)
                if not os.path.exists(blob):
                    raise SyncRefused(f"{rel} (blob {digest[:12]}) never arrived")
                target = os.path.join(building, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(blob, target)
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        del self.pending[version]
        return final


def _check_path(rel: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise SyncRefused(f"path {rel!r} leaves the tree")
