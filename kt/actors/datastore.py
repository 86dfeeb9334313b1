"""The data store: `kt.put` / `kt.get` / `kt.ls` / `kt.rm`, from the driver, an actor or a rank.

A value lives in the supervisor of the pod that put it (`kt.supervisor.datastore`): an
actor's or rank's own pod, or, from the driver, the first pod of the pool it made last;
with `lifetime="detached"`, the namespace's store pod (`STORE`).
It is pickled once where it is put (pickle 5: an array's bytes are out-of-band buffers,
never pickled) and stays those bytes on its pod, which never unpickles it.

Putting: the pod reserves a buffer of the value's size, or refuses it whole when it has
no room (DataTooLargeError); a putter that shares the pod's /dev/shm writes the bytes into
it itself (one copy), any other sends them in `WRITE_CHUNK` pieces; `seal` publishes it.

Getting: the key is located (the pod that answered last for this key, this process's own
pod, pods that held keys before, its driver's pools, then every ready kt pod the provider
lists). A getter that shares the holder's /dev/shm maps the value's file: no copy, arrays
are views on it (private: writes stay in the getter). A getter inside another pod asks
its own supervisor for the value, which pulls a replica through the value's broadcast
tree (`kt.supervisor.pull`) once for all that pod's getters, then maps it (or is sent it).
A driver off the pods' host is sent the bytes. `into=` copies a state dict's tensors into
the caller's own, in place, after checking every key, shape and dtype.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import mmap
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from kt.actors import direct, files, hotmaps
from kt.actors.driver import current_driver, get_driver, get_runtime, ready_pods_with_tokens
from kt.core import dial, protocol, serialization, shm
from kt.core.errors import (
    ConfigError,
    DataKeyError,
    DataTooLargeError,
    GetTimeoutError,
    KtError,
    PodLostError,
    StateDictMismatchError,
    ValueGoneError,
)
from kt.core.protocol import FrameKind
from kt.core.ref import Ref
from kt.core.runtime import Address

logger = logging.getLogger(__name__)
POLL_S = 0.2  # how often a `kt.get(key, timeout=...)` looks again for a key not there yet
ASK_S = 30.0  # one pod's answer to a question
LAUNCH_S = 600.0  # a put from the driver waits this long for a pod its pools are starting
MOVE_S = 600.0  # one pod's answer when it moves a value's bytes
WRITE_CHUNK = 64 * 2**20
RECENT = 16  # pods that held keys, asked first
LISTING_S = 1.0  # how long the provider's listing of pods is taken as it was
RETRIES = 3  # reads of a located key that may fail (its pod lost, its file replaced)
ALIGN_FROM = 2**20  # a buffer this large is placed where it copies fastest

_where: dict[str, tuple[Address, str, str]] = {}  # key -> the pod that answered last
# (its address, its pool's token, its name)
_recent: OrderedDict[Address, str] = OrderedDict()  # pods that held keys, newest last


def put(key: str, value: Any, *, lifetime: str | None = None, transport: str | None = None) -> None:
    """Store `value` under `key`, replacing what was there; held by this process's pod
    for its pool's life, or with `lifetime="detached"` by the namespace's store pod
    (`STORE`), which outlives every driver until `kt teardown`.

    A path (`pathlib.Path`, or a str naming an existing file or directory) stores the
    files there (`kt.get(key, dest=...)` writes them).

    `transport`: a state dict of CUDA tensors put from an actor or a rank ("nccl" when
    None) also stays on its device, copied, in this process, and `kt.get(key, into=)`
    of CUDA tensors receives it GPU to GPU over NCCL; "gloo" does the same for CPU
    tensors; "store" keeps only the pod's host copy. Every other get reads that copy.

    Raises:
        ConfigError: the key is not a non-empty str, the driver has no pod to hold it, a
            path cannot be read, or the transport does not suit the value or process.
        SerializationError: the value cannot be pickled (the path to the culprit named).
        DataTooLargeError: the pod has no room for it (nothing was stored).
    """
    _check_key(key)
    if lifetime not in (None, "detached"):
        raise ConfigError(f"lifetime={lifetime!r}: choose None (its pool's) or 'detached'")
    if files.is_path(value):
        value = files.pack(value)
    mine = _own_pod()
    how = direct.transport_for(value, transport, in_worker=mine is not None, key=key)
    parts = serialization.dumps_value(value, f"kt.put({key!r})")
    size = serialization.parts_size(parts)
    address, token = _store_pod() if lifetime == "detached" else _home()
    hotmaps.sweep()  # kept mappings of files gone hold memory the pod may need now
    try:
        reserved = _ask(address, token, {"op": "reserve", "k": key, "n": size})
    except DataTooLargeError:
        if not hotmaps.cool():  # or this process's kept mappings held the room
            raise
        reserved = _ask(address, token, {"op": "reserve", "k": key, "n": size})
    put_id = reserved["id"]
    try:
        seal: dict[str, Any] = {"op": "seal", "id": put_id}
        if how != "store" and mine is not None:
            tensors = direct.tensors_of(value)
            assert tensors is not None  # transport_for checked
            still = _still_held(key, put_id, address, token)
            try:
                seal["dev"] = direct.hold(key, put_id, tensors, how, (mine[0][0], mine[1]), still)
            except ConfigError as exc:
                if transport is not None:
                    raise
                logger.info("%s: getters read the pod's copy", exc)  # chosen for it: no error
        start = _write_file(reserved["file"], parts) if reserved["file"] else None
        if start is None:
            refs = [
                _submit(address, token, {"op": "write", "id": put_id, "off": offset}, piece)
                for offset, piece in _pieces(parts, WRITE_CHUNK)
            ]
            for ref in refs:
                ref.result(timeout=MOVE_S)
        else:
            seal["start"] = start
        _ask(address, token, seal)
        direct.sealed(key, put_id)
    except BaseException:
        direct.forget(key, put_id)
        _ask(address, token, {"op": "abandon", "id": put_id})
        raise
    _found(key, address, token, "")


def _still_held(key: str, vid: str, address: Address, token: str) -> Callable[[], bool]:
    """Whether the pod at `address` still holds value `vid` of `key` (a held copy's
    sweep asks; raises when the pod does not answer)."""

    def still() -> bool:
        try:
            return bool(_ask(address, token, {"op": "locate", "k": key})["vid"] == vid)
        except DataKeyError:
            return False

    return still


def get(
    key: str,
    timeout: float | None = None,
    *,
    into: MutableMapping[str, Any] | None = None,
    dest: str | os.PathLike[str] | None = None,
) -> Any:
    """The value stored under `key`; waits up to `timeout` s for it to appear.

    With `into` (a state dict: names -> tensors or arrays), the stored one's tensors are
    copied into its own, in place, and `into` is returned. With `dest`, files put from a
    path are written there (a directory's under it), and the path written is returned.

    Raises:
        DataKeyError: no pod holds `key` (and `timeout` is None): names the nearest keys.
        GetTimeoutError: `timeout` passed and no pod held it.
        PodLostError: the pod holding it went away (naming the key and the pod).
        StateDictMismatchError: `into` does not match the stored state dict (nothing copied).
        ConfigError: `dest` for a value that is not files, or none for files.
    """
    _check_key(key)
    if into is not None and dest is not None:
        raise ConfigError("kt.get takes into= (a state dict) or dest= (files), not both")
    deadline = None if timeout is None else time.monotonic() + timeout
    lost: PodLostError | None = None
    misses = 0  # reads that failed after the key was located
    while True:
        found = _locate(key) if misses <= RETRIES else None
        if found is not None:
            address, token, meta = found
            if into is not None and meta.get("dev") and _direct(key, address, token, meta, into):
                return into
            try:
                value, mapping = _read(key, address, token, meta)
                break
            except PodLostError as exc:
                _where.pop(key, None)
                _recent.pop(address, None)
                lost = exc
                misses += 1
                continue  # another pod may hold it now
            except (FileNotFoundError, ValueGoneError):
                misses += 1
                continue  # replaced or removed since it was located
        if lost is not None:
            raise PodLostError(lost.pod, f"it held {key!r}, and no other pod has it") from lost
        if deadline is None:
            raise DataKeyError(key, _nearest(key))
        if time.monotonic() >= deadline:
            raise GetTimeoutError(f"no value was stored under key {key!r} within {timeout} s")
        time.sleep(POLL_S)
    if isinstance(value, files.FileTree) != (dest is not None):
        if dest is None:
            raise ConfigError(
                f"{key!r} holds {len(value.files)} files put from {value.name!r}: pass "
                "dest= the path to write them to"
            )
        raise ConfigError(
            f"{key!r} holds a {type(value).__name__}, not files: dest= is for keys put from a path"
        )
    if dest is not None:
        return files.unpack(value, dest, key)
    if into is None:
        return value
    copy_into(into, value, key, mapping)
    return into


def ls(prefix: str = "") -> dict[str, int]:
    """Every stored key that starts with `prefix`, with its value's size in bytes."""
    out: dict[str, int] = {}
    for address, token in _holders():
        try:
            out.update(_ask(address, token, {"op": "ls", "p": prefix}))
        except (PodLostError, GetTimeoutError):
            continue  # a pod ending meanwhile holds nothing any more
    return dict(sorted(out.items()))


def _direct(
    key: str, address: Address, token: str, meta: dict[str, Any], into: MutableMapping[str, Any]
) -> bool:
    """Fill `into` straight from the process that put the value (`kt.actors.direct`);
    False when it cannot (read the store): also from a driver that reaches the pods
    through a gateway, which cannot dial the putter.

    Raises:
        StateDictMismatchError: `into` does not match the value (nothing copied).
    """
    if _own_pod() is None and not dial.reached_directly(address):
        return False
    with direct.offer(meta["dev"], key, meta["vid"], token, into) as offer:
        if offer is None:
            return False
        try:
            check_into(into, offer.specs, key)
        except StateDictMismatchError:
            offer.decline()
            raise
        return offer.take(into)


def rm(key: str) -> None:
    """Remove `key` from every pod that holds it.

    Raises:
        DataKeyError: no pod held it.
    """
    _check_key(key)
    _where.pop(key, None)
    direct.forget(key)
    holders = _holders()
    for fresh in (False, True):  # pods listed since: asked only when none known held it
        pods = [p for p in _listed(max_age=0) if p not in holders] if fresh else holders
        refs = [_submit(a, t, {"op": "rm", "k": key}) for a, t in pods]  # all at once
        if any([_outcome(ref)[0] for ref in refs]):
            return
    raise DataKeyError(key, _nearest(key))


def copy_into(
    into: MutableMapping[str, Any],
    value: Any,
    key: str = "the value",
    mapping: mmap.mmap | None = None,
) -> None:
    """Copy state dict `value` into `into`'s tensors (or arrays) in place; values that
    are not tensors are replaced. Every key, shape and dtype is checked first.

    `mapping`: the file mapping `value`'s arrays are views on. A contiguous CPU target is
    then read from the file straight into its memory (`shm.read_into`), and the
    mapping's pages are never touched: making a private mapping's page tables costs
    more than the copy (250 against 30 ms for 384 MiB here).

    Raises:
        StateDictMismatchError: names the first key that differs; nothing was copied.
    """
    check_into(into, value, key)
    span = _span(mapping) if mapping is not None else None
    reads: list[tuple[int, memoryview]] = []
    for name, target in into.items():
        source = value[name]
        piece = _file_piece(target, source, span) if span is not None else None
        if piece is not None:
            reads.append(piece)
        elif hasattr(target, "copy_"):
            import torch

            with torch.no_grad():
                target.copy_(torch.as_tensor(source))
        elif hasattr(target, "__array__") and hasattr(target, "shape"):
            import numpy as np

            np.copyto(target, source)
        else:
            into[name] = source
    if reads:
        assert mapping is not None
        shm.read_into(mapping, reads)


def _span(mapping: mmap.mmap) -> tuple[int, int]:
    """Where `mapping` is in this process's memory: (first address, size)."""
    import numpy as np

    return int(np.frombuffer(mapping, dtype=np.uint8).ctypes.data), len(mapping)


def _file_piece(target: Any, source: Any, span: tuple[int, int]) -> tuple[int, memoryview] | None:
    """(offset in the file, `target`'s bytes) when `source` is a contiguous view on the
    mapping at `span` of the same size and `target` contiguous CPU memory; else None."""
    import numpy as np

    torch = sys.modules.get("torch")  # a value or target holding tensors imported it
    is_tensor = torch is not None and isinstance(source, torch.Tensor)
    if is_tensor and source.device.type == "cpu":
        if not source.is_contiguous():
            return None
        address, nbytes = int(source.data_ptr()), int(source.nbytes)
    elif isinstance(source, np.ndarray) and source.flags.c_contiguous:
        address, nbytes = int(source.ctypes.data), int(source.nbytes)
    else:
        return None
    start, size = span
    if not nbytes or not start <= address <= start + size - nbytes:
        return None
    if torch is not None and isinstance(target, torch.Tensor):
        if target.device.type != "cpu" or not target.is_contiguous() or target.nbytes != nbytes:
            return None
        flat = target.detach().reshape(-1).view(torch.uint8).numpy()
    elif isinstance(target, np.ndarray):
        if not target.flags.c_contiguous or not target.flags.writeable or target.nbytes != nbytes:
            return None
        flat = target.reshape(-1).view(np.uint8)
    else:
        return None
    return address - start, memoryview(flat)


def check_into(into: Mapping[str, Any], value: Any, key: str = "the value") -> None:
    """That state dict `value` (its values: anything with a shape and dtype stands for
    a tensor) can be copied into `into`.

    Raises:
        StateDictMismatchError: names the first key that differs.
    """
    if not isinstance(value, Mapping):
        raise StateDictMismatchError(
            f"{key!r} holds a {type(value).__name__}, not a state dict: into= needs one"
        )
    for name in [*into, *value]:
        if name not in value or name not in into:
            side = "the stored state dict" if name not in value else "into"
            raise StateDictMismatchError(
                f"key {name!r} is missing from {side} ({key!r}); nothing was copied"
            )
    for name, target in into.items():
        problem = _mismatch(target, value[name])
        if problem:
            raise StateDictMismatchError(f"{name!r} of {key!r}: {problem}; nothing was copied")


def _mismatch(target: Any, source: Any) -> str:
    if not hasattr(target, "shape"):
        return ""
    if not hasattr(source, "shape"):
        return f"a {type(source).__name__} is stored, into has a tensor"
    if tuple(target.shape) != tuple(source.shape):
        return f"shape {tuple(source.shape)} is stored, into has {tuple(target.shape)}"
    if str(target.dtype).removeprefix("torch.") != str(source.dtype).removeprefix("torch."):
        return f"dtype {source.dtype} is stored, into has {target.dtype}"
    return ""


# -- moving bytes -----------------------------------------------------------------------
def _write_file(name: str, parts: Sequence[Any]) -> int | None:
    """Write the value into the pod's reserved /dev/shm file, from where its largest
    buffer copies fastest (`shm.value_start`); that start, or None if the file cannot be
    opened here after all (then the bytes are sent)."""
    try:
        use = hotmaps.writable(name)
    except (OSError, ValueError):
        return None
    views = [memoryview(part).cast("B") for part in parts]
    largest = max(range(len(views)), key=lambda i: views[i].nbytes, default=0)
    start = shm.VALUE_OFFSET
    address = shm.address(views[largest]) if views and views[largest].nbytes >= ALIGN_FROM else None
    if address is not None:
        start = shm.value_start(address, sum(v.nbytes for v in views[:largest]))
    with use as target:
        shm.write_at(target, start, views)
    return start


def _pieces(parts: Sequence[Any], size: int) -> Iterator[tuple[int, list[memoryview]]]:
    """The concatenation of `parts` as (offset, views) pieces of at most `size` bytes."""
    offset, piece, filled = 0, [], 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            take = view[: size - filled]
            piece.append(take)
            filled += take.nbytes
            view = view[take.nbytes :]
            if filled == size:
                yield offset, piece
                offset, piece, filled = offset + filled, [], 0
    if piece:
        yield offset, piece


def _read(
    key: str, address: Address, token: str, meta: dict[str, Any]
) -> tuple[Any, mmap.mmap | None]:
    """The value located at `address`, read the cheapest way this process can, and the
    mapping of its file when its arrays are views on one."""
    here = shm.host_key()
    if meta["file"] and here is not None and meta["host"] == here:
        return _map(meta)
    asked = {"k": key, "vid": meta["vid"]}
    mine = _own_pod()
    if mine is not None and mine[0] != address:
        fetch = {"op": "fetch", **asked, "n": meta["n"], "t": token, "pod": meta["pod"]}
        fetch["from"] = f"{address[0]}:{address[1]}"
        local = _ask(*mine, fetch, timeout=MOVE_S)
        if local["file"] and here is not None and local["host"] == here:
            return _map(local)
        address, token = mine
    return _ask(address, token, {"op": "get", **asked}, timeout=MOVE_S), None


def _map(meta: dict[str, Any]) -> tuple[Any, mmap.mmap]:
    """A value from its /dev/shm file; its arrays are views on a private mapping, whose
    pages are touched only as they are read.

    Raises:
        FileNotFoundError: the file is gone, or holds another value now.
    """
    mapping: mmap.mmap = shm.open_for_reading(meta["file"])
    return serialization.loads(shm.value_view(mapping, meta["fid"], meta["n"])), mapping


# -- where values are -------------------------------------------------------------------
def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a data store key is a non-empty str, not {key!r}")


def _home() -> tuple[Address, str]:
    """The pod that holds what this process puts: its own, or from the driver a pod of
    the latest pool it made that ends with it (a detached one only when it has no other)."""
    mine = _own_pod()
    if mine is not None:
        return mine
    driver = get_driver()
    driver.runtime.run(_settled(), timeout=ASK_S)  # actors made just now are recorded
    pools = [p for p in driver.pools.values() if p.slots]
    waiting = [a for a in list(driver.actors.values()) if a.slot is None]
    if not pools and waiting:  # an actor made just now: its pool comes with its placement
        with contextlib.suppress(KtError):
            waiting[-1].handle.wait_placed(LAUNCH_S)
        pools = [p for p in driver.pools.values() if p.slots]
    if not pools:
        raise ConfigError(
            "kt.put from the driver keeps the value on a pod of its pools, and it has none "
            "yet: make an actor or a function's pool first (kt.cls(...).remote(), .to())"
        )
    own = [p for p in pools if not p.detached]  # the driver's own: values end with them
    pool = (own or pools)[-1]
    slot = driver.runtime.run(pool.a_pod_up(), timeout=LAUNCH_S)  # one may be starting
    return slot.pod.address, pool.token


async def _settled() -> None:
    """Nothing: run on the loop after what this thread asked of it before (FIFO)."""


STORE = "kt-store"
"""The named detached actor whose pod holds detached values (pool `kt-store-detached`):
it only keeps the pod; values go to its supervisor directly."""
_store: Any = None  # this process's handle on it


class StorePin:
    """The actor of the store pod: nothing to do but be there."""

    def ping(self) -> None:
        return None


def _store_pod() -> tuple[Address, str]:
    """The pod of the namespace's store, made on first use (by any driver or actor)."""
    global _store
    if _store is None:
        from kt.actors.api import cls  # api imports this module
        from kt.core.compute import Compute

        compute = Compute(cpus=1, replicas=1, name=STORE)
        options = {"name": STORE, "lifetime": "detached", "get_if_exists": True}
        _store = cls(StorePin).options(compute=compute, cpus=0, **options).remote()
    return _store.wait_placed(120), _store._token


def _own_pod() -> tuple[Address, str] | None:
    where, token = os.environ.get("KT_SUPERVISOR_ADDR"), os.environ.get("KT_TOKEN")
    if os.environ.get("KT_IN_WORKER") != "1" or not where or not token:
        return None
    host, port = where.rsplit(":", 1)
    return (host, int(port)), token


def _found(key: str, address: Address, token: str, pod: str) -> None:
    _where[key] = (address, token, pod)
    _recent[address] = token
    _recent.move_to_end(address)
    while len(_recent) > RECENT:
        _recent.popitem(last=False)


def _locate(key: str) -> tuple[Address, str, dict[str, Any]] | None:
    """The pod that put `key`, its token and the value's meta; None when none has it.

    Raises:
        PodLostError: the pod that held it when this process last asked is gone, and no
            other pod has it.
    """
    known = _where.get(key)
    first = [known[:2]] if known else []
    likely = [pod for pod in dict.fromkeys(_likely()) if pod not in first]
    lost: PodLostError | None = None
    # the pod that answered last, then this pod and those that held keys (asked at once,
    # taken in that order), then every other pod at once, then pods listed since
    asked: set[tuple[Address, str]] = set()
    for i, batch in enumerate([first, likely, [], []]):
        if i == 2:
            batch = _holders(own=False)
        elif i == 3:
            batch = _listed(max_age=0)
        batch = [pod for pod in batch if pod not in asked]
        asked.update(batch)
        refs = [(a, t, _submit(a, t, {"op": "locate", "k": key})) for a, t in batch]
        for address, token, ref in refs:
            meta, error = _outcome(ref)
            if isinstance(error, PodLostError) and known is not None and address == known[0]:
                lost = PodLostError(
                    known[2] or error.pod, f"it held {key!r}, and no other pod has it"
                )
            if error is None:
                _found(key, address, token, str(meta["pod"]))
                return address, token, meta
    _where.pop(key, None)
    if lost is not None:
        raise lost
    return None


def _outcome(ref: Ref[Any]) -> tuple[Any, KtError | None]:
    """A pod's answer, or why there is none (it holds no such key, or is gone). The
    error's traceback is dropped: it would hold this frame and its callers' (a getter's
    value among their locals) in a cycle with the failed Ref, freed only by the cyclic
    collector, and a value's file is reused only once every getter let go of it."""
    try:
        return ref.result(timeout=ASK_S), None
    except (DataKeyError, PodLostError, GetTimeoutError) as exc:
        exc.__traceback__ = None
        return None, exc


def _likely() -> list[tuple[Address, str]]:
    """This process's own pod, then the pods that held keys, newest first."""
    mine = _own_pod()
    return [*([mine] if mine else []), *reversed(list(_recent.items()))]


def _holders(own: bool = True) -> list[tuple[Address, str]]:
    """Every pod that may hold values, each once: this process's own, its driver's
    pools', then every ready kt pod of the provider (with its pool's token)."""
    seen: dict[Address, str] = {}
    mine = _own_pod() if own else None
    if mine is not None:
        seen[mine[0]] = mine[1]
    driver = current_driver()
    for pool in list(driver.pools.values()) if driver is not None else []:
        for slot in list(pool.slots):
            seen.setdefault(slot.pod.address, pool.token)
    for address, token in _listed():
        seen.setdefault(address, token)
    return list(seen.items())


_listing: tuple[float, list[tuple[Address, str]]] = (-LISTING_S, [])


def _listed(max_age: float = LISTING_S) -> list[tuple[Address, str]]:
    """The provider's ready pods with their tokens, listed again when the last listing is
    older than `max_age` (a driver's own pools are known without it; the listing finds
    other drivers' pods)."""
    global _listing
    if time.monotonic() - _listing[0] < max_age:
        return _listing[1]
    try:
        pods = get_runtime().run(ready_pods_with_tokens(), timeout=ASK_S)
    except (KtError, TimeoutError):
        return []  # the provider did not answer: the pods known here are all we ask
    _listing = (time.monotonic(), [(pod.address, token) for pod, token in pods])
    return _listing[1]


def _nearest(key: str) -> tuple[str, ...]:
    return tuple(difflib.get_close_matches(key, list(ls()), n=3, cutoff=0.5))


def _submit(
    address: Address, token: str, header: dict[str, Any], parts: Sequence[Any] = ()
) -> Ref[Any]:
    """One STORE frame to one pod; its Ref completes with the answer."""
    runtime = get_runtime()
    req_id = runtime.new_id()
    head = protocol.orjson_dumps(header)
    size = serialization.parts_size(parts)
    prefix = protocol.encode_prefix(FrameKind.STORE, req_id, head, size)
    ref: Ref[Any] = Ref(f"kt data store {header['op']}")
    runtime.submit(address, token, req_id, [prefix, head, *parts], ref)
    return ref


def _ask(
    address: Address,
    token: str,
    header: dict[str, Any],
    parts: Sequence[Any] = (),
    timeout: float = ASK_S,
) -> Any:
    """One STORE frame to one pod, and its answer (raised when it is an error)."""
    return _submit(address, token, header, parts).result(timeout=timeout)
