"""The driver's record of one actor: what was asked for, and where it lives now.

An `ActorSpec` is to an `Actor` as a class is to an object: the spec is frozen (the
pickled class and init arguments, the request, the restart budget) and is used again
for every restart; the `Actor` holds this incarnation's handle, pool and slot. The
actor's phase, restarts and death live in the control plane (`kt.actors.control`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kt.actors.scheduler import PodSlot, Pool, Request
from kt.core.compute import Compute
from kt.core.serialization import Parts
from kt.core.sync import Manifest

if TYPE_CHECKING:
    from kt.actors.handle import ActorHandle


@dataclass(frozen=True)
class ActorSpec:
    actor_id: str
    cls_name: str
    header: dict[str, Any]
    parts: Parts
    compute: Compute
    request: Request
    max_restarts: int
    placement_timeout: float
    detached: bool
    sync: Manifest | None = None
    """The project version its pod must hold before the CREATE (None: no sync)."""
    image: tuple[str, list[dict[str, Any]]] | None = None
    """(key, wire steps) of the pool's kt.Image, run on the pod before the CREATE."""


@dataclass
class Actor:
    spec: ActorSpec
    handle: ActorHandle
    pool: Pool | None = None
    slot: PodSlot | None = None
