"""The provider interface: how pods come and go, and the registry that picks one by name.

A provider knows nothing of actors; the scheduler (kt.actors) asks it for pods. Backends
are looked up by name and imported on first use, so `kt.core` never imports `kt.local`
or `kt.k8s` at import time.
"""

from __future__ import annotations

import abc
import enum
import importlib
import importlib.util
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kt.core.errors import ConfigError

if TYPE_CHECKING:
    from kt.core.compute import Compute
    from kt.core.dial import Route

SUPERVISOR_PORT = 7170
"""The call-channel port every supervisor listens on; control HTTP is on the next one."""

_BACKENDS = {
    "local": "kt.local.provider:LocalProvider",
    "k8s": "kt.k8s.provider:K8sProvider",
}
_instances: dict[str, Provider] = {}


class PodState(str, enum.Enum):
    """PENDING -> READY -> (LOST | DELETED); PENDING -> FAILED. LOST, FAILED, DELETED are final."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    LOST = "lost"
    DELETED = "deleted"


@dataclass(frozen=True)
class PodSpec:
    """What the scheduler asks a provider for: one pod of a pool."""

    pool: str
    name: str
    cpus: float
    memory: int
    gpus: int
    token: str
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    inactivity_ttl: float | None = None
    launch_timeout: float = 600
    detached: bool = False
    image: str = "python:3.11-slim"
    namespace: str | None = None
    compute: Compute | None = None
    """The whole Compute, for backends that place every field (Kubernetes)."""


@dataclass
class Pod:
    """A pod that exists (or existed): the address its supervisor listens on."""

    name: str
    pool: str
    host: str
    port: int
    state: PodState = PodState.PENDING
    reason: str = ""
    oom: bool = False
    """It ended because it went over its memory limit (the reason says which)."""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(frozen=True)
class PodEvent:
    pod: Pod
    state: PodState


class Provider(abc.ABC):
    """Creates, deletes, lists and watches pods for one backend."""

    name: str = ""

    @abc.abstractmethod
    async def create_pods(self, specs: list[PodSpec]) -> list[Pod]:
        """Create the pods and return them once their supervisors accept connections.

        Raises:
            LaunchError: a pod could not start within its launch_timeout.
        """

    @abc.abstractmethod
    async def delete_pod(self, pool: str, name: str) -> None:
        """Delete one pod (and every process in it). Deleting a missing pod is a no-op."""

    @abc.abstractmethod
    async def list_pods(self, pool: str | None = None) -> list[Pod]:
        """The pods that exist now, of one pool or of all.

        Raises:
            PodLostError: the backend could not be reached.
        """

    @abc.abstractmethod
    def watch_pods(self, pool: str) -> AsyncIterator[PodEvent]:
        """Pod state changes of a pool, as they happen."""

    def open_pool(self, pool: str, namespace: str | None) -> None:
        """The driver is about to use `pool`, which lives in `namespace` (None: the
        backend's default); every later call about the pool goes there."""
        return None

    async def release_pool(self, pool: str) -> None:
        """This driver is done with the pool (its own pods are deleted): remove what the
        pool owns once no pod of it is left (another driver may still use it)."""
        return None

    async def delete_pool(self, pool: str) -> int:
        """Delete every pod of a pool and what the pool owns; returns how many pods."""
        pods = await self.list_pods(pool)
        for pod in pods:
            await self.delete_pod(pool, pod.name)
        return len(pods)

    @abc.abstractmethod
    def logs(
        self, pool: str, pod: str | None = None, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """What the pool's pods (or one of them) printed (`tail`: only each pod's last
        lines); with `follow`, then what they print next, until interrupted.

        Raises:
            ConfigError: no pod of that pool (or of that name) has logs.
        """

    async def delete_own_pod(self, name: str) -> None:
        """Called in a pod whose supervisor stopped for inactivity_ttl: remove the pod
        itself (on Kubernetes through its service account). Where the supervisor's exit
        ends the pod, nothing is left to do."""
        return None

    async def close(self) -> None:
        """Release what the provider holds open on the current event loop (its clients)."""
        return None

    async def read_token(self, pool: str) -> str | None:
        """The token of an existing pool, for a second driver; None when unknown."""
        return None

    async def route(self) -> Route:
        """How this backend's pods are reached, and why (`kt config`)."""
        from kt.core.config import config  # config -> compute -> this module
        from kt.core.dial import How, Route

        if config.gateway:
            return Route(How.GATEWAY, f"through the gateway {config.gateway} (KT_GATEWAY)")
        return Route(How.DIRECT, "the pods run on this machine")


def resolve_backend(requested: str | None) -> str:
    """`requested`, else KT_BACKEND, else k8s when a cluster config is found, else local."""
    return explain_backend(requested)[0]


def explain_backend(requested: str | None) -> tuple[str, str]:
    """The backend `resolve_backend` picks, and why (for `kt config`)."""
    if requested:
        return requested, "asked for"
    env = os.environ.get("KT_BACKEND")
    if env:
        if env not in _BACKENDS:
            raise ConfigError(f"KT_BACKEND={env!r}: choose one of {sorted(_BACKENDS)}")
        return env, f"KT_BACKEND={env}"
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    found = f"kubeconfig {kubeconfig}" if os.path.exists(kubeconfig) else "a service account"
    if os.path.exists(kubeconfig) or in_cluster:
        if _importable("kt.k8s.provider"):
            return "k8s", f"{found} was found"
        return "local", f"{found} was found, but kt-runtime[k8s] is not installed"
    return "local", f"no kubeconfig at {kubeconfig} and no service account"


def _importable(module: str) -> bool:
    """Whether a backend's module is installed (the k8s one is an optional part)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def register_backend(name: str, target: str) -> None:
    """Make backend `name` mean the Provider class at `target` ("module:Class").

    Raises:
        ConfigError: `target` is not of the form "module:Class".
    """
    module, _, cls_name = target.partition(":")
    if not module or not cls_name.isidentifier():
        raise ConfigError(f"backend {name!r}: {target!r} is not 'module:Class'")
    _BACKENDS[name] = target
    _instances.pop(name, None)


def get_provider(name: str) -> Provider:
    """The provider for a backend name, imported and created on first use."""
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose one of {sorted(_BACKENDS)}")
    if name not in _instances:
        module_name, _, cls_name = _BACKENDS[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"backend {name!r} is not available: {exc}. Install kt-runtime[{name}]"
            ) from exc
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Provider)):
            raise ConfigError(f"backend {name!r}: {_BACKENDS[name]} is not a kt Provider class")
        _instances[name] = cls()
    return _instances[name]
