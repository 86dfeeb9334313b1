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
import dataclasses
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kt.actors import handle as handle_module
from kt.actors import metrics
from kt.actors.control import (
    ActorCreated,
    ActorDied,
    ActorPhase,
    ActorPlaced,
    ActorReserved,
    ActorSubmitted,
    BindHandle,
    CheckPod,
    ControlPlane,
    DeletePod,
    Event,
    FailHandle,
    FailLink,
    HoldHandle,
    IdleTick,
    Instruction,
    KillRequested,
    LinkBroken,
    Place,
    PlacementFailed,
    PodLost,
    PodPhase,
    PodReachable,
    PoolOpened,
    Release,
    SendCreate,
)
from kt.actors.deploy import Deployments
from kt.actors.handle import ActorHandle
from kt.actors.imaging import Imager
from kt.actors.lifecycle import Actor, ActorSpec
from kt.actors.push import Pusher
from kt.actors.scheduler import PodSlot, Pool, progress
from kt.core import dial, protocol
from kt.core.compute import Compute
from kt.core.config import config
from kt.core.errors import (
    ActorDiedError,
    AuthError,
    DeathCause,
    KtError,
    PodLostError,
    SyncFileChanged,
)
from kt.core.methods import MethodKind
from kt.core.protocol import FrameKind
from kt.core.provider import Pod, PodState, Provider, get_provider, resolve_backend
from kt.core.ref import Ref
from kt.core.runtime import Address, Runtime, shared_runtime
from kt.core.serialization import parts_size
from kt.core.sync import manifest

logger = logging.getLogger(__name__)

WHY_POLLS = 10
"""A pod that went silent while its provider still calls it ready: ask again this many
times, 0.2 s apart, for the reason (OOMKilled, Evicted) before calling it lost without one."""


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
        self.plane = ControlPlane()
        self.pusher = Pusher(self.runtime)
        self.imager = Imager(self.runtime)
        self.deployments = Deployments()
        self.metrics_port: int | None = None
        if config.metrics_port and not in_worker:
            self.metrics_port = metrics.serve(self, config.metrics_port)
        self._pool_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self._ticking = False
        self._do: dict[type[Instruction], Callable[[Any], None]] = {
            Place: self._do_place,
            SendCreate: self._do_send_create,
            BindHandle: self._do_bind,
            HoldHandle: self._do_hold,
            FailHandle: self._do_fail,
            Release: self._do_release,
            CheckPod: self._do_check_pod,
            DeletePod: self._do_delete_pod,
            FailLink: self._do_fail_link,
        }
        atexit.register(self._exit)

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
                provider.open_pool(name, compute.namespace)
                token = await provider.read_token(name) or secrets.token_urlsafe(32)
                pool = Pool(
                    compute,
                    provider,
                    name=name,
                    token=token,
                    detached=detached,
                    on_event=self.apply,
                )
                self.pools[name] = pool
                idle = compute.idle_seconds or config.idle_timeout
                self.apply(PoolOpened(name, compute.replica_range[0], idle))
                self._start(self._watch(pool))
                if not self._ticking:
                    self._ticking = True
                    self._start(self._tick())
        await pool.ensure_min()
        return pool

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the control plane -------------------------------------------------------------
    def apply(self, event: Event) -> None:
        """Feed one event to the control plane and carry out what it says (loop thread)."""
        for instruction in self.plane.handle(event):
            logger.debug("%s: %s", instruction.cause, instruction)
            self._carry_out(instruction)

    def _carry_out(self, ins: Instruction) -> None:
        self._do[type(ins)](ins)

    def _do_place(self, ins: Place) -> None:
        self._start(self._place(self.actors[ins.actor]))

    def _do_send_create(self, ins: SendCreate) -> None:
        self._send_create(self.actors[ins.actor], ins.pod)

    def _do_bind(self, ins: BindHandle) -> None:
        actor = self.actors[ins.actor]
        if actor.pool is not None and actor.slot is not None:
            actor.handle._bind(actor.slot.pod.address, actor.pool.token)

    def _do_hold(self, ins: HoldHandle) -> None:
        self.actors[ins.actor].handle._unbind()

    def _do_fail(self, ins: FailHandle) -> None:
        record = self.plane.actors[ins.actor]
        if record.restarts and record.death is not DeathCause.KILLED:
            logger.error(
                "%s; no restarts left (%d used) [%s]", ins.error, record.restarts, ins.cause
            )
        self.actors[ins.actor].handle._fail(ins.error)

    def _do_release(self, ins: Release) -> None:
        actor = self.actors[ins.actor]
        if actor.pool is not None:
            actor.pool.release(actor.spec.actor_id, actor.spec.request)
        actor.slot = None

    def _do_check_pod(self, ins: CheckPod) -> None:
        self._start(self._check_pod(ins.pod))

    def _do_delete_pod(self, ins: DeletePod) -> None:
        self.pusher.forget(ins.pod)  # not a source of code for other pods any more
        self.imager.forget(ins.pod)
        found = self._slot_of(ins.pod)
        if found is None:
            return
        pool, slot = found
        deleting = pool.drop(slot)
        if self.plane.pods[ins.pod].phase is PodPhase.LOST:
            logger.warning(
                "pod %s of pool %s is %s [%s]", ins.pod, pool.name, ins.reason, ins.cause
            )
            return
        logger.info("pool %s: deleting pod %s, %s [%s]", pool.name, ins.pod, ins.reason, ins.cause)
        left = len(pool.slots)
        deleting.add_done_callback(
            lambda _: progress(f"pool {pool.name}: scaled down to {left} pod(s)")
        )

    def _do_fail_link(self, ins: FailLink) -> None:
        found = self._slot_of(ins.pod)
        if found is not None:
            error: KtError = PodLostError(ins.pod, ins.reason)
            if ins.oom:  # its processes are known to be dead: the OOM killer ended them
                actors = ", ".join(sorted(found[1].actors)) or "(none)"
                error = ActorDiedError(actors, ins.pod, oom=True, reason=ins.reason)
            self.runtime.fail_link(found[1].pod.address, error)

    async def _tick(self) -> None:
        """The plane's clock: an IdleTick a few times per shortest idle_timeout (<= 1 s)."""
        while not self.closing:
            shortest = min((p.idle_timeout for p in self.plane.pools.values()), default=4.0)
            await asyncio.sleep(min(1.0, shortest / 4))
            self.apply(IdleTick(time.monotonic()))

    def _slot_of(self, pod: str) -> tuple[Pool, PodSlot] | None:
        for pool in self.pools.values():
            for slot in pool.slots:
                if not slot.launching and slot.pod.name == pod:
                    return pool, slot
        return None

    def _pod_at(self, address: Address) -> str | None:
        for pool in self.pools.values():
            slot = pool.slot_at(address)
            if slot is not None:
                return slot.pod.name
        return None

    # -- actors --------------------------------------------------------------------------
    def new_actor_id(self) -> str:
        return uuid.uuid4().hex[:16]

    async def create_actor(self, spec: ActorSpec, handle: ActorHandle) -> None:
        self.actors[spec.actor_id] = Actor(spec, handle)
        self.apply(ActorSubmitted(spec.actor_id, spec.max_restarts))

    async def _place(self, actor: Actor, lost_pods: int = 0) -> None:
        """Find room for the actor (the pool may launch a pod); the plane decides the rest."""
        spec = actor.spec
        record = self.plane.actors[spec.actor_id]
        if record.restarts:
            left = (
                "for ever"
                if spec.max_restarts < 0
                else f"{spec.max_restarts - record.restarts} left"
            )
            logger.warning("actor %s restarts (%d, %s)", spec.actor_id, record.restarts, left)
        try:
            pool = await self.pool_for(spec.compute, detached=spec.detached)
            slot = await pool.place(spec.actor_id, spec.request, timeout=spec.placement_timeout)
        except BaseException as exc:
            self.apply(PlacementFailed(spec.actor_id, exc))
            return
        if spec.sync is not None or spec.image is not None:
            self.apply(ActorReserved(spec.actor_id, slot.pod.name))  # busy, not idle
            try:
                if spec.sync is not None:
                    spec = await self._sync(actor, slot, pool)
                if spec.image is not None:
                    key, steps = spec.image
                    await self.imager.ensure(
                        slot.pod.name, slot.pod.address, pool.token, key, steps
                    )
            except BaseException as exc:
                pool.release(spec.actor_id, spec.request)
                if isinstance(exc, PodLostError) and lost_pods < 3:  # another pod, then
                    logger.warning("actor %s: %s; placing it again", spec.actor_id, exc)
                    await self._place(actor, lost_pods + 1)
                    return
                self.apply(PlacementFailed(spec.actor_id, exc))
                return
        actor.pool, actor.slot = pool, slot
        self.apply(ActorPlaced(spec.actor_id, slot.pod.name))

    async def _sync(self, actor: Actor, slot: PodSlot, pool: Pool) -> ActorSpec:
        """Bring the actor's project version to its pod. A file that changed since the
        manifest: once more with a new manifest (the actor then runs that version)."""
        spec = actor.spec
        assert spec.sync is not None
        pod = slot.pod
        try:
            await self.pusher.ensure(pod.name, pod.address, pool.token, spec.sync)
            return spec
        except SyncFileChanged as exc:
            logger.warning("%s; syncing again with a new manifest", exc)
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(None, manifest, Path(spec.sync.root))
        header = {**spec.header, "sync": fresh.header()}
        actor.spec = spec = dataclasses.replace(spec, sync=fresh, header=header)
        await self.pusher.ensure(pod.name, pod.address, pool.token, fresh)
        return spec

    def _send_create(self, actor: Actor, pod: str) -> None:
        spec, pool, slot = actor.spec, actor.pool, actor.slot
        assert pool is not None and slot is not None
        runtime = self.runtime
        req_id = runtime.new_id()
        hdr = protocol.orjson_dumps(spec.header)
        prefix = protocol.encode_prefix(FrameKind.CREATE_ACTOR, req_id, hdr, parts_size(spec.parts))
        created: Ref[None] = Ref(f"{spec.cls_name}.__init__")

        def acknowledged(ref: Ref[None]) -> None:  # on this loop: the Link completes it
            if not ref.cancelled() and ref.exception() is None:
                self.apply(ActorCreated(spec.actor_id, pod))
            # a failed __init__ also ends the process: its DIED frame says so

        created.on_done(acknowledged)
        runtime.submit(slot.pod.address, pool.token, req_id, [prefix, hdr, *spec.parts], created)

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
            cause=DeathCause(event.get("cause") or DeathCause.UNKNOWN.value),
            last_lines=tuple(str(line) for line in event.get("lines") or ()),
        )
        self.apply(ActorDied(actor.spec.actor_id, actor.slot.pod.name, cause))

    def mark_killed(self, actor_id: str) -> None:
        """kt.kill: no restart, and its slice of the pod is free again."""
        self.apply(KillRequested(actor_id))

    def is_dead(self, actor_id: str) -> bool:
        record = self.plane.actors.get(actor_id)
        return record is None or record.phase is ActorPhase.DEAD

    # -- pods ----------------------------------------------------------------------------
    def _on_link_lost(self, address: Address) -> None:
        """A link broke: the plane holds the pod's handles until we know more."""
        if self.closing:
            return
        pod = self._pod_at(address)
        if pod is not None:
            self.apply(LinkBroken(pod))

    async def _watch(self, pool: Pool) -> None:
        """Pods the provider reports gone, whether or not a call is in flight to them
        (on Kubernetes a deleted pod's TCP peer may stay silent for minutes)."""
        gone = (PodState.LOST, PodState.DELETED, PodState.FAILED)
        while not self.closing:
            try:
                async for event in pool.provider.watch_pods(pool.name):
                    if event.state in gone and not self.closing:
                        reason = event.pod.reason or f"the provider reports it {event.state.value}"
                        self.apply(PodLost(event.pod.name, reason, oom=event.pod.oom))
            except Exception as exc:  # the watch broke: start it again
                logger.warning("watch of pool %s failed (%s); watching again", pool.name, exc)
                await asyncio.sleep(1.0)

    async def _check_pod(self, pod: str) -> None:
        found = self._slot_of(pod)
        if found is None:
            self.apply(PodLost(pod, "its pool no longer has it"))
            return
        pool, slot = found
        seen = await _provider_pod(pool.provider, pool.name, pod)
        if seen is None or seen.state is not PodState.READY:
            self.apply(_lost(pod, seen, "the provider no longer has it"))
        elif not await _reachable(slot.pod.address, pool.token):  # the provider may say why
            seen = await _provider_pod(pool.provider, pool.name, pod)
            for _ in range(WHY_POLLS):  # its kubelet may not have reported the end yet
                if seen is None or seen.reason or seen.state is not PodState.READY:
                    break
                await asyncio.sleep(0.2)
                seen = await _provider_pod(pool.provider, pool.name, pod)
            self.apply(_lost(pod, seen, "it does not accept connections"))
        else:
            self.apply(PodReachable(pod))

    # -- named actors --------------------------------------------------------------------
    async def lookup(self, name: str, namespace: str | None) -> ActorHandle | None:
        """Find a named actor: this driver's first, then every pod of every pool."""
        for actor in self.actors.values():
            h = actor.spec.header
            if (
                h.get("name") == name
                and (h.get("namespace") or "") == (namespace or "")
                and not self.is_dead(actor.spec.actor_id)
            ):
                return actor.handle
        for pod, token in await ready_pods_with_tokens():
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
    def _exit(self) -> None:
        try:
            if self.runtime.loop.is_running():
                self.runtime.run_blocking_inline()  # thread pools take no work at exit
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Delete the pods of every pool this driver made that is not detached."""
        self.closing = True
        pools = [p for p in self.pools.values() if not p.detached]
        providers = list({id(p.provider): p.provider for p in self.pools.values()}.values())
        self.pools.clear()
        if self.runtime.loop.is_running():
            try:
                self.runtime.run(self._teardown(pools, providers), timeout=10)
            except Exception as exc:  # exiting anyway: the pods' watchdogs finish the job
                logger.warning("teardown at exit was incomplete: %s", exc)
        self.runtime.stop()

    async def _teardown(self, pools: list[Pool], providers: list[Provider]) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(p.teardown() for p in pools), return_exceptions=True)
        await asyncio.gather(*(p.close() for p in providers), return_exceptions=True)


async def ready_pods_with_tokens() -> list[tuple[Pod, str]]:
    """Every ready kt pod the provider of this process lists, with its pool's token
    (pools whose token cannot be read are left out): whom to ask for named actors and
    data store keys."""
    provider = get_provider(resolve_backend(None))
    tokens: dict[str, str | None] = {}
    out = []
    for pod in await provider.list_pods():
        if pod.state is not PodState.READY:
            continue
        if pod.pool not in tokens:
            tokens[pod.pool] = await provider.read_token(pod.pool)
        token = tokens[pod.pool]
        if token:
            out.append((pod, token))
    return out


async def _reachable(address: Address, token: str, tries: int = 3) -> bool:
    """The pod answers a HELLO (a dying process can still look alive to the provider, and
    a stopped one still accepts connections); through the gateway when there is one."""
    for attempt in range(tries):
        try:
            relayed = await dial.through_gateway(address, token, 10.0)  # it may wait for the pod
            if relayed is not None:
                reader, writer = await asyncio.open_connection(sock=relayed)
            else:
                opening = asyncio.open_connection(*address)
                reader, writer = await asyncio.wait_for(opening, 1.0)
        except (TimeoutError, OSError, PodLostError, AuthError):  # not a ConfigError
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        hello = {"v": protocol.VERSION, "token": token, "caller": "kt-probe", "host": ""}
        try:
            writer.write(protocol.encode(FrameKind.HELLO, 0, hello))
            prefix = await asyncio.wait_for(reader.readexactly(protocol.PREFIX_SIZE), 3.0)
            return bool(protocol.PREFIX.unpack(prefix)[1] == FrameKind.WELCOME)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return False  # it took the connection but does not serve
        finally:
            writer.close()
    return False


async def _provider_pod(provider: Provider, pool: str, name: str) -> Pod | None:
    """The pod as the provider sees it now; None when it has no such pod (or no answer)."""
    try:
        pods = await provider.list_pods(pool)
    except KtError:
        return None
    return next((p for p in pods if p.name == name), None)


def _lost(name: str, seen: Pod | None, otherwise: str) -> PodLost:
    """The pod is gone: the provider's reason (OOMKilled, Evicted, ...) when it gives one."""
    if seen is not None and seen.reason:
        return PodLost(name, seen.reason, oom=seen.oom)
    return PodLost(name, otherwise)


_driver: Driver | None = None
_driver_lock = threading.Lock()


def get_driver() -> Driver:
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = Driver()
    return _driver


def current_driver() -> Driver | None:
    """This process's Driver if it has one (an actor has none until it makes pools)."""
    return _driver


def get_runtime() -> Runtime:
    """The process's runtime. Inside an actor, until it makes pools of its own, that is a
    caller runtime only (links and Refs, for handles passed to it): no Driver, no pools,
    no teardown at exit."""
    if _driver is not None:
        return _driver.runtime
    if os.environ.get("KT_IN_WORKER") == "1":
        return shared_runtime(caller=f"actor-{os.getpid()}", stream_logs=False)
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
