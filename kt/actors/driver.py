"""The one driver runtime of a process: its event-loop thread, its pools, its actors.

`get_driver()` makes it on first use. In a driver it owns pools, places and restarts
the actors it created, and tears down the non-detached pools at exit; inside an actor
process the same object serves handles that were passed in (it then owns nothing).

Everything here runs on the runtime's loop thread except the public entry points,
which hop onto it with `runtime.spawn` / `runtime.run`.
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

from kt.actors import handle as handle_module
from kt.actors.handle import ActorHandle
from kt.actors.lifecycle import Actor, ActorSpec, ActorState, Decision, decide
from kt.actors.scheduler import PodSlot, Pool
from kt.core import protocol
from kt.core.compute import Compute
from kt.core.config import config
from kt.core.errors import ActorDiedError, KtError, PodLostError
from kt.core.methods import MethodKind
from kt.core.protocol import FrameKind
from kt.core.provider import PodState, Provider, get_provider, resolve_backend
from kt.core.ref import Ref
from kt.core.runtime import Address, Runtime, shared_runtime
from kt.core.serialization import parts_size

logger = logging.getLogger(__name__)


class Driver:
    """Pools and actors of this process, on top of one `Runtime`."""

    def __init__(self) -> None:
        in_worker = os.environ.get("KT_IN_WORKER") == "1"
        self.runtime = shared_runtime(
            caller=f"{'actor' if in_worker else 'driver'}-{os.getpid()}",
            stream_logs=config.stream_logs and not in_worker,
        )
        self.runtime.on_died = self._on_died
        self.runtime.on_link_lost = self._on_link_lost
        self.session = secrets.token_hex(3)
        self.pools: dict[str, Pool] = {}
        self.actors: dict[str, Actor] = {}
        self._pool_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        atexit.register(self.shutdown)

    # -- pools ---------------------------------------------------------------------------
    def pool_name(self, compute: Compute, detached: bool) -> str:
        base = compute.name or compute.pool_name()
        if detached:
            return f"{base}-detached"  # no session suffix: later drivers find it
        return base if compute.name else f"{base}-{self.session}"

    async def pool_for(self, compute: Compute, *, detached: bool = False) -> Pool:
        name = self.pool_name(compute, detached)
        async with self._pool_lock:
            pool = self.pools.get(name)
            if pool is None:
                provider = get_provider(resolve_backend(compute.backend))
                token = await provider.read_token(name) or secrets.token_urlsafe(32)
                idle = compute.idle_seconds or config.idle_timeout
                pool = Pool(
                    compute, provider, name=name, token=token, detached=detached, idle_timeout=idle
                )
                self.pools[name] = pool
                self._start(pool.reap_idle())
                self._start(self._watch(pool))
        await pool.ensure_min()
        return pool

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- actors --------------------------------------------------------------------------
    def new_actor_id(self) -> str:
        return uuid.uuid4().hex[:16]

    async def create_actor(self, spec: ActorSpec, handle: ActorHandle) -> None:
        actor = Actor(spec, handle)
        self.actors[spec.actor_id] = actor
        await self._place_and_create(actor)

    async def _place_and_create(self, actor: Actor) -> None:
        """Place the actor, send CREATE_ACTOR, and bind the handle to the pod."""
        spec = actor.spec
        try:
            pool = await self.pool_for(spec.compute, detached=spec.detached)
            slot = await pool.place(spec.actor_id, spec.request, timeout=spec.placement_timeout)
        except BaseException as exc:
            actor.move(ActorState.DEAD, f"placement failed: {exc}")
            actor.handle._fail(exc)
            return
        if actor.state is ActorState.DEAD:  # killed while it was being placed
            pool.release(spec.actor_id, spec.request)
            return
        actor.pool, actor.slot = pool, slot
        runtime = self.runtime
        req_id = runtime.new_id()
        hdr = protocol.orjson_dumps(spec.header)
        prefix = protocol.encode_prefix(FrameKind.CREATE_ACTOR, req_id, hdr, parts_size(spec.parts))
        created: Ref[None] = Ref(f"{spec.cls_name}.__init__")
        runtime.submit(slot.pod.address, pool.token, req_id, [prefix, hdr, *spec.parts], created)
        actor.move(ActorState.ALIVE, f"created on pod {slot.pod.name}")
        actor.handle._bind(slot.pod.address, pool.token)

    def _on_died(self, address: Address, event: dict[str, Any]) -> None:
        actor = self.actors.get(str(event.get("actor")))
        if actor is None or actor.slot is None or actor.slot.pod.address != address:
            return
        cause = ActorDiedError(
            actor.spec.actor_id,
            actor.slot.pod.name,
            exit_code=event.get("exit_code"),
            signal=event.get("signal"),
            oom=bool(event.get("oom")),
            reason=str(event.get("reason") or ""),
        )
        self._handle_death(actor, cause)

    def _handle_death(self, actor: Actor, cause: ActorDiedError) -> None:
        decision = decide(actor, cause)
        if decision is Decision.IGNORE:
            return
        if actor.pool is not None:
            actor.pool.release(actor.spec.actor_id, actor.spec.request)
        if decision is Decision.GIVE_UP:
            actor.move(ActorState.DEAD, str(cause))
            if actor.spec.max_restarts and "kt.kill" not in cause.reason:
                logger.error("%s; no restarts left (%d used)", cause, actor.restarts)
            actor.handle._fail(cause)
            return
        actor.restarts += 1
        left = actor.spec.max_restarts - actor.restarts
        logger.warning(
            "%s; restarting it (%d/%d restarts left)", cause, left, actor.spec.max_restarts
        )
        actor.move(ActorState.RESTARTING, str(cause))
        actor.handle._unbind()
        actor.move(ActorState.PLACING, "restart")
        self._start(self._place_and_create(actor))

    def mark_killed(self, actor_id: str) -> None:
        """kt.kill: no restart, and its slice of the pod is free again."""
        actor = self.actors.get(actor_id)
        if actor is None or actor.state is ActorState.DEAD:
            return
        actor.move(ActorState.DEAD, "kt.kill")
        if actor.pool is not None:
            actor.pool.release(actor_id, actor.spec.request)

    # -- pods ----------------------------------------------------------------------------
    def _on_link_lost(self, address: Address) -> None:
        """A link broke. Hold the pod's actors' calls until we know whether it is gone."""
        if self.closing:
            return
        victims = [
            a
            for a in self.actors.values()
            if a.state is ActorState.ALIVE and a.slot is not None and a.slot.pod.address == address
        ]
        if not victims:
            return
        for actor in victims:
            actor.handle._unbind()
        self._start(self._check_pod(address, victims))

    async def _watch(self, pool: Pool) -> None:
        """Pods the provider reports gone, whether or not a call is in flight to them
        (on Kubernetes a deleted pod's TCP peer may stay silent for minutes)."""
        gone = (PodState.LOST, PodState.DELETED, PodState.FAILED)
        while not self.closing:
            try:
                async for event in pool.provider.watch_pods(pool.name):
                    if event.state in gone and not self.closing:
                        self._pod_reported_gone(pool, event.pod.name, event.state)
            except Exception as exc:  # the watch broke: start it again
                logger.warning("watch of pool %s failed (%s); watching again", pool.name, exc)
                await asyncio.sleep(1.0)

    def _pod_reported_gone(self, pool: Pool, pod: str, state: PodState) -> None:
        slot = next((s for s in pool.slots if not s.launching and s.pod.name == pod), None)
        if slot is None:
            return
        logger.warning(
            "pod %s of pool %s is %s (from the provider's watch)", pod, pool.name, state.value
        )
        error = PodLostError(pod, f"the provider reports the pod {state.value}")
        if not self.runtime.fail_link(slot.pod.address, error):  # no link: nothing to hold
            victims = [
                a for a in self.actors.values() if a.slot is slot and a.state is ActorState.ALIVE
            ]
            self._start(self._lost(pool, slot, victims))

    async def _check_pod(self, address: Address, victims: list[Actor]) -> None:
        pool = victims[0].pool
        assert pool is not None
        slot = pool.slot_at(address)
        alive = (
            slot is not None
            and await _pod_alive(pool.provider, pool.name, slot.pod.name)
            and await _reachable(address)
        )
        if alive:
            for actor in victims:
                actor.handle._bind(address, pool.token)
            return
        if slot is None:
            pod = f"{address[0]}:{address[1]}"
            for actor in victims:
                self._handle_death(
                    actor, ActorDiedError(actor.spec.actor_id, pod, reason="its pod was lost")
                )
            return
        await self._lost(pool, slot, victims)

    async def _lost(self, pool: Pool, slot: PodSlot, victims: list[Actor]) -> None:
        """The pod is gone: make sure of it, and its actors died with it."""
        logger.warning("pod %s of pool %s is lost", slot.pod.name, pool.name)
        await pool.drop(slot)
        for actor in victims:
            cause = ActorDiedError(actor.spec.actor_id, slot.pod.name, reason="its pod was lost")
            self._handle_death(actor, cause)

    # -- named actors --------------------------------------------------------------------
    async def lookup(self, name: str, namespace: str | None) -> ActorHandle | None:
        """Find a named actor: this driver's first, then every pod of every pool."""
        for actor in self.actors.values():
            h = actor.spec.header
            if (
                h.get("name") == name
                and (h.get("namespace") or "") == (namespace or "")
                and actor.state is not ActorState.DEAD
            ):
                return actor.handle
        provider = get_provider(resolve_backend(None))
        pods = [p for p in await provider.list_pods() if p.state is PodState.READY]
        tokens: dict[str, str | None] = {}
        for pod in pods:
            if pod.pool not in tokens:
                tokens[pod.pool] = await provider.read_token(pod.pool)
            token = tokens[pod.pool]
            if not token:
                continue
            req_id = self.runtime.new_id()
            ref: Ref[dict[str, Any] | None] = Ref("lookup")
            query = {"name": name, "namespace": namespace or ""}
            frame = protocol.encode(FrameKind.LOOKUP, req_id, query)
            self.runtime.submit(pod.address, token, req_id, [frame], ref)
            try:
                found = await asyncio.wait_for(ref, 10)
            except (TimeoutError, KtError):
                continue
            if found:
                methods = {k: MethodKind(v) for k, v in found["methods"].items()}
                return ActorHandle(
                    found["actor"],
                    found["cls"],
                    methods,
                    address=pod.address,
                    token=token,
                    name=name,
                )
        return None

    # -- exit ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Delete the pods of every pool this driver made that is not detached."""
        self.closing = True
        pools = [p for p in self.pools.values() if not p.detached]
        self.pools.clear()
        if self.runtime.loop.is_running():
            try:
                self.runtime.run(self._teardown(pools), timeout=10)
            except Exception as exc:  # exiting anyway: the pods' watchdogs finish the job
                logger.warning("teardown at exit was incomplete: %s", exc)
        self.runtime.stop()

    async def _teardown(self, pools: list[Pool]) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(p.teardown() for p in pools), return_exceptions=True)


async def _reachable(address: Address, tries: int = 3) -> bool:
    """The pod accepts connections (a dying process can still look alive to the provider)."""
    for attempt in range(tries):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*address), 1.0)
        except (TimeoutError, OSError):
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        writer.close()
        return True
    return False


async def _pod_alive(provider: Provider, pool: str, name: str) -> bool:
    try:
        pods = await provider.list_pods(pool)
    except KtError:
        return False
    return any(p.name == name and p.state is PodState.READY for p in pods)


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
        handle_module._epoch[0] += 1
    if driver is not None:
        driver.shutdown()


def require_driver_thread(what: str) -> None:
    if _driver is not None and _driver.runtime.on_loop_thread:
        raise KtError(f"{what} cannot block kt's event-loop thread; await it instead")
