"""The data store between pods: a replica pulled through the value's broadcast tree.

Who calls it: `kt.supervisor.server.Supervisor`, when one of its getters asks for a value
another pod holds ("fetch"). The origin pod names the source to pull from ("route", a
node of its tree, `kt.supervisor.data.route`); the bytes come from that source in
`CHUNK`-byte pieces, `WINDOW` of them asked at once, each written into the replica as it
arrives, so the pods below this one can pull it while it fills. A source that fails is
reported to the origin, which names the next one up the tree. Supervisors talk to each
other in orjson and raw bytes only (`serialization.raw_parts`): nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import orjson

from kt.core import protocol, serialization
from kt.core.protocol import FrameFlag, FrameKind
from kt.supervisor.data import Entry, EntryState
from kt.supervisor.fetch import FetchError, connect, read_frame

CHUNK = 8 * 2**20
WINDOW = 4
TIMEOUT_S = 120.0  # one chunk, from a source that has it or is filling it
ATTEMPTS = 8  # sources tried (each failure names the next one up the tree)
Address = tuple[str, int]


class ValueGone(Exception):
    """The origin no longer holds this value (removed or replaced)."""


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _request(
    address: Address, token: str, caller: str, header: dict[str, object]
) -> dict[str, object]:
    """One STORE request answered in orjson, on a connection of its own."""
    reader, writer = await connect(address, token, caller)
    try:
        writer.write(protocol.encode(FrameKind.STORE, 1, header))
        kind, flags, _, _, payload = await asyncio.wait_for(read_frame(reader), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise FetchError(f"lost {address[0]}:{address[1]}: {exc}") from None
    finally:
        writer.close()
    if kind != FrameKind.RESULT or flags & FrameFlag.ERROR:
        raise FetchError(f"{address[0]}:{address[1]} refused {header.get('op')}")
    answer: dict[str, object] = orjson.loads(serialization.raw_of(payload))
    return answer


async def replicate(
    entry: Entry,
    origin: Address,
    origin_token: str,
    *,
    node: str,
    node_token: str,
    caller: str,
    counted: Callable[[int], None],
) -> None:
    """Fill `entry` (a replica) through the tree of its origin; `counted` gets each
    chunk's size.

    Raises:
        FetchError: the origin cannot be reached, or `ATTEMPTS` sources failed.
        ValueGone: the origin no longer holds the value, or this pod dropped `entry`.
    """
    failed: str | None = None
    last: FetchError | None = None
    for _ in range(ATTEMPTS):
        if entry.state is EntryState.GONE:
            raise ValueGone(entry.key)  # dropped here meanwhile: nobody wants the rest
        if entry.have >= entry.size:
            return
        ask: dict[str, object] = {
            "op": "route",
            "k": entry.key,
            "vid": entry.vid,
            "node": node,
            "t": node_token,
        }
        if failed is not None:
            ask["failed"] = failed
        answer = await _request(origin, origin_token, caller, ask)
        if answer.get("gone"):
            raise ValueGone(entry.key)
        try:
            source, token = str(answer["source"]), str(answer["t"])
            address = _address(source)
        except (KeyError, ValueError) as exc:
            raise FetchError(f"the origin's answer {answer!r:.100} names no source") from exc
        try:
            await _pull(entry, address, token, caller, counted)
        except FetchError as exc:
            failed = source  # the origin names the next source up the tree
            last = exc
    if entry.state is EntryState.GONE:
        raise ValueGone(entry.key)
    if entry.have < entry.size:
        raise FetchError(f"no source sent {entry.key!r} in {ATTEMPTS} tries: {last}")


async def _pull(
    entry: Entry, source: Address, token: str, caller: str, counted: Callable[[int], None]
) -> None:
    reader, writer = await connect(source, token, caller)
    asked: dict[int, tuple[int, int]] = {}  # req id -> (offset, length)
    arrived: dict[int, memoryview] = {}  # offset -> bytes, ahead of `entry.have`
    offset = entry.have
    req_id = 0
    try:
        while entry.have < entry.size:
            while len(asked) < WINDOW and offset < entry.size:
                n = min(CHUNK, entry.size - offset)
                req_id += 1
                asked[req_id] = (offset, n)
                want = {"op": "chunk", "k": entry.key, "vid": entry.vid, "off": offset, "n": n}
                writer.write(protocol.encode(FrameKind.STORE, req_id, want))
                offset += n
            kind, flags, got, _, payload = await asyncio.wait_for(read_frame(reader), TIMEOUT_S)
            where = asked.pop(got, None)
            if kind != FrameKind.RESULT or flags & FrameFlag.ERROR or where is None:
                raise FetchError(f"{source[0]}:{source[1]} could not send {entry.key!r}")
            data = serialization.raw_of(payload)
            if len(data) != where[1]:
                raise FetchError(f"{source[0]}:{source[1]} sent a short chunk")
            arrived[where[0]] = data
            while entry.have in arrived:
                chunk = arrived.pop(entry.have)
                if entry.state is EntryState.GONE:
                    return  # evicted or replaced meanwhile: nobody wants the rest
                entry.view[entry.have : entry.have + len(chunk)] = chunk
                entry.have += len(chunk)
                counted(len(chunk))
                entry.advanced()
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        raise FetchError(f"lost {source[0]}:{source[1]} while pulling: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            writer.close()
