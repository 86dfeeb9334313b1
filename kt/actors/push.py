"""Code sync, the driver's shell: bring one version of the project to one pod.

Who calls it: `kt.actors.driver.Driver`, after an actor is placed and before its CREATE
is sent (an actor of version N needs N's tree on its pod). Three requests over the
pod's authenticated call channel (`kt.core.protocol`, SYNC): offer the manifest, send
the blobs the pod says it lacks (in frames of at most `BATCH` bytes), commit. An
unchanged project costs one round trip: the pod has the tree and answers nothing
missing. One push per (pod, version) at a time: later actors of the same version wait
for the first one's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import orjson

from kt.core import protocol
from kt.core.errors import SyncError
from kt.core.protocol import FrameKind
from kt.core.ref import Ref
from kt.core.runtime import Address, Runtime
from kt.core.sync import Manifest

BATCH = 16 * 2**20  # bytes of blobs per frame
TIMEOUT_S = 600.0


class Pusher:
    """The versions each pod has (or is receiving) from this driver."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pushes: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.bytes_sent = 0

    async def ensure(self, pod: str, address: Address, token: str, manifest: Manifest) -> None:
        """Return once `pod` (at `address`) has `manifest`'s tree.

        Raises:
            SyncError: a file changed since the manifest was made, or the pod refused.
            PodLostError: the pod went away meanwhile.
        """
        key = (pod, manifest.version)
        push = self._pushes.get(key)
        if push is None or (push.done() and push.exception() is not None):
            push = asyncio.get_running_loop().create_task(self._push(address, token, manifest))
            self._pushes[key] = push
        await asyncio.shield(push)

    async def _request(
        self, address: Address, token: str, header: dict[str, Any], payload: list[bytes]
    ) -> Any:
        req_id = self.runtime.new_id()
        hdr = orjson.dumps(header)
        size = sum(len(p) for p in payload)
        prefix = protocol.encode_prefix(FrameKind.SYNC, req_id, hdr, size)
        ref: Ref[Any] = Ref(f"sync {header.get('op')}")
        self.runtime.submit(address, token, req_id, [prefix, hdr, *payload], ref)
        self.bytes_sent += size
        return await asyncio.wait_for(ref, TIMEOUT_S)

    async def _push(self, address: Address, token: str, manifest: Manifest) -> None:
        version = manifest.version
        missing: list[str] = await self._request(
            address, token, {"op": "offer", "v": version}, [manifest.encode()]
        )
        if not missing:
            return
        by_digest = {digest: rel for rel, (_, digest) in manifest.files.items()}
        for batch in _batches(manifest.root, [(d, by_digest[d]) for d in missing]):
            index = orjson.dumps([[digest, len(data)] for digest, data in batch])
            payload = [protocol.BLOB_INDEX.pack(len(index)), index, *(data for _, data in batch)]
            await self._request(address, token, {"op": "blobs", "v": version}, payload)
        await self._request(address, token, {"op": "commit", "v": version}, [])


def _batches(root: str, wanted: list[tuple[str, str]]) -> Iterator[list[tuple[str, bytes]]]:
    """The wanted blobs read from the project, checked against the manifest's hashes."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for digest, rel in wanted:
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SyncError(f"{path} could not be read for the sync: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise SyncError(
                f"{path} changed after the manifest was made; the pods keep the version "
                "they had. Deploy again once it is written, or list it in .ktignore"
            )
        batch.append((digest, data))
        size += len(data)
        if size >= BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
