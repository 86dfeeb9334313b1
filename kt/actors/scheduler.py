"""Placement of actors onto the pods of a pool, and growing the pool when nothing fits.

Who calls it: `kt.actors.driver.Driver`, on the runtime's loop thread. A `Pool` is what
exists for one `Compute`: its pods (`PodSlot`s, each with capacity and what is used of
it) and the provider that makes more. Placement is `pack` (the fullest pod that fits)
or `spread` (the emptiest). A request larger than an empty pod fails at once with
`PlacementError`; one that could fit later waits up to `placement_timeout`.

`spread` prefers an empty pod, starting one while the pool is below `max_replicas`;
`pack` starts a pod only when no pod has room. Which idle pods go is the control
plane's decision (`kt.actors.control`, on `IdleTick`); the driver then calls `drop`.

Nothing here holds a lock across provider I/O. Every decision is made between awaits on
the driver's one loop thread: a pod being launched is a slot at once (LAUNCHING), so a
request can reserve room on it and later requests count it, and the pool never grows
past `max_replicas`; the request then waits for that slot alone, while requests that fit
pods already up are placed at once. Each pod is launched by its own task: one failed
launch removes its slot and fails the requests that waited for it (`LaunchError`), and
nothing else.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kt.actors.control import Event, PodDeleted, PodFailed, PodReady, PodStarted
from kt.core import output
from kt.core.compute import Compute
from kt.core.errors import AuthError, KtError, LaunchError, PlacementError, seconds
from kt.core.gpus import GpuTable, pick
from kt.core.provider import Pod, PodSpec, PodState, Provider

logger = logging.getLogger(__name__)


def progress(message: str) -> None:
    """Pool and placement progress on the driver's terminal (stderr), and in the log."""
    logger.info("%s", message)
    if _console is not None:  # on the output thread: a stderr nobody reads blocks only it
        console = _console
        output.show(lambda: console.print(f"[dim]kt:[/dim] {message}", highlight=False))


def _make_console() -> Any:
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is a dependency
        return None
    return Console(stderr=True)  # sys.stderr as it is at each print, redirections included


_console = _make_console()


class Strategy(str, enum.Enum):
    PACK = "pack"
    SPREAD = "spread"


@dataclass(frozen=True)
class Request:
    """The slice of a pod one actor asks for."""

    cpus: float = 1.0
    gpus: float = 0.0
    """Whole devices (1, 2) or a share of one (0.5): `kt.core.gpus`."""
    memory: int = 0
    strategy: Strategy = Strategy.PACK
    pod_index: int | None = None
    """Pin to the pool's pod of this index (in creation order); SPMD ranks use it."""
    resources: tuple[tuple[str, float], ...] = ()
    """Custom resources (name, amount) that pods advertise through Compute(resources=)."""

    def __str__(self) -> str:
        """In words, for messages: `1 cpu`, `2 cpus, 1 gpu, 512 MiB`."""
        parts = [f"{self.cpus:g} cpu{'' if self.cpus == 1 else 's'}"]
        if self.gpus:
            parts.append(f"{self.gpus:g} gpu{'' if self.gpus == 1 else 's'}")
        if self.memory:
            parts.append(f"{self.memory / 2**20:.0f} MiB")
        parts += [f"{amount:g} {name}" for name, amount in self.resources]
        return ", ".join(parts)


@dataclass
class PodSlot:
    """A pod of the pool and how much of it is taken."""

    pod: Pod
    cpus: float
    gpus: int
    memory: int
    used_cpus: float = 0.0
    used_memory: int = 0
    actors: set[str] = field(default_factory=set)
    resources: dict[str, float] = field(default_factory=dict)
    used_resources: dict[str, float] = field(default_factory=dict)
    launched: asyncio.Event | None = None
    """Set when a LAUNCHING slot's pod is up or its launch failed; None once READY."""
    failure: KtError | None = None
    devices: GpuTable = field(init=False)
    """The pod's GPUs as its supervisor shares them out (the same decisions, modelled
    here so that an actor is placed only where its devices are free)."""

    def __post_init__(self) -> None:
        self.devices = GpuTable(tuple(str(i) for i in range(self.gpus)))

    @property
    def used_gpus(self) -> float:
        return sum(self.devices.used())

    @property
    def launching(self) -> bool:
        return self.launched is not None

    def fits(self, req: Request) -> bool:
        return (
            self.used_cpus + req.cpus <= self.cpus + 1e-9
            and (not req.gpus or pick(self.devices.used(), req.gpus) is not None)
            and (not req.memory or self.used_memory + req.memory <= self.memory)
            and all(
                self.used_resources.get(k, 0.0) + v <= self.resources.get(k, 0.0) + 1e-9
                for k, v in req.resources
            )
        )

    def take(self, actor: str, req: Request) -> None:
        self.used_cpus += req.cpus
        if req.gpus:
            self.devices.take(actor, req.gpus)
        self.used_memory += req.memory
        for k, v in req.resources:
            self.used_resources[k] = self.used_resources.get(k, 0.0) + v
        self.actors.add(actor)

    def give_back(self, actor: str, req: Request) -> None:
        if actor in self.actors:
            self.actors.discard(actor)
            self.used_cpus -= req.cpus
            self.devices.give_back(actor)
            self.used_memory -= req.memory
            for k, v in req.resources:
                self.used_resources[k] = self.used_resources.get(k, 0.0) - v


class Pool:
    """The pods made from one Compute, and the placement of actors on them."""

    def __init__(
        self,
        compute: Compute,
        provider: Provider,
        *,
        name: str,
        token: str,
        detached: bool,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.compute = compute
        self.provider = provider
        self.name = name
        self.token = token
        self.detached = detached
        self.slots: list[PodSlot] = []
        self.waiting = 0  # placements waiting for room (the driver's /metrics)
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_event = on_event

    def _tell(self, event: Event) -> None:
        """Pod changes, for the driver's control plane."""
        if self._on_event is not None:
            self._on_event(event)

    @property
    def max_replicas(self) -> int:
        return self.compute.replica_range[1]

    def check_fits_empty(self, req: Request) -> None:
        """Raises PlacementError when even an empty pod of this pool is too small."""
        c = self.compute
        problems = []
        if req.cpus > c.cpu_count + 1e-9:
            problems.append(f"{req.cpus:g} cpus > {c.cpu_count:g}")
        if req.gpus > c.gpus + 1e-9:
            problems.append(f"{req.gpus:g} gpus > {c.gpus}")
        if req.memory and c.memory_bytes and req.memory > c.memory_bytes:
            problems.append(f"{req.memory} bytes of memory > {c.memory_bytes}")
        for name, amount in req.resources:
            if amount > c.resources.get(name, 0.0) + 1e-9:
                problems.append(f"{amount:g} {name!r} > {c.resources.get(name, 0.0):g}")
        if problems:
            raise PlacementError(
                f"the request can never fit pool {self.name}: a pod has less than asked "
                f"({'; '.join(problems)}). Ask for less, or use a Compute with bigger pods."
            )

    async def ensure_min(self) -> None:
        missing = self.compute.replica_range[0] - len(self.slots)
        await asyncio.gather(*(self._until_up(self._launch()) for _ in range(max(0, missing))))

    def _spec(self) -> PodSpec:
        c = self.compute
        return PodSpec(
            pool=self.name,
            name=f"{self.name}-{secrets.token_hex(3)}",
            cpus=c.cpu_count,
            memory=c.memory_bytes,
            gpus=c.gpus,
            token=self.token,
            env=dict(c.env),
            labels=dict(c.labels),
            inactivity_ttl=c.ttl_seconds,
            launch_timeout=c.launch_timeout,
            detached=self.detached,
            image=c.image.base,
            namespace=c.namespace,
            compute=c,
        )

    def _launch(self) -> PodSlot:
        """A new LAUNCHING slot, at once; its pod is created by a task of its own."""
        c = self.compute
        spec = self._spec()
        placeholder = Pod(spec.name, self.name, "", 0, PodState.PENDING)
        slot = PodSlot(
            placeholder,
            c.cpu_count,
            c.gpus,
            c.memory_bytes,
            resources=dict(c.resources),
            launched=asyncio.Event(),
        )
        self.slots.append(slot)
        self._tell(PodStarted(spec.name, self.name))
        task = asyncio.get_running_loop().create_task(self._create(slot, spec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        ready = sum(not s.launching for s in self.slots)
        progress(f"pool {self.name}: starting a pod, {ready}/{len(self.slots)} ready")
        return slot

    async def _create(self, slot: PodSlot, spec: PodSpec) -> None:
        assert slot.launched is not None
        launched = slot.launched
        try:
            (pod,) = await self.provider.create_pods([spec])
        except Exception as exc:
            if not isinstance(exc, (LaunchError, PlacementError, AuthError)):
                exc = LaunchError(self.name, spec.name, f"{type(exc).__name__}: {exc}")
            slot.failure = exc
            if slot in self.slots:
                self.slots.remove(slot)
            self._tell(PodFailed(spec.name, str(exc)))
            launched.set()
            self._freed.set()  # waiters decide again
            return
        if slot not in self.slots:  # the pool was torn down meanwhile
            await self.provider.delete_pod(self.name, pod.name)
            slot.failure = LaunchError(self.name, spec.name, "the pool was torn down")
            launched.set()
            return
        slot.pod = pod
        slot.launched = None
        self._tell(PodReady(pod.name))
        launched.set()
        ready = sum(not s.launching for s in self.slots)
        progress(f"pool {self.name}: {ready}/{len(self.slots)} pods ready")

    async def a_pod_up(self) -> PodSlot:
        """A slot whose pod is up: a ready one, else the first being launched, once it is
        (raises its launch error; LaunchError when the pool has no pod at all)."""
        ready = [s for s in self.slots if not s.launching]
        if ready:
            return ready[0]
        if not self.slots:
            raise LaunchError(self.name, "-", "the pool has no pod")
        return await self._until_up(self.slots[0])

    async def _until_up(self, slot: PodSlot) -> PodSlot:
        """Wait for a slot's launch; raises LaunchError if it failed."""
        if slot.launched is not None:
            await slot.launched.wait()
        if slot.failure is not None:
            raise slot.failure
        return slot

    def _choose(self, req: Request) -> PodSlot | None:
        fits = [s for s in self.slots if s.fits(req)]
        if not fits:
            return None
        if req.strategy is Strategy.SPREAD:
            best = min(fits, key=lambda s: (len(s.actors), s.launching, s.used_cpus))
            if best.actors and len(self.slots) < self.max_replicas:
                return None  # an empty pod is better, and the pool may grow one
            return best
        return max(fits, key=lambda s: (not s.launching, s.used_cpus, len(s.actors)))

    async def place(self, actor: str, req: Request, *, timeout: float) -> PodSlot:
        """Reserve a slice for `actor`, growing the pool if needed.

        Raises:
            PlacementError: it can never fit, or no room came up within `timeout`.
            LaunchError: the pod it waited for did not start.
        """
        self.check_fits_empty(req)
        if req.pod_index is not None:
            return await self._place_pinned(actor, req)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        warned = False
        while True:
            slot = self._choose(req)  # decided and reserved with no await in between
            if slot is None and len(self.slots) < self.max_replicas:
                slot = self._launch()
            if slot is not None:
                slot.take(actor, req)
                return await self._reserved(slot, actor, req)
            self._freed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise PlacementError(
                    f"actor {actor} found no room within {seconds(timeout)}: {self.full(req)}"
                )
            if not warned:
                progress(f"actor {actor} waits up to {seconds(left)}: {self.full(req)}")
                warned = True
            self.waiting += 1
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1

    async def _reserved(self, slot: PodSlot, actor: str, req: Request) -> PodSlot:
        """`actor` holds room on `slot`: once its pod is up, it is placed there."""
        try:
            return await self._until_up(slot)
        except BaseException:
            slot.give_back(actor, req)
            raise

    def full(self, req: Request) -> str:
        """Why `req` does not fit now, who holds the pool, and the ways out, in words."""
        used = sum(s.used_cpus for s in self.slots)
        total = sum(s.cpus for s in self.slots)
        gpus = ""
        if req.gpus:
            held = sum(s.used_gpus for s in self.slots)
            gpus = f", {held:g} of {sum(s.gpus for s in self.slots)} gpus"
        holders = sorted(a for s in self.slots for a in s.actors)
        shown = ", ".join(holders[:4]) + (
            f" and {len(holders) - 4} more" if len(holders) > 4 else ""
        )
        ways = ["kt.kill one of them"]
        if req.cpus:
            ways.append("ask for cpus=0 (a light actor that fits anywhere)")
        if self.max_replicas == len(self.slots):
            ways.append("use an elastic pool that grows, Compute(min_replicas=0, max_replicas=N)")
        return (
            f"it asks for {req}, and pool {self.name} is full: {len(self.slots)} of at most "
            f"{self.max_replicas} pods, {used:g} of {total:g} cpus{gpus} held by "
            f"{len(holders)} actors ({shown or 'none'}). Make room: {'; or '.join(ways)}."
        )

    async def _place_pinned(self, actor: str, req: Request) -> PodSlot:
        index = req.pod_index
        assert index is not None
        if not 0 <= index < self.max_replicas:
            raise PlacementError(
                f"pod={index} is outside pool {self.name}, which has at most "
                f"{self.max_replicas} pods"
            )
        while len(self.slots) <= index:
            self._launch()
        slot = self.slots[index]
        if not slot.fits(req):
            raise PlacementError(
                f"pod {index} of pool {self.name} has no room for {req} "
                f"({slot.used_cpus:g}/{slot.cpus:g} cpus used)"
            )
        slot.take(actor, req)
        return await self._reserved(slot, actor, req)

    def release(self, actor: str, req: Request) -> None:
        for slot in self.slots:
            slot.give_back(actor, req)
        self._freed.set()

    def drop(self, slot: PodSlot) -> asyncio.Task[None]:
        """Forget a pod at once (no later placement can choose it) and delete it; the
        task ends when the provider has."""
        if slot in self.slots:
            self.slots.remove(slot)
        self._tell(PodDeleted(slot.pod.name))
        self._freed.set()
        task = asyncio.get_running_loop().create_task(
            self.provider.delete_pod(self.name, slot.pod.name)
        )
        self._tasks.add(task)  # teardown waits for deletions as for launches
        task.add_done_callback(self._tasks.discard)
        return task

    def slot_at(self, address: tuple[str, int]) -> PodSlot | None:
        return next((s for s in self.slots if not s.launching and s.pod.address == address), None)

    async def teardown(self) -> None:
        """Delete every pod; pods still launching are deleted when their launch ends."""
        slots, self.slots = self.slots, []
        await asyncio.gather(
            *(self.provider.delete_pod(self.name, s.pod.name) for s in slots if not s.launching),
            *(asyncio.shield(t) for t in list(self._tasks)),
            return_exceptions=True,
        )
        await self.provider.release_pool(self.name)
