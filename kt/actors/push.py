"""Code sync, the driver's shell: bring one version of the project to one pod.

Who calls it: `kt.actors.driver.Driver`, after an actor is placed and before its CREATE
is sent (an actor of version N needs N's tree on its pod). Requests over the pod's
authenticated call channel (`kt.core.protocol`, SYNC): offer the manifest; the pod
answers with the blobs it lacks; those come from the driver ("blobs" frames of at most
`BATCH` bytes) or, once another pod of this driver holds the version, from that pod
("pull": the pod fetches them itself, `kt.supervisor.fetch`); then commit. An unchanged
project costs one round trip. One bring per (pod, version): later actors wait for it.

Many pods at once form a tree: the driver sends a version's blobs to one pod at a time
(the first that asks, or the next when no pod has it yet), and each pod that has the
version serves at most `config.sync_fanout` pulls at once; a pod that finishes becomes
a source in turn. So the driver sends each blob about once however many pods there are
(again only when a push or every pull of it fails).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from kt.core import protocol
from kt.core.config import config
from kt.core.errors import SyncError, SyncFileChanged, SyncSourceFailed, seconds
from kt.core.protocol import FrameKind
from kt.core.ref import Ref
from kt.core.runtime import Address, Runtime
from kt.core.sync import Manifest

BATCH = 16 * 2**20  # bytes of blobs per frame
TIMEOUT_S = 600.0
logger = logging.getLogger(__name__)


@dataclass
class _Spread:
    """Where one version is, among this driver's pods."""

    done: dict[str, Address] = field(default_factory=dict)  # pods that hold it
    serving: dict[str, int] = field(default_factory=dict)  # pulls each is serving now
    pushing: int = 0  # pushes from the driver under way
    stale: SyncFileChanged | None = None  # a file changed since this version's manifest
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def source(self, fanout: int) -> str | None:
        """The pod with the fewest pulls under way, if one has room."""
        free = [p for p in self.done if self.serving.get(p, 0) < fanout]
        return min(free, key=lambda p: self.serving.get(p, 0)) if free else None


class Pusher:
    """The versions each pod has (or is receiving) from this driver."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pushes: dict[tuple[str, str], asyncio.Future[None]] = {}
        # per version and pool token: a pod may pull only from pods of its own pool (a pod
        # of another pool refuses its token)
        self._spreads: dict[tuple[str, str], _Spread] = {}
        self.bytes_sent = 0  # blob bytes this driver sent

    def forget(self, pod: str) -> None:
        """The pod is gone: no longer a source, and a pod of that name starts afresh."""
        for key in [k for k in self._pushes if k[0] == pod]:
            del self._pushes[key]
        for spread in self._spreads.values():
            spread.done.pop(pod, None)

    async def ensure(self, pod: str, address: Address, token: str, manifest: Manifest) -> None:
        """Return once `pod` (at `address`) has `manifest`'s tree.

        Raises:
            SyncError: a file changed since the manifest was made, or the pod refused.
            PodLostError: the pod went away meanwhile.
        """
        key = (pod, manifest.version)
        push = self._pushes.get(key)
        if push is None or (push.done() and push.exception() is not None):
            push = asyncio.get_running_loop().create_task(
                self._bring(pod, address, token, manifest)
            )
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
        try:
            return await asyncio.wait_for(ref, TIMEOUT_S)
        except TimeoutError:
            raise SyncError(
                f"the pod at {address[0]}:{address[1]} did not finish the code sync's "
                f"{header.get('op')!r} within {seconds(TIMEOUT_S)}; it keeps its previous "
                "version"
            ) from None

    async def _bring(self, pod: str, address: Address, token: str, manifest: Manifest) -> None:
        version = manifest.version
        spread = self._spreads.setdefault((version, token), _Spread())
        if spread.stale is not None and spread.pushing == 0:
            spread.stale = None  # asked again (its files may be as listed again): try once more
        offer = {"op": "offer", "v": version}
        missing: list[str] = await self._request(address, token, offer, [manifest.encode()])
        pushed = brought = False
        try:
            if missing:
                pushed = await self._fill(spread, address, token, manifest, missing)
                await self._request(address, token, {"op": "commit", "v": version}, [])
            brought = True
        finally:
            async with spread.changed:
                if pushed:  # until now: no second push while this pod is not a source yet
                    spread.pushing -= 1
                if brought:
                    spread.done[pod] = address
                spread.changed.notify_all()

    async def _fill(
        self, spread: _Spread, address: Address, token: str, m: Manifest, missing: list[str]
    ) -> bool:
        """The missing blobs from a pod that has them, else from the driver (True: the
        driver sent them, and `spread.pushing` counts this push until the caller says)."""
        fanout = max(1, config.sync_fanout)
        while True:
            async with spread.changed:
                await spread.changed.wait_for(  # the driver sends only while no pod has it
                    lambda: (
                        spread.source(fanout) is not None
                        or (not spread.done and (spread.pushing == 0 or spread.stale is not None))
                    )
                )
                source = spread.source(fanout)
                if source is None and spread.stale is not None:
                    raise spread.stale  # this version can never be sent: a newer one will
                if source is None:
                    spread.pushing += 1
                else:
                    spread.serving[source] = spread.serving.get(source, 0) + 1
            if source is None:
                try:
                    await self._push(address, token, m, missing)
                except BaseException as exc:
                    async with spread.changed:
                        spread.pushing -= 1
                        if isinstance(exc, SyncFileChanged):
                            spread.stale = exc
                        spread.changed.notify_all()
                    raise
                return True
            host, port = spread.done[source]
            sizes = m.blobs()
            wanted = orjson.dumps([[d, sizes[d]] for d in missing])
            pull = {"op": "pull", "v": m.version, "from": f"{host}:{port}"}
            try:
                await self._request(address, token, pull, [wanted])
                return False
            except SyncSourceFailed as exc:  # that source is gone or broken: not again
                logger.warning("pulling version %s from %s failed: %s", m.version, source, exc)
                async with spread.changed:
                    spread.done.pop(source, None)
            finally:
                async with spread.changed:
                    spread.serving[source] -= 1
                    spread.changed.notify_all()

    async def _push(self, address: Address, token: str, m: Manifest, missing: list[str]) -> None:
        by_digest = {digest: rel for rel, (_, digest) in m.files.items()}
        for batch in _batches(m.root, [(d, by_digest[d]) for d in missing]):
            payload = protocol.join_blobs(batch)
            self.bytes_sent += sum(len(data) for _, data in batch)
            await self._request(address, token, {"op": "blobs", "v": m.version}, payload)


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
            raise SyncFileChanged(
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
