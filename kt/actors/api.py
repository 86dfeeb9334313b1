"""`kt.cls`, `kt.fn`, `kt.get`, `kt.wait`, `kt.kill`: the public verbs over handles.

A `RemoteClass` creates actors (`.remote`, `.options(...).remote`) or a load-balanced
service with one instance per replica (`.to(compute)`); a `RemoteFunction` deploys a
function as one instance per replica and balances calls over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, overload

from kt.actors import datastore, deploy
from kt.actors.driver import get_driver, require_driver_thread
from kt.actors.handle import ActorHandle
from kt.actors.imaging import TIMEOUT_S as IMAGE_TIMEOUT_S
from kt.actors.lifecycle import ActorSpec
from kt.actors.scheduler import Request, Strategy
from kt.core import image as image_steps
from kt.core import protocol
from kt.core.compute import Compute, DistributedCompute, parse_cpus, parse_memory
from kt.core.config import config
from kt.core.errors import (
    ArgumentError,
    ConfigError,
    GetTimeoutError,
    check_option_names,
    seconds,
)
from kt.core.gpus import check_amount
from kt.core.methods import (
    CALL_ARITY,
    MethodKind,
    arity,
    method_kind,
    public_arities,
    public_methods,
)
from kt.core.protocol import FrameKind
from kt.core.ref import PendingRefError, Ref, StreamRef
from kt.core.serialization import dumps_bytes, dumps_value
from kt.core.sync import Manifest, manifest, resolve_root

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class ActorOptions:
    """What `.options(...)` may set; see the API page for each field."""

    compute: Compute | None = None
    cpus: float | int | str = 1
    gpus: float = 0
    memory: int | float | str | None = None
    name: str | None = None
    namespace: str | None = None
    get_if_exists: bool = False
    lifetime: str | None = None
    max_restarts: int = 0
    max_task_retries: int = 0
    max_concurrency: int = 1
    placement: str = "pack"
    placement_timeout: float | None = None
    env: dict[str, str] | None = None
    pod: int | None = None
    resources: dict[str, float] | None = None
    sync_dir: str | os.PathLike[str] | bool | None = None
    """The directory to bring to the pods; None: the caller's project; False: none."""

    def __post_init__(self) -> None:
        if self.placement not in ("pack", "spread"):
            raise ConfigError(f"placement={self.placement!r}: choose 'pack' or 'spread'")
        if self.lifetime not in (None, "detached"):
            raise ConfigError(f"lifetime={self.lifetime!r}: choose None or 'detached'")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")
        check_amount(self.gpus)

    def request(self) -> Request:
        return Request(
            cpus=parse_cpus(self.cpus),
            gpus=check_amount(self.gpus),
            memory=parse_memory(self.memory),
            strategy=Strategy(self.placement),
            pod_index=self.pod,
            resources=tuple(sorted((self.resources or {}).items())),
        )


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(ActorOptions))


class RemoteClass(Generic[T]):
    """A class whose instances live in actor processes."""

    def __init__(
        self, cls: type[T], options: ActorOptions | None = None, *, identity: Any = None
    ) -> None:
        if not isinstance(cls, type):
            fix = f": for a function use kt.fn({cls.__name__})" if callable(cls) else ""
            raise ConfigError(f"kt.cls takes a class, not {type(cls).__name__}{fix}")
        self._cls = cls
        self._identity = cls if identity is None else identity  # what `.to()` deploys
        self._options = options or ActorOptions()
        self._methods = public_methods(cls)
        self._arities = public_arities(cls)  # calls are checked against them before sending
        self._init = arity(cls.__init__, bound=True) if "__init__" in vars(cls) else None
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    @property
    def actor_options(self) -> ActorOptions:
        """The options actors of this class get (read-only; `.options()` makes a copy)."""
        return self._options

    @property
    def methods(self) -> dict[str, MethodKind]:
        """The public methods a handle of this class exposes, and how each runs."""
        return dict(self._methods)

    def options(self, **kwargs: Any) -> RemoteClass[T]:
        check_option_names(f"{self.__name__}.options", kwargs, _OPTION_NAMES)
        return RemoteClass(
            self._cls, dataclasses.replace(self._options, **kwargs), identity=self._identity
        )

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle[T]:
        """Create one actor; returns at once, calls queue until it is placed."""
        return self._create(self._options, args, kwargs, self._manifest(self._options))

    def _manifest(self, opts: ActorOptions) -> Manifest | None:
        """The project version actors made now get (None: no sync). Call it from the
        user's thread: the project is found from the caller's file."""
        if not config.sync:
            return None
        root = resolve_root(opts.sync_dir)
        return manifest(root) if root is not None else None

    def _create(
        self,
        opts: ActorOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        synced: Manifest | None,
    ) -> ActorHandle[T]:
        init = self._init
        why = init.refusal(f"{self.__name__}.__init__", args, kwargs) if init else None
        if why is not None:
            raise ArgumentError(why)
        driver = get_driver()
        if opts.name is not None:
            existing = driver.runtime.run(driver.lookup(opts.name, opts.namespace), timeout=60)
            if existing is not None:
                if opts.get_if_exists:
                    return existing
                raise ConfigError(
                    f"an actor named {opts.name!r} already exists"
                    f"{f' in namespace {opts.namespace!r}' if opts.namespace else ''}: "
                    "pass get_if_exists=True to use it, or choose another name"
                )
        actor_id = driver.new_actor_id()
        while True:
            try:
                parts = dumps_value((self._cls, args, kwargs), f"{self.__name__}.__init__")
                break
            except PendingRefError as exc:  # a Ref in the init arguments: wait for it
                with contextlib.suppress(Exception):
                    exc.ref.result()
        handle: ActorHandle[T] = ActorHandle(
            actor_id, self.__name__, self._methods, name=opts.name, arities=self._arities
        )
        handle._retries = opts.max_task_retries
        header: dict[str, Any] = {
            "actor": actor_id,
            "cls": self.__name__,
            "name": opts.name,
            "namespace": opts.namespace,
            "methods": {k: int(v) for k, v in self._methods.items()},
            "max_concurrency": opts.max_concurrency,
            "env": opts.env or {},
        }
        if opts.gpus:
            header["gpus"] = check_amount(opts.gpus)
        if synced is not None:
            header["sync"] = synced.header()
        compute = opts.compute or config.default_compute
        image = None
        if compute.image.steps:
            steps = image_steps.wire(compute.image)
            image = (image_steps.keys(steps)[-1], steps)
            header["image"] = image[0]
        spec = ActorSpec(
            actor_id=actor_id,
            cls_name=self.__name__,
            header=header,
            parts=parts,
            compute=compute,
            request=opts.request(),
            max_restarts=opts.max_restarts,
            placement_timeout=opts.placement_timeout or config.placement_timeout,
            detached=opts.lifetime == "detached",
            sync=synced,
            image=image,
        )
        driver.runtime.spawn(driver.create_actor(spec, handle))
        return handle

    def to(
        self,
        compute: Compute,
        *,
        init_args: tuple[Any, ...] = (),
        init_kwargs: dict[str, Any] | None = None,
        sync_dir: str | os.PathLike[str] | bool | None = None,
    ) -> Any:
        """One instance per replica of `compute`; calls go to the least busy one.

        On a `compute.distribute(...)` pool, an SPMD group instead (kt.distributed).
        `sync_dir`: the directory brought to the pods (default: the caller's project;
        False: none).
        """
        if sync_dir is not None:
            return self.options(sync_dir=sync_dir).to(
                compute, init_args=init_args, init_kwargs=init_kwargs
            )
        kwargs = init_kwargs or {}
        return self._deployed(
            compute, lambda m: self._make(compute, init_args, kwargs, m), init_args, kwargs
        )

    def _deployed(
        self,
        compute: Compute,
        make: Callable[[Manifest | None], Any],
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
    ) -> Any:
        """`make(manifest)` once per code version and arguments (`kt.actors.deploy`);
        the manifest is made once, so every replica runs the same version."""
        driver = get_driver()
        pool = driver.pool_name(compute, self._options.lifetime == "detached")
        key = deploy.key_of(self._identity, pool, compute.distribution)
        synced = self._manifest(self._options)
        version = synced.version if synced is not None else None
        init = dumps_bytes((init_args, init_kwargs)) + repr((self._options, compute)).encode()
        what = f"{self.__name__} on pool {pool}"
        return driver.deployments.deploy(key, version, init, lambda: make(synced), what)

    def _make(
        self,
        compute: Compute,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        synced: Manifest | None,
    ) -> Any:
        if compute.distribution is not None:
            return _spmd(self, compute, init_args, init_kwargs)
        count = max(compute.replica_range[0], 1)
        service = self._service(
            compute, count, init_args, init_kwargs, placement="spread", synced=synced
        )
        if compute.image.steps:  # .to() fails with the step that failed, as a build would
            wait = compute.launch_timeout + config.placement_timeout + IMAGE_TIMEOUT_S
            try:
                for handle in service._handles:
                    handle.wait_placed(wait)
            except BaseException:
                service.teardown()
                raise
        return service

    def _service(
        self,
        compute: Compute,
        count: int,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        *,
        placement: str,
        synced: Manifest | None,
    ) -> Service:
        opts = dataclasses.replace(self._options, compute=compute, placement=placement)
        opts = dataclasses.replace(opts, cpus=min(parse_cpus(opts.cpus), compute.cpu_count))
        handles = [self._create(opts, init_args, init_kwargs, synced) for _ in range(count)]
        return Service(self.__name__, handles, self._methods)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self.__name__} is a kt actor class: create it with "
            f"{self.__name__}.remote(...), not {self.__name__}(...)"
        )


class Service:
    """Instances of one class on every replica, called as one: least calls in flight first."""

    def __init__(
        self, name: str, handles: list[ActorHandle], methods: dict[str, MethodKind]
    ) -> None:
        self._name = name
        self._handles = handles
        self._methods = methods
        self._inflight = [0] * len(handles)

    def __getattr__(self, name: str) -> ServiceMethod:
        if name.startswith("_") and name != "__call__":
            raise AttributeError(name)
        if name not in self._methods:
            raise AttributeError(f"{self._name} has no method {name!r}")
        return ServiceMethod(self, name)

    def _pick(self) -> int:
        if len(self._handles) == 1:
            return 0
        return min(range(len(self._handles)), key=self._inflight.__getitem__)

    def teardown(self) -> None:
        for h in self._handles:
            kill(h)

    def alive(self) -> bool:
        """Every replica is up (or on its way); False once one is dead for good."""
        driver = get_driver()
        return not any(driver.is_dead(h._actor_id) for h in self._handles)


class ServiceMethod:
    def __init__(self, service: Service, name: str) -> None:
        self._service = service
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        s = self._service
        i = s._pick()
        ref = getattr(s._handles[i], self._name).remote(*args, **kwargs)
        if len(s._handles) > 1 and isinstance(ref, Ref):
            s._inflight[i] += 1

            def done(_: Any, i: int = i) -> None:
                s._inflight[i] -= 1

            ref.on_done(done)
        return ref

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ref = self.remote(*args, **kwargs)
        return list(ref) if isinstance(ref, StreamRef) else ref.result()


# -- functions ------------------------------------------------------------------------------
class _Function:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class _AsyncFunction(_Function):
    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.fn(*args, **kwargs)


class _GenFunction(_Function):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        yield from self.fn(*args, **kwargs)


class _AsyncGenFunction(_Function):
    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        async for item in self.fn(*args, **kwargs):
            yield item


_WRAPPERS: dict[MethodKind, type[_Function]] = {
    MethodKind.SYNC: _Function,
    MethodKind.ASYNC: _AsyncFunction,
    MethodKind.GEN: _GenFunction,
    MethodKind.ASYNC_GEN: _AsyncGenFunction,
}


class RemoteFunction(Generic[P, R]):
    """`kt.fn(f)`: `.remote(...)` on the default pool, or deploy with `.to(compute)`.

    Calling it directly is refused, as Ray refuses calling a remote function: a call
    that silently ran here instead of remotely would hide a missing `.remote`.
    """

    def __init__(self, fn: Callable[P, R], options: dict[str, Any] | None = None) -> None:
        if isinstance(fn, type):
            raise ConfigError(
                f"kt.fn takes a function; {fn.__name__} is a class: use kt.cls({fn.__name__})"
            )
        if not callable(fn):
            raise ConfigError(f"kt.fn takes a function, not {type(fn).__name__}")
        self._fn = fn
        self._options = options or {}
        self._lock = threading.Lock()
        self._default: Any = None
        self.__name__ = getattr(fn, "__name__", "function")

    def options(self, **options: Any) -> RemoteFunction[P, R]:
        """The same function with other options (`compute=`, `cpus=`, `max_concurrency=`...)."""
        check_option_names(f"{self.__name__}.options", options, _OPTION_NAMES)
        return RemoteFunction(self._fn, {**self._options, **options})

    @overload
    def to(self, compute: DistributedCompute, **options: Any) -> Any: ...

    @overload
    def to(self, compute: Compute | None = None, **options: Any) -> DeployedFunction[P, R]: ...

    def to(self, compute: Compute | None = None, **options: Any) -> Any:
        """Deploy: one instance per replica (a `DeployedFunction`, typed like the function),
        or an SPMD group on a `compute.distribute(...)` (calls return one result per rank)."""
        return self._deploy(compute, {**self._options, **options}, per_cpu=False)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> Ref[R]:
        """Call on the default pool (or `.options(compute=)`), deployed on first use."""
        with self._lock:
            if self._default is None:
                self._default = self._deploy(None, dict(self._options), per_cpu=True)
        deployed: Any = self._default
        return deployed.remote(*args, **kwargs)

    def _deploy(self, compute: Compute | None, options: dict[str, Any], *, per_cpu: bool) -> Any:
        """`per_cpu`: one instance per cpu of a pod (for `.remote`, so calls fanned out
        run in parallel) instead of one per replica."""
        target = compute or options.pop("compute", None) or config.default_compute
        options.pop("compute", None)
        cls = self._class(options)
        if per_cpu:
            count = max(int(target.cpu_count), 1)
            synced = cls._manifest(cls.actor_options)
            service = cls._service(target, count, (self._fn,), {}, placement="pack", synced=synced)
            return DeployedFunction(service)

        def make(synced: Manifest | None) -> Any:
            if target.distribution is not None:
                return _spmd(cls, target, (self._fn,), {}, function=True)
            return DeployedFunction(cls._make(target, (self._fn,), {}, synced))

        return cls._deployed(target, make, (self._fn,), {})

    def _class(self, options: dict[str, Any]) -> RemoteClass[Any]:
        wrapper = _WRAPPERS[method_kind(self._fn)]
        # calls are checked against the function's own signature, not the wrapper's
        checked = {"__module__": wrapper.__module__, CALL_ARITY: arity(self._fn, bound=False)}
        named = type(self.__name__, (wrapper,), checked)
        return RemoteClass(named, ActorOptions(**{"cpus": 0, **options}), identity=self._fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        raise TypeError(
            f"{self.__name__} is a kt remote function: call {self.__name__}.remote(...) "
            f"(the default pool) or deploy it with {self.__name__}.to(compute) and call what "
            "that returns"
        )


class DeployedFunction(Generic[P, R]):
    """A function running on a pool: call it, `.remote()` it, `.teardown()` it."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._call = service.__call__

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> Ref[R]:
        return self._call.remote(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._call(*args, **kwargs)

    def teardown(self) -> None:
        self._service.teardown()

    def alive(self) -> bool:
        return self._service.alive()


# -- SPMD groups live in kt.distributed, a layer above: it registers its factory here ------
SpmdFactory = Callable[..., Any]
_spmd_factories: list[SpmdFactory] = []


def register_spmd(factory: SpmdFactory) -> None:
    """Called by kt.distributed at import: builds groups for `compute.distribute(...)`."""
    _spmd_factories[:] = [factory]


def _spmd(
    remote_cls: RemoteClass[Any],
    compute: Compute,
    init_args: tuple[Any, ...],
    init_kwargs: dict[str, Any],
    *,
    function: bool = False,
) -> Any:
    if not _spmd_factories:
        raise ConfigError("SPMD groups need kt.distributed: `import kt` (it registers itself)")
    return _spmd_factories[0](remote_cls, compute, init_args, init_kwargs, function=function)


# -- module verbs --------------------------------------------------------------------------
def cls(target: type[T]) -> RemoteClass[T]:
    return RemoteClass(target)


def fn(target: Callable[P, R]) -> RemoteFunction[P, R]:
    return RemoteFunction(target)


def get(
    refs: Ref[Any] | Iterable[Ref[Any]] | str,
    timeout: float | None = None,
    *,
    into: MutableMapping[str, Any] | None = None,
    dest: str | os.PathLike[str] | None = None,
) -> Any:
    """The value of a Ref, or the values of a list of Refs (in order); given a str, the
    value the data store holds under that key (`kt.put`), copied in place into the state
    dict `into` when one is given, or its files written at `dest`.

    Raises:
        GetTimeoutError: not everything was ready within `timeout` seconds.
        DataKeyError: a key no pod holds (when no `timeout` is given).
        StateDictMismatchError: `into` does not match the stored state dict.
    """
    require_driver_thread("kt.get")
    if isinstance(refs, str):
        return datastore.get(refs, timeout, into=into, dest=dest)
    if into is not None or dest is not None:
        raise ConfigError("kt.get(..., into=/dest=) takes a data store key, not Refs")
    if isinstance(refs, Ref):
        return refs.result(timeout)
    if isinstance(refs, StreamRef):
        raise ConfigError(
            "kt.get does not take a stream (the Ref of a generator method): iterate it, "
            "`for x in stream` or `async for x in stream`, or `list(stream)` for all items"
        )
    items = _ref_list("kt.get", refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for i, ref in enumerate(items):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(ref.result(left))
        except GetTimeoutError:
            pending = sum(not r.done() for r in items[i:])
            raise GetTimeoutError(
                f"{pending} of {len(items)} Refs not ready after {seconds(timeout or 0)}"
            ) from None
    return out


def _ref_list(verb: str, refs: Any) -> list[Ref[Any]]:
    """`refs` as a list of Refs, or a ConfigError that says what the verb takes.

    Raises:
        ConfigError: not an iterable of Refs.
    """
    if isinstance(refs, str | bytes) or not isinstance(refs, Iterable):
        raise ConfigError(
            f"{verb} takes a Ref or a list of Refs, not {type(refs).__name__} "
            "(a value that is already here needs no get)"
        )
    items = list(refs)
    for i, ref in enumerate(items):
        if not isinstance(ref, Ref):
            what = "a stream: iterate it" if isinstance(ref, StreamRef) else type(ref).__name__
            raise ConfigError(f"{verb}: item {i} is {what}, not a Ref")
    return items


async def get_async(refs: Ref[Any] | Iterable[Ref[Any]], timeout: float | None = None) -> Any:
    if isinstance(refs, StreamRef):
        raise ConfigError("kt.get_async does not take a stream: `async for x in stream`")
    try:
        if isinstance(refs, Ref):
            return await asyncio.wait_for(refs, timeout)
        items = _ref_list("kt.get_async", refs)
        return await asyncio.wait_for(asyncio.gather(*items), timeout)
    except TimeoutError:
        raise GetTimeoutError(f"not ready after {seconds(timeout or 0)}") from None


def wait(
    refs: list[Ref[Any]], *, num_returns: int = 1, timeout: float | None = None
) -> tuple[list[Ref[Any]], list[Ref[Any]]]:
    """Block until `num_returns` Refs are done or `timeout` passes: (ready, pending).

    Raises:
        ConfigError: `refs` is not a list of Refs, or `num_returns` is more than it has.
    """
    if isinstance(refs, Ref):
        raise ConfigError(
            "kt.wait takes a list of Refs, not one Ref: kt.wait([ref]), or ref.result(timeout)"
        )
    refs = _ref_list("kt.wait", refs)
    if num_returns > len(refs):
        raise ConfigError(f"num_returns={num_returns} > {len(refs)} refs")
    event = threading.Event()
    counter = [0]
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            counter[0] += 1
            if counter[0] >= num_returns:
                event.set()

    for ref in refs:
        ref.on_done(one_done)
    event.wait(timeout)
    ready = [r for r in refs if r.done()][: max(num_returns, 0)] if num_returns else []
    ready_ids = {id(r) for r in ready}
    return ready, [r for r in refs if id(r) not in ready_ids]


def kill(handle: ActorHandle) -> None:
    """Kill an actor now; it is not restarted. Calls in flight raise ActorDiedError."""
    address = handle._wait_placed(timeout=config.placement_timeout)
    driver = get_driver()
    runtime = driver.runtime
    runtime.loop.call_soon_threadsafe(driver.mark_killed, handle._actor_id)
    req_id = runtime.new_id()
    done: Ref[None] = Ref("kill")
    frame = protocol.encode(FrameKind.KILL_ACTOR, req_id, {"actor": handle._actor_id})
    runtime.submit(address, handle._token, req_id, [frame], done)
    done.result(timeout=30)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of a named actor, made by this or any other driver (or actor).

    Raises:
        ConfigError: no live actor has that name.
    """
    require_driver_thread("kt.get_actor")
    driver = get_driver()
    handle = driver.runtime.run(driver.lookup(name, namespace), timeout=60)
    if handle is None:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise ConfigError(f"no live actor is named {name!r}{where}")
    return handle
