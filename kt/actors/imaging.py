"""Image steps, the driver's shell: a pod runs its pool's kt.Image steps before actors.

Who calls it: `kt.actors.driver.Driver`, after an actor is placed (and its code synced)
and before its CREATE. One IMAGE request per (pod, image): the pod runs the steps it has
not run (`kt.supervisor.image`), streaming their output to this terminal, and answers
once they are done, or with the `ImageError` of the step that failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from kt.core import protocol
from kt.core.errors import ImageError, seconds
from kt.core.protocol import FrameKind
from kt.core.ref import Ref
from kt.core.runtime import Address, Runtime

TIMEOUT_S = 3600.0  # a pip step may build wheels


class Imager:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._ready: dict[tuple[str, str], asyncio.Future[Any]] = {}

    def forget(self, pod: str) -> None:
        for key in [k for k in self._ready if k[0] == pod]:
            del self._ready[key]

    async def ensure(
        self, pod: str, address: Address, token: str, key: str, steps: list[dict[str, Any]]
    ) -> None:
        """Return once `pod` has run the steps ending in `key`.

        Raises:
            ImageError: a step failed on the pod.
        """
        done = self._ready.get((pod, key))
        if done is None or (done.done() and done.exception() is not None):
            done = asyncio.get_running_loop().create_task(self._prepare(pod, address, token, steps))
            self._ready[(pod, key)] = done
        await asyncio.shield(done)

    async def _prepare(
        self, pod: str, address: Address, token: str, steps: list[dict[str, Any]]
    ) -> None:
        req_id = self.runtime.new_id()
        body = orjson.dumps(steps)
        hdr = b""
        prefix = protocol.encode_prefix(FrameKind.IMAGE, req_id, hdr, len(body))
        ref: Ref[None] = Ref("image steps")
        self.runtime.submit(address, token, req_id, [prefix, body], ref)
        try:
            await asyncio.wait_for(ref, TIMEOUT_S)
        except TimeoutError:
            which = f"1 to {len(steps)} (not finished within {seconds(TIMEOUT_S)})"
            raise ImageError(which, pod, None, "") from None
