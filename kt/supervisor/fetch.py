"""Code sync between pods: fetch blobs from another pod's store.

Who calls it: `kt.supervisor.server.Supervisor`, for a SYNC "pull" from the driver, which
names a pod of the same pool that already holds the version (`kt.actors.push` chooses
it, so a large pool does not pull every blob from the driver). One connection to that
pod's supervisor, authenticated with the pool's token like any caller, then SYNC "get"
requests of at most `BATCH` bytes each, answered with the blobs' bytes (never pickled).
`connect` and `read_frame` also carry the data store's pulls (`kt.supervisor.pull`).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncGenerator

import orjson

from kt.core import protocol
from kt.core.protocol import FrameFlag, FrameKind

BATCH = 16 * 2**20
_LENGTH = struct.Struct("<I")
TIMEOUT_S = 300.0


class FetchError(Exception):
    """The source pod refused or went away."""


async def connect(
    address: tuple[str, int], token: str, caller: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the supervisor at `address`, past its HELLO.

    Raises:
        FetchError: it cannot be reached, or refused.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 30)
    except (OSError, TimeoutError) as exc:
        raise FetchError(f"cannot reach {address[0]}:{address[1]}: {exc}") from None
    try:
        hello = {"v": protocol.VERSION, "token": token, "caller": caller}
        writer.write(protocol.encode(FrameKind.HELLO, 0, hello))
        kind, _, _, header, _ = await asyncio.wait_for(read_frame(reader), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        writer.close()
        raise FetchError(f"lost {address[0]}:{address[1]} at its HELLO: {exc}") from None
    if kind != FrameKind.WELCOME:
        writer.close()
        raise FetchError(f"{address[0]}:{address[1]} refused: {header[:200]!r}")
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes, memoryview]:
    """(kind, flags, req_id, header, payload) of the next frame."""
    head = await reader.readexactly(protocol.LENGTH_SIZE)
    (length,) = _LENGTH.unpack(head)
    data = memoryview(head + await reader.readexactly(length))
    _, kind, flags, hlen, _, req_id = protocol.PREFIX.unpack_from(data)
    start = protocol.PREFIX_SIZE
    return kind, flags, req_id, bytes(data[start : start + hlen]), data[start + hlen :]


async def fetch(
    address: tuple[str, int], token: str, wanted: list[tuple[str, int]], caller: str
) -> AsyncGenerator[list[tuple[str, memoryview]], None]:
    """The wanted blobs ((sha256, size) pairs), batch by batch, from the pod at `address`.

    Raises:
        FetchError: the pod refused, failed a request, or closed the connection.
    """
    reader, writer = await connect(address, token, caller)
    try:
        batches: list[list[str]] = [[]]
        size = 0
        for digest, length in wanted:
            if size >= BATCH:
                batches.append([])
                size = 0
            batches[-1].append(digest)
            size += length
        for req_id, batch in enumerate(batches, start=1):
            if not batch:
                continue
            body = orjson.dumps(batch)
            writer.write(protocol.encode(FrameKind.SYNC, req_id, {"op": "get"}, body))
            await writer.drain()
            kind, flags, _, _, payload = await asyncio.wait_for(read_frame(reader), TIMEOUT_S)
            if kind != FrameKind.RESULT or flags & FrameFlag.ERROR:
                raise FetchError(f"{address[0]}:{address[1]} could not send the blobs")
            yield protocol.split_blobs(payload)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise FetchError(f"lost {address[0]}:{address[1]} while fetching: {exc}") from None
    finally:
        writer.close()
