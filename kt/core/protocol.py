"""The kt wire format: bytes only, no sockets, no asyncio.

Every message is one frame, little-endian:

    length  u32   bytes that follow this field
    kind    u8    a FrameKind
    flags   u8    FrameFlag bits
    hlen    u16   length of the header
    route   u32   set by a supervisor to tag which connection a relayed call came from
    req_id  u64   chosen by the caller; replies and stream items echo it
    header  hlen bytes of orjson (a small dict, or b"" when the kind needs none)
    payload the rest: opaque bytes (serialization.py's layout), relayed unread

Kinds:
    HELLO         caller -> supervisor, first frame: {"v", "token", "caller", "host"}
    WELCOME       supervisor -> caller: {"v", "pod", "shm"}; "shm" is true when "host"
                  (kt.core.shm.host_key) matches the pod's: large payloads may then
                  travel through /dev/shm. Any other first frame closes the link
    REFUSED       supervisor -> caller: {"error", "message"}; the link closes after it
    CREATE_ACTOR  {"actor", "cls", "name", "max_concurrency", "env"}; payload (cls, args,
                  kwargs); the worker sets "env" in os.environ before unpickling
    CALL          {"a": actor, "m": method}; payload (args, kwargs)
    RESULT        ends a request; payload is the value, or an error when flags has ERROR.
                  With LENDS, a worker's RESULT or ITEM has {"a": actor}: the Refs lent in
                  it are asked for from that actor. A RESULT from a caller answers a WAIT
    ITEM          one item of a streaming (generator) call; a RESULT ends the stream
    KILL_ACTOR    {"actor"}; answered by a RESULT
    CANCEL        {"a": actor}: best-effort cancel of request req_id
    LOG           supervisor -> owner: {"src": prefix}; payload utf-8 lines
    PING / PONG   liveness; PONG echoes req_id
    DIED          supervisor -> the actor's owner: {"actor", "exit_code", "signal", "oom",
                  "reason", "cause", "lines"} (a DeathCause value; the last 20 lines it
                  printed), sent before the calls in flight are failed
    LOOKUP        {"name", "namespace"}: answered by a RESULT whose payload is
                  {"actor", "cls", "methods"} or None
    WAIT          a borrower asks for the outcome of a lent Ref; payload: the lend id
                  (u64). {"a": actor, "l": label} asks an actor of the pod (the supervisor
                  relays it to that actor's own caller link); {"r": route, "l": label}
                  asks the caller on that route (the one that sent the Ref in a call).
                  Answered by a RESULT (LENDS when the outcome lends more Refs), or by
                  the supervisor's OwnerDiedError when the owner is gone
    SYNC          code sync (`kt.core.sync`, `kt.supervisor.store`), {"op", "v": version}:
                  "offer", payload the orjson manifest, answered with the sha256s the
                  pod lacks; "blobs", payload u32 n + orjson [[sha256, size], ...] (n
                  bytes) + the blobs' bytes back to back, answered with None; "pull",
                  {"from": "host:port"}, payload orjson [[sha256, size], ...]: fetch
                  them from that pod, answered with None once stored; "get", payload
                  orjson [sha256, ...], answered with a RESULT whose payload is laid
                  out as "blobs" (pod to pod); "commit", answered with None once the
                  version's tree is built. Never unpickled
    IMAGE         {"key": the last step's key}; payload the orjson steps
                  (`kt.core.image.wire`): run what the pod has not run yet, streaming
                  LOG frames {"src": "(image pod=P)"}, answered with None, or with an
                  ImageError naming the step that failed
    STORE         the data store (`kt.actors.datastore`), {"op", "k": key}: "put",
                  payload a value as a RESULT carries it (never unpickled here; held
                  until the pod ends or "rm"), answered with None; "get", answered
                  with a RESULT whose payload is the value, or a DataKeyError naming
                  the pod's nearest keys; "ls", {"p": prefix}, answered with
                  {key: size}; "rm", answered with whether it was there
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import orjson

from kt.core.errors import ProtocolError

VERSION = 1

PREFIX = struct.Struct("<IBBHIQ")
PREFIX_SIZE = PREFIX.size  # 20
LENGTH_SIZE = 4
ROUTE_OFFSET = 8  # byte offset of `route` inside a frame


class FrameKind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    CREATE_ACTOR = 4
    CALL = 5
    RESULT = 6
    ITEM = 7
    KILL_ACTOR = 8
    CANCEL = 9
    LOG = 10
    PING = 11
    PONG = 12
    DIED = 13
    LOOKUP = 14
    WAIT = 15
    SYNC = 16
    IMAGE = 17
    STORE = 18


class FrameFlag(enum.IntFlag):
    NONE = 0
    ERROR = 1
    SHM_OK = 2
    """Set by a supervisor on a relayed CALL: the caller shares this host's /dev/shm."""
    LENDS = 4
    """The payload holds Refs lent by its sender (`kt.core.ref`): ask the sender for them."""


FLAGS_OFFSET = 5  # byte offset of `flags` inside a frame


def encode_prefix(
    kind: int, req_id: int, header: bytes, payload_len: int, *, flags: int = 0, route: int = 0
) -> bytes:
    """The fixed 20-byte prefix; the caller writes header and payload after it."""
    return PREFIX.pack(
        PREFIX_SIZE - LENGTH_SIZE + len(header) + payload_len,
        kind,
        flags,
        len(header),
        route,
        req_id,
    )


def encode(
    kind: int,
    req_id: int = 0,
    header: dict[str, Any] | bytes | None = None,
    payload: bytes = b"",
    *,
    flags: int = 0,
    route: int = 0,
) -> bytes:
    """One whole frame as bytes; for small frames off the hot path."""
    hdr = header if isinstance(header, bytes) else (orjson.dumps(header) if header else b"")
    return encode_prefix(kind, req_id, hdr, len(payload), flags=flags, route=route) + hdr + payload


# -- the gateway's routing preamble -------------------------------------------------------
# A driver outside the cluster reaches a pod through the kt gateway (kt.k8s.gateway): it
# sends one line, `KTGW1 {"target": "<pod ip>:<port>", "token": "<pool token>"}`, and reads
# one line back, `ok` or `refused: <why>`; from then on the gateway relays bytes unchanged
# (the HELLO that follows is checked by the pod as always).
GATEWAY_MAGIC = b"KTGW1 "
GATEWAY_PREAMBLE_MAX = 4096  # bytes, newline included
GATEWAY_OK = b"ok\n"
# `refused: <code>: <why>`; token: the pool's token is wrong; target: not a live kt pod's
# supervisor (yet); upstream: the pod does not accept connections; preamble: not one;
# internal: the gateway could not decide (the API server did not answer)
GATEWAY_REFUSALS = ("token", "target", "upstream", "preamble", "internal")


def gateway_preamble(target: tuple[str, int], token: str) -> bytes:
    body = orjson.dumps({"target": f"{target[0]}:{target[1]}", "token": token})
    return GATEWAY_MAGIC + body + b"\n"


def parse_gateway_preamble(line: bytes) -> tuple[str, int, str]:
    """(host, port, token) of a preamble line.

    Raises:
        ProtocolError: it is not one.
    """
    if not line.startswith(GATEWAY_MAGIC) or not line.endswith(b"\n"):
        raise ProtocolError("not a kt gateway preamble")
    try:
        body = orjson.loads(line[len(GATEWAY_MAGIC) :])
        host, _, port = str(body["target"]).rpartition(":")
        token = body["token"]
        if not host or not isinstance(token, str) or not token:
            raise ValueError("empty target or token")
        return host, int(port), token
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"bad gateway preamble: {exc}") from None


PONG_FRAME = encode(FrameKind.PONG)  # what the gateway sends an idle driver (a heartbeat)


LEND_ID = struct.Struct("<Q")  # a WAIT's payload
BLOB_INDEX = struct.Struct("<I")  # a SYNC "blobs" payload starts with its index's length


def join_blobs(blobs: list[tuple[str, bytes]]) -> list[bytes]:
    """A SYNC "blobs" payload: u32 n, orjson [[sha256, size], ...] (n bytes), the bytes."""
    index = orjson.dumps([[digest, len(data)] for digest, data in blobs])
    return [BLOB_INDEX.pack(len(index)), index, *(data for _, data in blobs)]


def split_blobs(payload: memoryview) -> list[tuple[str, memoryview]]:
    """The blobs of a payload `join_blobs` made, as views into it."""
    (size,) = BLOB_INDEX.unpack_from(payload)
    start = BLOB_INDEX.size + size
    out = []
    for digest, length in orjson.loads(payload[BLOB_INDEX.size : start]):
        out.append((str(digest), payload[start : start + int(length)]))
        start += int(length)
    return out


def decode_header(header: bytes | memoryview) -> dict[str, Any]:
    if not header:
        return {}
    value = orjson.loads(header)
    if not isinstance(value, dict):
        raise ValueError("frame header is not a JSON object")
    return value


def orjson_dumps(header: dict[str, Any]) -> bytes:
    return orjson.dumps(header)
