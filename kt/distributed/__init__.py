"""kt.distributed: SPMD groups with torchrun's contract, and collective groups among actors.

Owns: rank layout and environment (`env`), the per-attempt agent that reserves
MASTER_PORT and hosts the agent store (`agent`), the group and its restarts (`group`,
`state`), fanning calls out to ranks (`fanout`), and process groups joining existing
actors for weight broadcast (`collective`). Never does: open sockets of its own beyond
torch's store (and the one port the agent reserves for it), or import torch at import
time: torch is an optional extra (`kt[torch]`), imported inside the functions that use it.

Importing this package registers SPMD groups with `kt.actors.api`, so that `kt.fn(f).to(c)`
and `kt.cls(C).to(c)` on `c = compute.distribute(...)` build an `SpmdGroup`.
"""

from __future__ import annotations

from typing import Any

from kt.actors.api import RemoteClass, register_spmd
from kt.core.compute import Compute
from kt.distributed.collective import CollectiveGroup, broadcast_state_dict, collective_group
from kt.distributed.fanout import GroupMethod, RankView
from kt.distributed.group import SpmdGroup
from kt.distributed.state import GroupState


def _make_group(
    remote_cls: RemoteClass[Any],
    compute: Compute,
    init_args: tuple[Any, ...],
    init_kwargs: dict[str, Any],
    *,
    function: bool = False,
) -> SpmdGroup:
    # `function` needs no special case: a kt.fn's wrapper class has `__call__`, which is
    # what `group(...)` calls.
    return SpmdGroup(remote_cls, compute, init_args, init_kwargs)


register_spmd(_make_group)

__all__ = [
    "CollectiveGroup",
    "GroupMethod",
    "GroupState",
    "RankView",
    "SpmdGroup",
    "broadcast_state_dict",
    "collective_group",
]
