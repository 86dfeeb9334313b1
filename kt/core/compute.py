"""Specs of where code runs: `Compute` (a pool of pods) and `Image`.

Quantities are parsed here, once, at the API edge: cpus become floats, memory int bytes,
durations float seconds (STYLE: "Durations are float seconds and sizes are int bytes").
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from kt.core.errors import ConfigError, check_option_names
from kt.core.provider import backend_names

_MEM_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_MEM_QUANTITY = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*(" + "|".join(u for u in _MEM_UNITS if u) + r")?\s*"
)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_cpus(value: float | int | str) -> float:
    """`0.5`, `2`, `"500m"` -> cores."""
    if isinstance(value, int | float):
        cpus = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?m", value.strip()):
        cpus = float(value.strip()[:-1]) / 1000
    else:
        try:
            cpus = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"cpus={value!r} is not a quantity (try 1, 0.5 or '500m')") from None
    if cpus < 0:
        raise ConfigError(f"cpus={value!r} is negative")
    return cpus


def parse_memory(value: int | float | str | None) -> int:
    """`"2Gi"`, `"512Mi"`, `1e9` -> bytes; None -> 0 (no request)."""
    if value is None:
        return 0
    if isinstance(value, int | float):
        return int(value)
    m = _MEM_QUANTITY.fullmatch(value)
    if not m:
        raise ConfigError(f"memory={value!r} is not a quantity (try '512Mi' or '2Gi')")
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2) or ""])


def parse_duration(value: float | int | str | None) -> float | None:
    """`"30m"`, `"90s"`, `45` -> seconds; None stays None (never)."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not m:
        raise ConfigError(f"duration {value!r} is not valid (try '30m', '90s' or 45)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


@dataclass(frozen=True)
class ImageStep:
    """One step of an Image: "pip" (packages), "env" (name, value pairs), "bash" (a
    command) or "copy" (local path, destination)."""

    kind: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        if self.kind == "pip":
            return f"pip_install({list(self.args)})"
        if self.kind == "env":
            pairs = ", ".join(
                f"{k}={v!r}" for k, v in zip(self.args[::2], self.args[1::2], strict=True)
            )
            return f"set_env({pairs})"
        if self.kind == "bash":
            return f"run_bash({self.args[0]!r})"
        return f"copy({self.args[0]!r}, {self.args[1]!r})"


@dataclass(frozen=True)
class Image:
    """What a pod's container holds: a base image, then steps run on the pod, in order,
    before its actors start (`kt.core.image`). Each method returns a new Image."""

    base: str = "python:3.11-slim"
    steps: tuple[ImageStep, ...] = ()

    def _with(self, kind: str, *args: str) -> Image:
        return dataclasses.replace(self, steps=(*self.steps, ImageStep(kind, args)))

    def pip_install(self, packages: list[str]) -> Image:
        if isinstance(packages, str):
            raise ConfigError(f"pip_install takes a list of packages: pip_install([{packages!r}])")
        return self._with("pip", *packages)

    def set_env(self, **env: str) -> Image:
        return self._with("env", *(x for kv in env.items() for x in (kv[0], str(kv[1]))))

    def run_bash(self, command: str) -> Image:
        return self._with("bash", command)

    def copy(self, local_path: str, dest: str) -> Image:
        """A local file into the pod at `dest` (on the local backend, under the pod's
        image directory: pods there share the host's disk)."""
        return self._with("copy", str(local_path), dest)


@dataclass(frozen=True)
class Distribution:
    """How an SPMD group spreads over a pool: `workers` pods x `procs_per_worker` ranks."""

    kind: str
    workers: int
    procs_per_worker: int


@dataclass(frozen=True)
class Compute:
    """A pool of identical pods. Fixed (`replicas`) or elastic (`min_replicas..max_replicas`).

    A Compute is a spec (what was asked for); the driver's scheduler owns the pool that
    exists for it. Two equal Computes name the same pool.
    """

    cpus: float | int | str = 1
    memory: int | float | str | None = None
    gpus: int = 0
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    image: Image = field(default_factory=Image)
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class: str | None = None
    service_account: str | None = None
    inactivity_ttl: float | int | str | None = "30m"
    idle_timeout: float | int | str | None = None
    launch_timeout: float = 600
    backend: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    distribution: Distribution | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Compute:
        """Refuses a misspelt field with the fix (`cpu=` -> did you mean 'cpus'?)."""
        check_option_names("kt.Compute", kwargs, _COMPUTE_FIELDS)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        cpus = parse_cpus(self.cpus)
        object.__setattr__(self, "cpus", cpus)
        object.__setattr__(self, "memory", parse_memory(self.memory))
        object.__setattr__(self, "inactivity_ttl", parse_duration(self.inactivity_ttl))
        object.__setattr__(self, "idle_timeout", parse_duration(self.idle_timeout))
        if self.gpus < 0:
            raise ConfigError(f"gpus={self.gpus} is negative")
        if self.replicas is not None and (
            self.min_replicas is not None or self.max_replicas is not None
        ):
            raise ConfigError("give either replicas= or min_replicas=/max_replicas=, not both")
        lo, hi = self.replica_range
        if lo < 0 or hi < 1 or lo > hi:
            raise ConfigError(f"replica range {lo}..{hi} is empty (need 0 <= min <= max, max >= 1)")
        if self.backend is not None and self.backend not in backend_names():
            names = ", ".join(repr(n) for n in backend_names())
            raise ConfigError(f"backend={self.backend!r}: choose {names} or None")
        if self.name is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name
        ):
            raise ConfigError(
                f"name={self.name!r}: use lower-case letters, digits and '-' (a DNS label)"
            )

    @property
    def replica_range(self) -> tuple[int, int]:
        if self.replicas is not None:
            return self.replicas, self.replicas
        lo = self.min_replicas if self.min_replicas is not None else 0
        hi = self.max_replicas if self.max_replicas is not None else max(lo, 1)
        return lo, hi

    @property
    def cpu_count(self) -> float:
        return float(self.cpus)  # parsed in __post_init__

    @property
    def memory_bytes(self) -> int:
        return int(self.memory or 0)

    @property
    def idle_seconds(self) -> float | None:
        """How long a pod with no actors lives (None: kt.config.idle_timeout)."""
        return None if self.idle_timeout is None else float(self.idle_timeout)

    @property
    def ttl_seconds(self) -> float | None:
        return None if self.inactivity_ttl is None else float(self.inactivity_ttl)

    def pool_name(self) -> str:
        """The pool's name: `name`, or a stable digest of the spec."""
        if self.name:
            return self.name
        digest = hashlib.sha1(repr(self._key()).encode()).hexdigest()[:8]
        return f"pool-{digest}"

    def _key(self) -> tuple[Any, ...]:
        return (
            self.cpus,
            self.memory,
            self.gpus,
            self.replica_range,
            self.image.base,  # steps run on the pods a pool already has: not part of it
            sorted(self.env.items()),
            self.backend,
            sorted(self.resources.items()),
            self.distribution,
        )

    def distribute(
        self, kind: str, *, workers: int = 1, procs_per_worker: int = 1
    ) -> DistributedCompute:
        """A Compute for SPMD groups: `workers` pods, each running `procs_per_worker` ranks."""
        if kind not in ("pytorch", "spmd"):
            raise ConfigError(f"distribute({kind!r}): choose 'pytorch' or 'spmd'")
        if workers < 1 or procs_per_worker < 1:
            raise ConfigError("workers and procs_per_worker must be at least 1")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(
            replicas=workers,
            min_replicas=None,
            max_replicas=None,
            distribution=Distribution(kind, workers, procs_per_worker),
        )
        return DistributedCompute(**fields)


@dataclass(frozen=True)
class DistributedCompute(Compute):
    """What `Compute.distribute()` returns: `.to()` on it makes an SPMD group (its own
    type, so that type checkers tell a group, whose calls return one result per rank,
    from a deployed function)."""


_COMPUTE_FIELDS = frozenset(f.name for f in dataclasses.fields(Compute))
