"""The data store's first slice: `kt.put` / `kt.get` / `kt.ls` / `kt.rm` of Python values.

A value lives in the supervisor of the pod that put it: an actor's or rank's own pod,
or, from the driver, the first pod of the pool it made last. It is pickled once where it
is put (pickle 5: an array's bytes travel as one out-of-band buffer, never pickled), held
as bytes by the supervisor (which never unpickles it), and unpickled by each getter, its
arrays as views on the frame that brought them. The key table is the union of what every
pod holds: the caller's own pod first, then its driver's pools, then every kt pod its
provider lists (as `kt.get_actor` finds a named actor). A value lives as long as its pod.

Not yet here (issue 16): broadcast trees, `into=` state dicts in place, files and
directories, `lifetime="detached"`, values held by the driver itself.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Sequence
from typing import Any

from kt.actors.driver import current_driver, get_driver, get_runtime, ready_pods_with_tokens
from kt.core import protocol, serialization
from kt.core.errors import ConfigError, DataKeyError, GetTimeoutError, KtError, PodLostError
from kt.core.protocol import FrameKind
from kt.core.ref import Ref
from kt.core.runtime import Address

POLL_S = 0.2  # how often a `kt.get(key, timeout=...)` looks again for a key not there yet
ASK_S = 30.0  # one pod's answer to one question


def put(key: str, value: Any) -> None:
    """Store `value` under `key`, replacing what was there; held by this process's pod.

    Raises:
        ConfigError: the key is not a non-empty str, or the driver has no pod to hold it.
        SerializationError: the value cannot be pickled (the path to the culprit named).
    """
    _check_key(key)
    parts = serialization.dumps_value(value, f"kt.put({key!r})")
    address, token = _home()
    _ask(address, token, {"op": "put", "k": key}, parts)


def get(key: str, timeout: float | None = None) -> Any:
    """The value stored under `key`; waits up to `timeout` s for it to appear.

    Raises:
        DataKeyError: no pod holds `key` (and `timeout` is None): names the nearest keys.
        GetTimeoutError: `timeout` passed and no pod held it.
        PodLostError: the pod holding it went away while it was read.
    """
    _check_key(key)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for address, token in _holders():
            try:
                return _ask(address, token, {"op": "get", "k": key})
            except DataKeyError:
                continue
        if deadline is None:
            raise DataKeyError(key, _nearest(key))
        if time.monotonic() >= deadline:
            raise GetTimeoutError(f"no value was stored under key {key!r} within {timeout} s")
        time.sleep(POLL_S)


def ls(prefix: str = "") -> dict[str, int]:
    """Every stored key that starts with `prefix`, with its value's size in bytes."""
    out: dict[str, int] = {}
    for address, token in _holders():
        try:
            out.update(_ask(address, token, {"op": "ls", "p": prefix}))
        except (PodLostError, GetTimeoutError):
            continue  # a pod ending meanwhile holds nothing any more
    return dict(sorted(out.items()))


def rm(key: str) -> None:
    """Remove `key` from every pod that holds it.

    Raises:
        DataKeyError: no pod held it.
    """
    _check_key(key)
    if not any([_ask(a, t, {"op": "rm", "k": key}) for a, t in _holders()]):
        raise DataKeyError(key, _nearest(key))


# -- where values are ------------------------------------------------------------------
def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a data store key is a non-empty str, not {key!r}")


def _home() -> tuple[Address, str]:
    """The pod that holds what this process puts."""
    mine = _own_pod()
    if mine is not None:
        return mine
    pools = [p for p in get_driver().pools.values() if p.slots]
    if not pools:
        raise ConfigError(
            "kt.put from the driver keeps the value on a pod of its pools, and it has none "
            "yet: make an actor or a function's pool first (kt.cls(...).remote(), .to())"
        )
    pool = pools[-1]
    return pool.slots[0].pod.address, pool.token


def _own_pod() -> tuple[Address, str] | None:
    where, token = os.environ.get("KT_SUPERVISOR_ADDR"), os.environ.get("KT_TOKEN")
    if os.environ.get("KT_IN_WORKER") != "1" or not where or not token:
        return None
    host, port = where.rsplit(":", 1)
    return (host, int(port)), token


def _holders() -> list[tuple[Address, str]]:
    """Every pod that may hold values, each once: this process's own, its driver's
    pools', then every ready kt pod of the provider (with its pool's token)."""
    seen: dict[Address, str] = {}
    mine = _own_pod()
    if mine is not None:
        seen[mine[0]] = mine[1]
    driver = current_driver()
    for pool in list(driver.pools.values()) if driver is not None else []:
        for slot in list(pool.slots):
            seen.setdefault(slot.pod.address, pool.token)
    try:
        for pod, token in get_runtime().run(ready_pods_with_tokens(), timeout=ASK_S):
            seen.setdefault(pod.address, token)
    except (KtError, TimeoutError):
        pass  # the provider did not answer: the pods known here are all we ask
    return list(seen.items())


def _nearest(key: str) -> tuple[str, ...]:
    return tuple(difflib.get_close_matches(key, list(ls()), n=3, cutoff=0.5))


def _ask(address: Address, token: str, header: dict[str, Any], parts: Sequence[Any] = ()) -> Any:
    """One STORE frame to one pod, and its answer (raised when it is an error)."""
    runtime = get_runtime()
    req_id = runtime.new_id()
    head = protocol.orjson_dumps(header)
    size = serialization.parts_size(parts)
    prefix = protocol.encode_prefix(FrameKind.STORE, req_id, head, size)
    ref: Ref[Any] = Ref(f"kt data store {header['op']}")
    runtime.submit(address, token, req_id, [prefix, head, *parts], ref)
    return ref.result(timeout=ASK_S)
