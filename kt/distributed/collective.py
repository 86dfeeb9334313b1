"""Collective groups among existing actors, and state-dict broadcast over them (RL weight sync).

Who calls it: users, from the driver (`collective_group`, `CollectiveGroup.broadcast_state_dict`)
and inside member actors (`broadcast_state_dict`). Typical members: rank 0 of a trainer
SPMD group plus the rollout actors.

Theory of operation: a trainer rank is already in its group's default process group, and
`dist.new_group` cannot help (every default-group rank must call it, and the rollout
actors are not in that group). So a collective group is a separate gloo ProcessGroup on
its own TCPStore, which member 0 hosts on a free port of its pod; each member builds it
through `ActorHandle._run`, so the user's classes need not know. Each member process
keeps its groups by name in `_MEMBERSHIPS`. A broadcast sends the source's tensor layout
through the store, then every tensor's bytes as one uint8 buffer in one collective, so
any dtype goes through gloo and receivers update their tensors in place (a module's
`state_dict()` aliases its parameters, so the module itself changes).

With `backend="nccl"` the ProcessGroup is NCCL's and the one buffer lives on the
member's own device (`cuda:<LOCAL_RANK>` in a rank, `cuda:0` in an actor, which sees
only its own devices): CUDA tensors go GPU to GPU with no host copy, and a CPU tensor
on either side is copied to or from the device. Every member needs a CUDA device of its
own (NCCL refuses two members on one device); gloo stays the CPU path.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kt.actors.api import get
from kt.actors.direct import make_group
from kt.core.errors import ConfigError
from kt.core.methods import actor_hook
from kt.distributed.fanout import RankView

if TYPE_CHECKING:
    from kt.actors.handle import ActorHandle

logger = logging.getLogger(__name__)
BACKENDS = ("gloo", "nccl")


@dataclass
class _Membership:
    """This process's place in one collective group (lives in each member process)."""

    rank: int
    size: int
    store: Any
    pg: Any
    device: str = "cpu"  # where a broadcast's buffer lives: cuda:i for NCCL
    seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_MEMBERSHIPS: dict[str, _Membership] = {}
_HOSTED_STORES: dict[str, Any] = {}


@dataclass(frozen=True)
class CollectiveGroup:
    """Actors joined into one torch process group; picklable, so members can be given it.

    Set against an SPMD group: that one *starts* its ranks with torchrun's environment;
    this one joins actors that already exist, whatever made them.
    """

    name: str
    backend: str
    members: tuple[ActorHandle, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    def broadcast_state_dict(
        self, source: str, *, src: int = 0, timeout: float | None = 300.0
    ) -> None:
        """From the driver: every member broadcasts `instance.<source>` from member `src`.

        `source` names an attribute on each member's instance: a module (its
        `state_dict()` is used) or a dict of tensors. Blocks until every member is done.
        """
        refs = [h.run_hook(_broadcast_attribute, self.name, source, src) for h in self.members]
        get(refs, timeout=timeout)

    def destroy(self, timeout: float | None = 60.0) -> None:
        """Every member leaves the group and frees its sockets."""
        get([h.run_hook(_leave, self.name) for h in self.members], timeout=timeout)


def collective_group(
    handles: Sequence[ActorHandle | RankView],
    backend: str = "gloo",
    *,
    name: str | None = None,
    timeout: float = 300.0,
) -> CollectiveGroup:
    """Join existing actors into a new process group; member i has rank i in it.

    `handles` may hold actor handles and single-rank views (`group.rank(0)`).

    Raises:
        ConfigError: an unknown backend, fewer than two members, or a name in use.
        GetTimeoutError: not every member joined within `timeout` seconds.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: collective groups support {BACKENDS}")
    members = tuple(h.handle(timeout) if isinstance(h, RankView) else h for h in handles)
    if len(members) < 2:
        raise ConfigError("a collective group needs at least two members")
    name = name or f"kt-collective-{uuid.uuid4().hex[:8]}"
    host = members[0].wait_placed(timeout)[0]
    size = len(members)
    port = members[0].run_hook(_host_store, name, host, size, timeout).result(timeout)
    refs = [
        h.run_hook(_join, name, host, port, rank, size, timeout, backend)
        for rank, h in enumerate(members)
    ]
    get(refs, timeout=timeout)
    logger.info("collective group %s: %d members, store %s:%d", name, size, host, port)
    return CollectiveGroup(name, backend, members)


def broadcast_state_dict(
    state_dict: dict[str, Any] | None,
    *,
    group: CollectiveGroup | str,
    src: int = 0,
) -> dict[str, Any]:
    """Inside a member: broadcast member `src`'s state dict; returns this member's copy.

    Every member calls it with its own dict of the same keys and shapes (updated in place)
    or with None (a new dict is returned). Non-tensor values are copied too.

    Raises:
        ConfigError: this process is not in the group, or its dict does not match.
    """
    import torch
    import torch.distributed as dist

    member = _membership(group)
    with member.lock:
        member.seq += 1
        key = f"kt/bsd/{member.seq}"
        problem = ""
        if member.rank == src:
            if state_dict is None:
                raise ConfigError("the source member must pass its state dict")
            layout = _layout(state_dict)
            member.store.set(key, pickle.dumps(layout))
        else:
            layout = pickle.loads(member.store.get(key))
            if state_dict is None:
                state_dict = _allocate(layout, member.device)
            problem = _mismatch(state_dict, layout)
        offsets, total = _offsets(layout)
        buf = torch.empty(total, dtype=torch.uint8, device=member.device)
        if member.rank == src:
            for (k, *_), (start, nbytes) in zip(layout, offsets, strict=True):
                if nbytes:
                    buf[start : start + nbytes].copy_(_bytes_of(state_dict[k], member.device))
        if total:  # a receiver that does not match still takes part: no one is left hanging
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            member.pg.broadcast([buf], opts).wait()
        if problem:
            raise ConfigError(problem)
        if member.rank != src:
            for (k, kind, value, _, _), (start, nbytes) in zip(layout, offsets, strict=True):
                if kind != "tensor":
                    state_dict[k] = value
                elif nbytes:
                    target = state_dict[k]
                    chunk = buf[start : start + nbytes].view(target.dtype).view(target.shape)
                    target.copy_(chunk)
        return state_dict


# -- run inside member processes (through ActorHandle._run) ---------------------------------
@actor_hook
def _host_store(instance: Any, name: str, host: str, size: int, timeout: float) -> int:
    import torch.distributed as dist

    if name in _MEMBERSHIPS or name in _HOSTED_STORES:
        raise ConfigError(f"a collective group named {name!r} already exists in this actor")
    store = dist.TCPStore(host, 0, size, True, timedelta(seconds=timeout), wait_for_workers=False)
    _HOSTED_STORES[name] = store
    port: int = store.port
    return port


@actor_hook
def _join(
    instance: Any,
    name: str,
    host: str,
    port: int,
    rank: int,
    size: int,
    timeout: float,
    backend: str = "gloo",
) -> int:
    import torch.distributed as dist

    if name in _MEMBERSHIPS:
        raise ConfigError(f"this actor is already in collective group {name!r}")
    store = _HOSTED_STORES.pop(name, None)  # dropped with this frame if the device check fails
    device = _nccl_device(rank) if backend == "nccl" else "cpu"
    if store is None:
        store = dist.TCPStore(host, port, size, False, timedelta(seconds=timeout))
    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
    pg = make_group(store, f"kt/{name}/pg", rank, size, backend, timeout)
    _MEMBERSHIPS[name] = _Membership(rank, size, store, pg, device)
    return rank


def _nccl_device(rank: int, environ: dict[str, str] | None = None) -> str:
    """This member's device for NCCL: `cuda:<LOCAL_RANK>` in a rank, else `cuda:0`.

    Raises:
        ConfigError: no CUDA device here, or NCCL is not built into this torch.
    """
    import torch
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    where = f"member {rank} (pod {env.get('KT_POD', '?')})"
    if not dist.is_nccl_available():
        why = "this torch has no NCCL (a CPU build)"
    elif not torch.cuda.is_available():
        visible = env.get("CUDA_VISIBLE_DEVICES", "unset")
        why = f"it has no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
    else:
        why = ""
    if why:
        raise ConfigError(
            f"backend='nccl': {where} cannot use it: {why}. Give every member a GPU of its "
            "own (.options(gpus=1)) on a CUDA build of torch, or use backend='gloo', the "
            "CPU path"
        )
    local = env.get("LOCAL_RANK", "")
    index = int(local) if local.isdigit() and int(local) < torch.cuda.device_count() else 0
    return f"cuda:{index}"


@actor_hook
def _leave(instance: Any, name: str) -> None:
    _MEMBERSHIPS.pop(name, None)
    _HOSTED_STORES.pop(name, None)


@actor_hook
def _broadcast_attribute(instance: Any, name: str, source: str, src: int) -> None:
    target: Any = instance
    for part in source.split("."):
        target = getattr(target, part)
    sd = target.state_dict() if hasattr(target, "state_dict") else target
    broadcast_state_dict(sd, group=name, src=src)


def _membership(group: CollectiveGroup | str) -> _Membership:
    name = group if isinstance(group, str) else group.name
    member = _MEMBERSHIPS.get(name)
    if member is None:
        raise ConfigError(
            f"this process is not in collective group {name!r}: join it with "
            "kt.distributed.collective_group([...]) from the driver first"
        )
    return member


Layout = list[tuple[str, str, Any, tuple[int, ...], int]]


def _layout(state_dict: dict[str, Any]) -> Layout:
    """(key, 'tensor' | 'value', value-or-dtype, shape, nbytes) for each entry, in order."""
    import torch

    out: Layout = []
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            out.append((key, "tensor", value.dtype, tuple(value.shape), value.nbytes))
        else:
            out.append((key, "value", value, (), 0))
    return out


def _bytes_of(tensor: Any, device: str = "cpu") -> Any:
    import torch

    flat = tensor.detach().to(device).contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)


def _offsets(layout: Layout) -> tuple[list[tuple[int, int]], int]:
    """Where each entry's bytes go in the one buffer; 16-byte aligned, so views are legal."""
    out, cursor = [], 0
    for _, kind, _, _, nbytes in layout:
        if kind != "tensor":
            nbytes = 0
        out.append((cursor, nbytes))
        cursor += -(-nbytes // 16) * 16
    return out, cursor


def _allocate(layout: Layout, device: str = "cpu") -> dict[str, Any]:
    import torch

    return {
        k: torch.empty(shape, dtype=dtype, device=device) if kind == "tensor" else dtype
        for k, kind, dtype, shape, _ in layout
    }


def _mismatch(state_dict: dict[str, Any], layout: Layout) -> str:
    """Why this member's dict cannot take the source's, or ''."""
    for k, kind, dtype, shape, _ in layout:
        if kind != "tensor":
            continue
        mine = state_dict.get(k)
        if mine is None or tuple(mine.shape) != shape or mine.dtype != dtype:
            got = "nothing" if mine is None else f"{tuple(mine.shape)} {mine.dtype}"
            return f"state dict entry {k!r}: the source has {shape} {dtype}, this member {got}"
    return ""
