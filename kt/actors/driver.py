"""The one driver runtime of a process: its event-loop thread and its pools.

`get_driver()` makes it on first use. In a driver it owns pools and tears down the
non-detached ones at exit; inside an actor process the same object serves handles that
were passed in (it then owns no pools).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import threading
import uuid
from typing import Any

from kt.actors.scheduler import Pool, Request
from kt.core import protocol
from kt.core.compute import Compute
from kt.core.config import config
from kt.core.errors import KtError
from kt.core.protocol import FrameKind
from kt.core.provider import get_provider, resolve_backend
from kt.core.ref import Ref
from kt.core.runtime import Runtime
from kt.core.serialization import Parts, parts_size

logger = logging.getLogger(__name__)


class Driver:
    """Pools and actor creation for this process, on top of one `Runtime`."""

    def __init__(self) -> None:
        in_worker = os.environ.get("KT_IN_WORKER") == "1"
        self.runtime = Runtime(
            caller=f"{'actor' if in_worker else 'driver'}-{os.getpid()}",
            stream_logs=config.stream_logs and not in_worker,
        )
        self.session = secrets.token_hex(3)
        self.pools: dict[str, Pool] = {}
        self._pool_lock = asyncio.Lock()
        atexit.register(self.shutdown)

    def pool_name(self, compute: Compute) -> str:
        if compute.name:
            return compute.name
        return f"{compute.pool_name()}-{self.session}"

    async def pool_for(self, compute: Compute, *, detached: bool = False) -> Pool:
        name = self.pool_name(compute)
        async with self._pool_lock:
            pool = self.pools.get(name)
            if pool is None:
                provider = get_provider(resolve_backend(compute.backend))
                token = await provider.read_token(name) or secrets.token_urlsafe(32)
                pool = Pool(compute, provider, name=name, token=token, detached=detached)
                self.pools[name] = pool
        await pool.ensure_min()
        return pool

    async def create_actor(
        self,
        handle: Any,
        compute: Compute,
        request: Request,
        header: dict[str, Any],
        parts: Parts,
        *,
        timeout: float,
        detached: bool = False,
    ) -> None:
        """Place the actor, send CREATE_ACTOR, and bind the handle to the pod."""
        try:
            pool = await self.pool_for(compute, detached=detached)
            slot = await pool.place(handle._actor_id, request, timeout=timeout)
        except BaseException as exc:
            handle._fail(exc)
            return
        runtime = self.runtime
        req_id = runtime.new_id()
        hdr = protocol.orjson_dumps(header)
        prefix = protocol.encode_prefix(FrameKind.CREATE_ACTOR, req_id, hdr, parts_size(parts))
        created: Ref[None] = Ref(f"{header.get('cls')}.__init__")
        runtime.submit(slot.pod.address, pool.token, req_id, [prefix, hdr, *parts], created)
        handle._created = created
        handle._pool = pool
        handle._request = request
        handle._bind(slot.pod.address, pool.token)

    def new_actor_id(self) -> str:
        return uuid.uuid4().hex[:16]

    def shutdown(self) -> None:
        """Delete the pods of every pool this driver made that is not detached."""
        pools = [p for p in self.pools.values() if not p.detached]
        self.pools.clear()
        if pools and self.runtime.loop.is_running():
            try:
                self.runtime.run(_teardown_all(pools), timeout=10)
            except Exception as exc:  # exiting anyway: the pods' watchdogs finish the job
                logger.warning("teardown at exit was incomplete: %s", exc)
        self.runtime.stop()


async def _teardown_all(pools: list[Pool]) -> None:
    await asyncio.gather(*(p.teardown() for p in pools), return_exceptions=True)


_driver: Driver | None = None
_driver_lock = threading.Lock()


def get_driver() -> Driver:
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = Driver()
    return _driver


def get_runtime() -> Runtime:
    return get_driver().runtime


def shutdown() -> None:
    """Tear down this driver's pools now (also runs at exit)."""
    global _driver
    with _driver_lock:
        driver, _driver = _driver, None
    if driver is not None:
        driver.shutdown()


def require_driver_thread(what: str) -> None:
    if _driver is not None and _driver.runtime.on_loop_thread:
        raise KtError(f"{what} cannot block kt's event-loop thread; await it instead")
