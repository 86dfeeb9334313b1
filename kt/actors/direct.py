"""A stored state dict's tensors sent from the process that put them straight into a
getter's own tensors: the data store's GPU-to-GPU path (NCCL; gloo does CPU tensors).

Who calls it: `kt.actors.datastore`. `kt.put` of a dict of CUDA tensors from an actor or
a rank (or any put with `transport="nccl"` or `"gloo"`) keeps a copy of the tensors here,
in the putting process (`hold`), and names this process's endpoint in the value's meta
on its pod. `kt.get(key, into=)` whose tensors are on that kind of device asks the
endpoint first (`offer`); it reads the store's host copy, as any other get does, when
the endpoint is gone, holds another value, or the transfer fails.

Theory of operation: a holding process serves on a TCP port of its pod (one thread
accepting, one per getter connection). A getter connects once per holder and sends its
pool's token; then, per get, it asks for (key, vid), and the holder answers with the
tensors' names, dtypes and shapes. The getter checks them against `into` (a mismatch
sends nothing) and the two move each tensor with torch.distributed point to point over
a two-member ProcessGroup (NCCL, or gloo) that they make on the connection's first
transfer, its rendezvous on a TCPStore the holder hosts. A connection is one pair: when
it breaks, both sides drop the group. The held copy goes when the key is put again
(the new one replaces it), when this process removes it, or when a sweep (every
`SWEEP_S`, and after each new put) finds that its pod holds another value or none.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson

from kt.core.errors import ConfigError

logger = logging.getLogger(__name__)

TRANSPORTS = ("store", "nccl", "gloo")
ASK_S = 30.0  # a holder's answer to a question
TRANSFER_S = 300.0  # one tensor's send or receive, and a pair's rendezvous
CONNECT_S = 2.0  # dialling a holder
SWEEP_S = 10.0  # how often held copies are checked against their pods
UNREACHABLE_S = 60.0  # a holder that could not be dialled is not tried again for this long
MAX_FRAME = 64 * 2**20  # a message: a layout of many tensors, their IPC handles
HELLO_MAX = 4096  # a getter's first message, before its token is checked
_LENGTH = struct.Struct("!I")

PROCESS = uuid.uuid4().hex[:16]  # this process, in the endpoints it names


@dataclass
class Counts:
    """What this process moved directly (tests and `kt top` read them)."""

    sent: int = 0  # transfers served to getters
    received: int = 0  # transfers taken into a getter's tensors
    local: int = 0  # gets served from this process's own held copy
    bytes_sent: int = 0
    bytes_received: int = 0
    fallbacks: int = 0  # gets that asked and then read the store instead
    ipc: int = 0  # of the transfers, those through CUDA IPC (sender and getter on one GPU)


counts = Counts()


# -- decisions (pure) ---------------------------------------------------------------------
def tensors_of(value: object) -> dict[str, Any] | None:
    """`value` as a state dict of dense torch tensors keyed by str, or None."""
    torch = sys.modules.get("torch")  # a value holding tensors has imported it
    if torch is None or not isinstance(value, Mapping) or not value:
        return None
    out: dict[str, Any] = {}
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return None
        if tensor.layout != torch.strided:
            return None
        out[name] = tensor
    return out


def device_kind(tensors: Mapping[str, Any]) -> str:
    """'cuda:<i>' when every tensor is on that one CUDA device, 'cpu' when all are on the
    CPU, else ''."""
    places = {str(t.device) for t in tensors.values()}
    place = places.pop() if len(places) == 1 else ""
    return place if place == "cpu" or place.startswith("cuda:") else ""


def transport_for(value: object, asked: str | None, *, in_worker: bool, key: str) -> str:
    """How a put of `value` is kept: 'store' (the pod's host copy only), or 'nccl' /
    'gloo' (also a copy of its tensors in this process, sent straight to getters).

    None picks 'nccl' for a state dict of CUDA tensors on one device put from an actor
    or a rank, else 'store'.

    Raises:
        ConfigError: an unknown transport, or one this value or process cannot use.
    """
    if asked is not None and asked not in TRANSPORTS:
        raise ConfigError(f"transport={asked!r}: choose one of {TRANSPORTS} (or None)")
    if asked == "store":
        return "store"
    tensors = tensors_of(value)
    place = device_kind(tensors) if tensors else ""
    if asked is None:
        return "nccl" if in_worker and place.startswith("cuda:") else "store"
    want = "a CUDA device" if asked == "nccl" else "the CPU"
    if tensors is None:
        raise ConfigError(
            f"kt.put({key!r}, transport={asked!r}) sends tensors straight to getters: the "
            "value must be a dict of str to torch tensors (a state dict); put it with "
            "transport=None"
        )
    if (asked == "nccl") != place.startswith("cuda:") or not place:
        raise ConfigError(
            f"kt.put({key!r}, transport={asked!r}) needs every tensor on {want} (one "
            f"device); they are on {sorted({str(t.device) for t in tensors.values()})}"
        )
    if not in_worker:
        raise ConfigError(
            f"kt.put({key!r}, transport={asked!r}) keeps the tensors in the process that "
            "puts them, where getters reach it on its pod: call it in an actor or a rank "
            "(from the driver, put with transport=None)"
        )
    return asked


def takes(backend: str, into: Mapping[str, Any]) -> bool:
    """Whether a get into `into` can receive a value held for `backend` directly."""
    tensors = tensors_of(into)  # None unless every value is a tensor
    if tensors is None:
        return False
    place = device_kind(tensors)
    return place.startswith("cuda:") if backend == "nccl" else place == "cpu"


@dataclass(frozen=True)
class Spec:
    """A held tensor as a getter checks it: what `into`'s tensor must match."""

    shape: tuple[int, ...]
    dtype: str


def gpu_uuid(device: Any) -> str:
    """The UUID of CUDA device `device` (a torch.device), or '' for any other."""
    if device.type != "cuda":
        return ""
    import torch

    return str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))


def endpoint(backend: str, address: str) -> str:
    """What a value's meta says of its holder: '<backend>@<host>:<port>/<process>'."""
    return f"{backend}@{address}/{PROCESS}"


def parse_endpoint(text: str) -> tuple[str, str, str]:
    """(backend, 'host:port', process) of `endpoint`'s text.

    Raises:
        ValueError: it is not one.
    """
    backend, _, rest = text.partition("@")
    address, _, process = rest.partition("/")
    if backend not in ("nccl", "gloo") or ":" not in address or not process:
        raise ValueError(f"not a holder's endpoint: {text!r}")
    return backend, address, process


# -- the holder ---------------------------------------------------------------------------
@dataclass
class _Held:
    vid: str
    backend: str
    tensors: dict[str, Any]
    still: Callable[[], bool]  # whether its pod still holds this value (the sweep asks)
    sealed: bool = False  # its pod holds it (before, the sweep would find it missing)

    def gpu(self) -> str:
        """The UUID of the CUDA device its tensors are on, or ''."""
        return gpu_uuid(next(iter(self.tensors.values())).device)

    def layout(self) -> list[list[Any]]:
        return [
            [name, str(t.dtype).removeprefix("torch."), list(t.shape)]
            for name, t in self.tensors.items()
        ]


class Holder:
    """This process's held copies, and the threads that serve them to getters."""

    def __init__(self, host: str, token: str) -> None:
        import torch.distributed as dist

        self._token = token.encode()
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()  # a new value: sweep now (RL puts a version a step)
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        timeout = timedelta(seconds=TRANSFER_S)
        self._store = dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
        for target, name in ((self._accept, "accept"), (self._sweep, "sweep")):
            threading.Thread(target=target, daemon=True, name=f"kt-direct-{name}").start()

    def hold(self, key: str, held: _Held) -> None:
        with self._lock:
            self._held[key] = held  # the one before (another vid) is dropped

    def sealed(self, key: str, vid: str) -> None:
        """Its pod holds value `vid` of `key` now: the sweep may ask about it, and
        copies of keys removed meanwhile are looked for at once."""
        held = self.get(key, vid)
        if held is not None:
            held.sealed = True
        self._wake.set()

    def forget(self, key: str, vid: str | None = None) -> None:
        with self._lock:
            if key in self._held and vid in (None, self._held[key].vid):
                del self._held[key]

    def get(self, key: str, vid: str) -> _Held | None:
        with self._lock:
            held = self._held.get(key)
        return held if held is not None and held.vid == vid else None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _sweep(self) -> None:
        while True:
            self._wake.wait(SWEEP_S)
            self._wake.clear()
            with self._lock:
                items = [(k, h) for k, h in self._held.items() if h.sealed]
            for key, held in items:
                try:
                    gone = not held.still()
                except Exception as exc:  # its pod did not answer: asked again next time
                    logger.debug("held %r: its pod did not say (%s)", key, exc)
                    continue
                if gone:
                    logger.info("dropping the held copy of %r: its pod holds another value", key)
                    self.forget(key, held.vid)

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        groups: dict[str, Any] = {}  # backend -> this pair's group
        pair = uuid.uuid4().hex
        try:
            conn.settimeout(ASK_S)  # a stranger that says nothing is not waited for
            hello = _recv(conn, HELLO_MAX)
            if not hmac.compare_digest(str(hello.get("t", "")).encode(), self._token):
                _send(conn, {"ok": False, "why": "the token is not this pool's"})
                return
            conn.settimeout(None)  # a getter may ask again much later
            _send(conn, {"ok": True, "store": self._store.port, "pair": pair})
            while True:
                ask = _recv(conn)
                held = self.get(str(ask.get("k")), str(ask.get("vid")))
                if held is None or held.backend != ask.get("backend"):
                    _send(conn, {"ok": False})
                    continue
                _send(conn, {"ok": True, "layout": held.layout(), "gpu": held.gpu()})
                go = _recv(conn).get("go")
                if go == "ipc":
                    self._share(conn, held)
                    continue
                if go != "p2p":
                    continue
                backend = held.backend
                if backend not in groups:
                    groups[backend] = make_group(self._store, f"kt/{pair}/{backend}", 0, 2, backend)
                sent = 0
                for tensor in held.tensors.values():
                    if tensor.numel():
                        groups[backend].send([tensor], 1, 0).wait()
                        sent += tensor.nbytes
                counts.sent += 1
                counts.bytes_sent += sent
        except (OSError, ValueError, RuntimeError) as exc:
            logger.debug("a getter's connection ended: %s", exc)
        finally:
            conn.close()

    def _share(self, conn: socket.socket, held: _Held) -> None:
        """CUDA IPC, for a getter on the same GPU: the handles of the held tensors; they
        stay alive (`held`) until the getter says it has copied them."""
        if held.backend != "nccl":
            _send(conn, {"ok": False, "why": "CUDA IPC shares CUDA tensors only"})
            return
        try:
            shared = [ipc_share(t) for t in held.tensors.values()]
        except (RuntimeError, ValueError) as exc:  # this build or sandbox cannot
            _send(conn, {"ok": False, "why": f"CUDA IPC: {exc}"[:500]})
            return
        _send(conn, {"ok": True, "tensors": shared})
        if _recv(conn).get("ok"):
            counts.sent += 1
            counts.ipc += 1
            counts.bytes_sent += sum(t.nbytes for t in held.tensors.values())


_env_lock = threading.Lock()


def make_group(
    store: Any, prefix: str, rank: int, size: int, backend: str, timeout_s: float = TRANSFER_S
) -> Any:
    """A torch ProcessGroup of `backend` ('nccl' or 'gloo'), rank `rank` of `size`, on
    `store` under `prefix` (a pair's here; a collective group's in kt.distributed)."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if backend != "nccl":
        return dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    # NCCL's default on a failed or timed-out op ends the process: a getter that dies
    # mid-transfer must not take its holder (a trainer) with it. The group reads this
    # when it is made; a value the user set stands.
    with _env_lock:
        set_here = "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
        if set_here:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"  # clean up, raise, live on
        try:
            return dist.ProcessGroupNCCL(prefixed, rank, size, options)
        finally:
            if set_here:
                os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)


_holder: Holder | None = None
_holder_lock = threading.Lock()


def hold(
    key: str,
    vid: str,
    tensors: Mapping[str, Any],
    backend: str,
    address: tuple[str, str],
    still: Callable[[], bool],
) -> str:
    """Keep a copy of `tensors` (value `vid` of `key`) for getters; the endpoint that a
    value's meta names. `address`: (this pod's host, its pool's token).

    Raises:
        ConfigError: no copy can be kept here (no room on the device for it, no port).
    """
    global _holder
    import torch

    try:
        with _holder_lock:
            if _holder is None:
                _holder = Holder(*address)
            holder = _holder
        contiguous = torch.contiguous_format
        copies = {n: t.detach().clone(memory_format=contiguous) for n, t in tensors.items()}
    except (OSError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        raise ConfigError(
            f"kt.put({key!r}, transport={backend!r}) cannot keep a copy of its tensors in "
            f"this process: {exc}"[:500]
        ) from exc
    holder.hold(key, _Held(vid, backend, copies, still))
    return endpoint(backend, holder.address)


def sealed(key: str, vid: str) -> None:
    """The put of value `vid` of `key` that `hold` kept a copy of is its pod's now."""
    if _holder is not None:
        _holder.sealed(key, vid)


def forget(key: str, vid: str | None = None) -> None:
    """Drop this process's held copy of `key` (of value `vid` only, when given)."""
    if _holder is not None:
        _holder.forget(key, vid)


def held_keys() -> list[str]:
    """The keys this process holds copies of."""
    return _holder.keys() if _holder is not None else []


# -- the getter ---------------------------------------------------------------------------
@dataclass
class _Link:
    """This process's connection to one holder."""

    sock: socket.socket
    store_port: int
    pair: str
    host: str
    groups: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def group(self, backend: str) -> Any:
        if backend not in self.groups:
            import torch.distributed as dist

            timeout = timedelta(seconds=TRANSFER_S)
            store = dist.TCPStore(self.host, self.store_port, None, False, timeout)
            self.groups[backend] = make_group(store, f"kt/{self.pair}/{backend}", 1, 2, backend)
        return self.groups[backend]


_links: dict[str, _Link] = {}
_unreachable: dict[str, float] = {}  # holder address -> when dialling it failed
_links_lock = threading.Lock()


@dataclass
class Offer:
    """A holder's answer for one get: check `specs` against `into`, then `take` or
    `decline` (inside `offer`'s with-block)."""

    specs: dict[str, Spec]
    _take: Callable[[MutableMapping[str, Any]], bool]
    _decline: Callable[[], None]
    done: bool = False

    def take(self, into: MutableMapping[str, Any]) -> bool:
        """Fill `into`'s tensors in place; False when the transfer failed (some may hold
        a part of the value: the caller reads the store's copy into all of them)."""
        self.done = True
        ok = self._take(into)
        if not ok:
            counts.fallbacks += 1
        return ok

    def decline(self) -> None:
        self.done = True
        self._decline()


@contextlib.contextmanager
def offer(
    text: str, key: str, vid: str, token: str, into: Mapping[str, Any]
) -> Iterator[Offer | None]:
    """The holder's offer of value `vid` of `key` for `into`, or None when there is none
    to take (another device kind, the holder gone or holding another value: read the
    store). An offer left neither taken nor declined is declined."""
    try:
        backend, address, process = parse_endpoint(text)
    except ValueError:
        yield None
        return
    if not takes(backend, into):
        yield None
        return
    if process == PROCESS:
        held = _holder.get(key, vid) if _holder is not None else None
        yield None if held is None else _local_offer(held)
        return
    link = _link(address, token)
    if link is None:
        counts.fallbacks += 1
        yield None
        return
    with link.lock:
        made = None
        try:
            _send(link.sock, {"k": key, "vid": vid, "backend": backend})
            answer = _recv(link.sock)
            if answer.get("ok"):
                # NCCL refuses two members on one device (two actors sharing a GPU):
                # those share the held memory through CUDA IPC instead
                gpu = str(answer.get("gpu", ""))
                same = bool(gpu) and gpu == gpu_uuid(next(iter(into.values())).device)
                made = _remote_offer(link, address, backend, answer["layout"], same)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _drop(address, link, exc)
        if made is None:
            counts.fallbacks += 1
        try:
            yield made
        finally:
            if made is not None and not made.done:
                made.decline()


def _specs(layout: list[list[Any]]) -> dict[str, Spec]:
    return {str(name): Spec(tuple(shape), str(dtype)) for name, dtype, shape in layout}


def _local_offer(held: _Held) -> Offer:
    def take(into: MutableMapping[str, Any]) -> bool:
        import torch

        with torch.no_grad():
            for name, tensor in held.tensors.items():
                into[name].copy_(tensor)
        counts.local += 1
        return True

    return Offer(_specs(held.layout()), take, lambda: None)


def _remote_offer(
    link: _Link, address: str, backend: str, layout: list[list[Any]], same_gpu: bool
) -> Offer:
    def take(into: MutableMapping[str, Any]) -> bool:
        import torch

        if same_gpu:
            return _take_ipc(link, address, layout, into)
        try:
            _send(link.sock, {"go": "p2p"})
            group = link.group(backend)
            got = 0
            for name, _, _ in layout:
                target = into[name]
                if not target.numel():
                    continue
                if target.is_contiguous():
                    group.recv([target.detach()], 0, 0).wait()
                else:  # received whole, then copied into its strides
                    landing = torch.empty_like(target, memory_format=torch.contiguous_format)
                    group.recv([landing], 0, 0).wait()
                    with torch.no_grad():
                        target.copy_(landing)
                got += target.nbytes
        except (OSError, ValueError, RuntimeError) as exc:
            _drop(address, link, exc, failed=True)
            return False
        counts.received += 1
        counts.bytes_received += got
        return True

    def decline() -> None:
        try:
            _send(link.sock, {"go": False})
        except OSError as exc:
            _drop(address, link, exc)

    return Offer(_specs(layout), take, decline)


def _take_ipc(
    link: _Link, address: str, layout: list[list[Any]], into: MutableMapping[str, Any]
) -> bool:
    """Copy the holder's tensors, opened through CUDA IPC, into `into` on their GPU."""
    import torch

    try:
        _send(link.sock, {"go": "ipc"})
        answer = _recv(link.sock)
        if not answer.get("ok"):
            raise ValueError(str(answer.get("why", "refused")))
        device = next(iter(into.values())).device
        got = 0
        with torch.no_grad():
            for (name, _, _), shared in zip(layout, answer["tensors"], strict=True):
                target = into[name]
                if target.numel():
                    target.copy_(ipc_open(shared, device.index or 0))
                    got += target.nbytes
        torch.cuda.current_stream(device).synchronize()  # done before it may be freed
        _send(link.sock, {"ok": True})
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        _drop(address, link, exc, failed=True)
        return False
    counts.received += 1
    counts.ipc += 1
    counts.bytes_received += got
    return True


_STORAGES = ("TypedStorage", "UntypedStorage")


def ipc_share(tensor: Any) -> dict[str, Any]:
    """What another process on this GPU needs to open `tensor`'s memory (torch's own
    CUDA IPC, as torch.multiprocessing sends it), as JSON: nothing is unpickled."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    _, size, stride, offset, storage_cls, dtype, _, handle, nbytes, at = args[:10]
    ref, ref_at, event, sync = args[11:15]
    if storage_cls.__name__ not in _STORAGES:
        raise ValueError(f"a {storage_cls.__name__} is not shared")
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": int(offset),
        "storage": storage_cls.__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "handle": _b64(handle),
        "bytes": int(nbytes),
        "at": int(at),
        "ref": _b64(ref),
        "ref_at": int(ref_at),
        "event": _b64(event),
        "sync": bool(sync),
    }


def ipc_open(shared: dict[str, Any], device: int) -> Any:
    """The tensor `ipc_share` described, on this process's CUDA device `device`."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = getattr(torch, str(shared["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or shared["storage"] not in _STORAGES:
        raise ValueError(f"not a shared tensor: {shared['dtype']!r}, {shared['storage']!r}")
    storage_cls = (
        torch.UntypedStorage
        if shared["storage"] == "UntypedStorage"
        else torch.storage.TypedStorage
    )
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(shared["size"]),
        tuple(shared["stride"]),
        int(shared["offset"]),
        storage_cls,
        dtype,
        device,
        _unb64(shared["handle"]),
        int(shared["bytes"]),
        int(shared["at"]),
        False,
        _unb64(shared["ref"]),
        int(shared["ref_at"]),
        _unb64(shared["event"]),
        bool(shared["sync"]),
    )


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def _link(address: str, token: str) -> _Link | None:
    """This process's connection to the holder at `address`, dialled on first use; None
    when it cannot be reached (not tried again for UNREACHABLE_S)."""
    with _links_lock:
        link = _links.get(address)
        if link is not None:
            return link
        if time.monotonic() - _unreachable.get(address, -UNREACHABLE_S) < UNREACHABLE_S:
            return None
        host, port = address.rsplit(":", 1)
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, int(port)), timeout=CONNECT_S)
            sock.settimeout(ASK_S)
            _send(sock, {"t": token, "from": PROCESS})
            hello = _recv(sock)
            if not hello.get("ok"):
                raise ValueError(str(hello.get("why", "refused")))
            sock.settimeout(TRANSFER_S)
            link = _Link(sock, int(hello["store"]), str(hello["pair"]), host)
        except (OSError, ValueError, KeyError) as exc:
            if sock is not None:
                sock.close()
            logger.info("the holder at %s cannot be reached (%s): reading the store", address, exc)
            _unreachable[address] = time.monotonic()
            return None
        _links[address] = link
        return link


def _drop(address: str, link: _Link, exc: BaseException, failed: bool = False) -> None:
    """Close the connection to a holder (`failed`: a transfer failed, so gets read the
    store for UNREACHABLE_S rather than fail the same way again)."""
    logger.info("the holder at %s: %s; reading the store", address, exc)
    with _links_lock:
        if _links.get(address) is link:
            del _links[address]
        if failed:
            _unreachable[address] = time.monotonic()
    link.sock.close()


# -- frames -------------------------------------------------------------------------------
def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    body = orjson.dumps(message)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv(sock: socket.socket, limit: int = MAX_FRAME) -> dict[str, Any]:
    """One message of at most `limit` bytes.

    Raises:
        OSError: the connection closed (ConnectionError) or timed out.
        ValueError: what came is not a message.
    """
    (size,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if size > limit:
        raise ValueError(f"a message of {size} bytes is over {limit}")
    message = orjson.loads(_exactly(sock, size))
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 2**20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
