"""The data store's STORE frames on a pod: its verbs on this pod's values.

Who calls it: `kt.supervisor.server.Supervisor` dispatches FrameKind.STORE here; the
other end is `kt.actors.datastore` (getters and putters) and `kt.supervisor.pull` (other
pods pulling a value). The values and their trees are `kt.supervisor.data`.

Verbs (header "op"; replies to kt processes are pickled by `serialization`, replies to
pods are orjson in a raw payload; values themselves are never unpickled):

    reserve {k, n}        a buffer for a put -> {id, file}: `file` when the putter shares
                          this host and may write it itself, else it sends "write"s
    write {id, off}       bytes of a reserved put, at `off`
    seal {id, start?, dev?}
                          the put becomes the key's value -> its meta (`start`: where a
                          putter that wrote the file itself began the value; `dev`: the
                          putting process's endpoint that sends its tensors directly,
                          given back in the meta: `kt.actors.direct`)
    abandon {id}          forget a reserved put (its putter failed)
    locate {k}            the meta of the value this pod put under `k` (or DataKeyError)
    get {k, vid}          the value's bytes, as one frame
    fetch {k, vid, n, from, t, pod}
                          make a replica here (a getter of this pod asks), pulled through
                          the tree of the origin at `from` -> the replica's meta
    route {k, vid, node, t, failed}
                          (from a pod) which node `node` pulls from -> {source, t}
    chunk {k, vid, off, n}
                          (from a pod) `n` bytes at `off`, once this pod has them
    ls {p}, rm {k}        the keys put here under a prefix; drop a key

A request that is malformed (a field missing or of the wrong type, a size out of range)
gets an error answer naming the field; the connection stays open for the next one.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from typing import TYPE_CHECKING, Any

import orjson

from kt.core import protocol, serialization
from kt.core.errors import (
    DataKeyError,
    GetTimeoutError,
    KtError,
    PodLostError,
    ProtocolError,
    ValueGoneError,
)
from kt.core.protocol import FrameKind
from kt.supervisor.data import DataTable, Entry, EntryState, route
from kt.supervisor.fetch import FetchError
from kt.supervisor.pull import TIMEOUT_S, ValueGone, replicate

if TYPE_CHECKING:
    from kt.supervisor.server import Peer, Supervisor

logger = logging.getLogger(__name__)
FANOUT = 2
"""Pods one node of a value's tree serves (KT_DATA_FANOUT): the origin sends the value
about this many times however many pods get it."""
MAX_ENDPOINT = 512  # a seal's `dev`: the putting process's endpoint (kt.actors.direct)


class DataService:
    def __init__(self, supervisor: Supervisor, node: str, fanout: int = FANOUT) -> None:
        self.sup = supervisor
        self.node = node  # "host:port" other pods reach this supervisor at
        self.fanout = fanout
        self.table = DataTable(supervisor.pod, supervisor.host_key)
        self._pulls: dict[tuple[str, str], asyncio.Task[None]] = {}

    def on_frame(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        try:
            want = protocol.decode_header(header)
            if not isinstance(want, dict):
                raise ProtocolError(f"a STORE header is a JSON object, not {type(want).__name__}")
            op = want.get("op")
            handler = _VERBS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"a STORE frame's op is one of {sorted(_VERBS)}, not {op!r}")
            payload = frame[protocol.PREFIX_SIZE + len(header) :]
            handler(self, peer, req_id, want, payload)
        except (KtError, LookupError, ValueError, TypeError, OSError) as exc:
            self.sup.reply_error(peer.route, req_id, _as_kt(exc), self.sup.pod)
        except Exception as exc:  # a bug of ours: this request fails, the link stays
            logger.exception("a STORE request failed")
            self.sup.reply_error(peer.route, req_id, exc, self.sup.pod)

    def _answer_pod(self, peer: Peer, req_id: int, value: dict[str, Any]) -> None:
        parts = serialization.raw_parts(memoryview(orjson.dumps(value)))
        size = serialization.parts_size(parts)
        peer.channel.send_parts(
            [protocol.encode_prefix(FrameKind.RESULT, req_id, b"", size), *parts]
        )

    def _meta(self, entry: Entry) -> dict[str, object]:
        return entry.meta(self.sup.pod, self.sup.host_key)

    def _missing(self, key: str) -> DataKeyError:
        keys = list(self.table.listing(""))
        return DataKeyError(key, tuple(difflib.get_close_matches(key, keys, n=3, cutoff=0.5)))

    # -- putting ---------------------------------------------------------------------
    def reserve(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        key, size = _str(want, "k"), _int(want, "n")
        put_id, entry = self.table.reserve(key, size, peer.route)
        file = entry.file if peer.same_host else None
        self.sup.answer(peer, req_id, {"id": put_id, "file": file})

    def write(self, peer: Peer, req_id: int, want: dict[str, Any], payload: memoryview) -> None:
        self.table.write(_str(want, "id"), _int(want, "off"), payload)
        self.sup.answer(peer, req_id, None)

    def seal(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        start = _int(want, "start") if "start" in want else None
        device = _str(want, "dev") if "dev" in want else ""
        if len(device) > MAX_ENDPOINT:
            raise ProtocolError(f"a STORE seal's dev is at most {MAX_ENDPOINT} characters")
        entry = self.table.seal(_str(want, "id"), "", self.sup.token.decode(), start, device)
        self.sup.answer(peer, req_id, self._meta(entry))

    def abandon(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        self.table.abandon(_str(want, "id"))
        self.sup.answer(peer, req_id, None)

    def peer_lost(self, route: int) -> None:
        """A connection closed: the puts it reserved and never sealed are dropped."""
        self.table.abandon_owner(route)

    # -- getting ---------------------------------------------------------------------
    def locate(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        key = _str(want, "k")
        entry = self.table.origin(key)
        if entry is None:
            raise self._missing(key)
        self.sup.answer(peer, req_id, self._meta(entry))

    def _held(self, want: dict[str, Any]) -> Entry:
        key, vid = _str(want, "k"), _str(want, "vid")
        entry = self.table.held(key, vid)
        if entry is None:
            raise ValueGoneError(key)
        return entry

    def get(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        entry = self._held(want)
        self._send_when(peer, req_id, entry, 0, entry.size, raw=False)

    def chunk(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        offset, n = _int(want, "off"), _int(want, "n")
        entry = self._held(want)
        if offset + n > entry.size:
            raise ValueError(f"bytes {offset}..{offset + n} are outside {entry.key!r}")
        self._send_when(peer, req_id, entry, offset, n, raw=True)

    def _send_when(
        self, peer: Peer, req_id: int, entry: Entry, offset: int, n: int, *, raw: bool
    ) -> None:
        """Send bytes `offset`..`offset + n` of `entry` once they are here (raw: to a pod,
        framed by `raw_parts`; else the value's own bytes, which are its pickle)."""

        def send() -> None:
            if entry.state is EntryState.GONE:  # dropped while this read waited
                raise ValueGoneError(entry.key)
            view = entry.view[offset : offset + n]
            parts = serialization.raw_parts(view) if raw else [view]
            size = serialization.parts_size(parts)
            prefix = protocol.encode_prefix(FrameKind.RESULT, req_id, b"", size)
            peer.channel.send_parts([prefix, *parts])
            entry.sent_on(peer.channel)
            self.table.bytes_sent += n
            if raw:
                self.table.bytes_to_pods += n

        if entry.have >= offset + n:
            send()
            return

        async def later() -> None:
            try:
                await entry.wait_for(offset + n, TIMEOUT_S)
                send()
            except Exception as exc:  # the pull feeding it failed, or stalled: so does this
                self.sup.reply_error(peer.route, req_id, _as_kt(exc), self.sup.pod)

        asyncio.get_running_loop().create_task(later())

    def fetch(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        key, vid, size = _str(want, "k"), _str(want, "vid"), _int(want, "n")
        host, port = _str(want, "from").rpartition(":")[::2]
        if not host or not port.isdigit():
            raise ValueError(f"a STORE fetch's 'from' is host:port, not {want['from']!r}")
        token, origin_pod = _str(want, "t"), str(want.get("pod", "?"))
        entry = self.table.held(key, vid)
        if entry is None:
            entry = self.table.replica(key, size, vid)
            task = replicate(
                entry,
                (host, int(port)),
                token,
                node=self.node,
                node_token=self.sup.token.decode(),
                caller=f"pod {self.sup.pod}",
                counted=self._pulled,
            )
            pull = asyncio.get_running_loop().create_task(self._replicate(entry, task, origin_pod))
            self._pulls[(key, vid)] = pull

        async def answer() -> None:
            try:
                await entry.wait_for(entry.size, TIMEOUT_S)
            except Exception as exc:
                self.sup.reply_error(peer.route, req_id, _as_kt(exc), self.sup.pod)
                return
            self.sup.answer(peer, req_id, self._meta(entry))

        asyncio.get_running_loop().create_task(answer())

    def _pulled(self, n: int) -> None:
        self.table.bytes_pulled += n

    async def _replicate(self, entry: Entry, task: Any, origin_pod: str) -> None:
        try:
            await task
            if entry.state is EntryState.FILLING:
                entry.state = EntryState.READY
        except FetchError as exc:
            entry.error = PodLostError(
                origin_pod, f"it held {entry.key!r}, and pod {self.sup.pod} lost it: {exc}"
            )
        except ValueGone:
            entry.error = DataKeyError(entry.key)
        except Exception as exc:  # our own memory, a bug: the getters are told
            logger.exception("replica of %r failed", entry.key)
            entry.error = exc
        finally:
            if self._pulls.get((entry.key, entry.vid)) is asyncio.current_task():
                del self._pulls[(entry.key, entry.vid)]
            if entry.error is not None:
                self.table.drop_replica(entry)
            entry.advanced()

    def route(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        key, vid, node, token = _str(want, "k"), _str(want, "vid"), _str(want, "node"), ""
        entry = self.table.origin(key)
        if entry is None or entry.vid != vid:
            self._answer_pod(peer, req_id, {"gone": True})
            return
        token = _str(want, "t")
        entry.tokens.setdefault(node, token)  # a node's first word on its token stands
        failed = want.get("failed")
        if isinstance(failed, str) and failed in entry.tokens and failed != self.node:
            entry.dead.add(failed)
        source = route(entry.tree, entry.dead, node, self.fanout)
        self._answer_pod(peer, req_id, {"source": source or self.node, "t": entry.tokens[source]})

    # -- the key table ---------------------------------------------------------------
    def ls(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        prefix = want.get("p", "")
        if not isinstance(prefix, str):
            raise TypeError(f"a STORE ls's 'p' is a str, not {type(prefix).__name__}")
        self.sup.answer(peer, req_id, self.table.listing(prefix))

    def rm(self, peer: Peer, req_id: int, want: dict[str, Any], _: memoryview) -> None:
        self.sup.answer(peer, req_id, self.table.remove(_str(want, "k")))

    def status(self) -> dict[str, Any]:
        t = self.table
        return {
            "keys": len(t.values),
            "replicas": len(t.replicas),
            "pending": len(t.pending),
            "bytes_held": sum(e.size for e in [*t.values.values(), *t.replicas.values()]),
            "files_pooled": len(t.pool),
            "files_made": t.files_made,
            "bytes_sent": t.bytes_sent,
            "bytes_to_pods": t.bytes_to_pods,
            "bytes_pulled": t.bytes_pulled,
        }

    def close(self) -> None:
        for pull in self._pulls.values():
            pull.cancel()
        self.table.close()


def _str(want: dict[str, Any], name: str) -> str:
    value = want.get(name)
    if not isinstance(value, str):
        raise TypeError(f"a STORE {want.get('op')}'s {name!r} is a str, not {value!r}"[:200])
    return value


def _int(want: dict[str, Any], name: str) -> int:
    value = want.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"a STORE {want.get('op')}'s {name!r} is an int >= 0, not {value!r}"[:200])
    return value


def _as_kt(exc: BaseException) -> BaseException:
    """What a kt process is told: kt's errors as they are, the rest as a ProtocolError
    naming what was wrong with its request (or ValueGoneError, a read of a dropped value)."""
    if isinstance(exc, KtError):
        return exc
    if isinstance(exc, TimeoutError):
        return GetTimeoutError(f"no byte of the value came for {TIMEOUT_S:.0f} s")
    return ProtocolError(f"{type(exc).__name__}: {exc}")


_VERBS = {
    "reserve": DataService.reserve,
    "write": DataService.write,
    "seal": DataService.seal,
    "abandon": DataService.abandon,
    "locate": DataService.locate,
    "get": DataService.get,
    "fetch": DataService.fetch,
    "route": DataService.route,
    "chunk": DataService.chunk,
    "ls": DataService.ls,
    "rm": DataService.rm,
}
