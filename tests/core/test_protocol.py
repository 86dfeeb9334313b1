"""Every frame kind round-trips through encode and FrameChannel's parser, in one read
or split at every byte boundary; a big frame gets a buffer of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kt.core import protocol
from kt.core.channel import BIG_FRAME, FrameChannel
from kt.core.protocol import FrameFlag, FrameKind


def _parse(chunks: list[bytes]) -> list[tuple[Any, ...]]:
    got: list[tuple[Any, ...]] = []

    def on_frame(
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> None:
        got.append((kind, flags, route, req_id, bytes(header), bytes(payload)))

    channel = FrameChannel(on_frame)
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            buf = channel.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            channel.buffer_updated(n)
            view = view[n:]
    return got


@pytest.mark.parametrize("kind", list(FrameKind))
def test_each_kind_round_trips(kind: FrameKind) -> None:
    frame = protocol.encode(
        kind, 7, {"a": "x", "m": "y"}, b"payload", flags=FrameFlag.ERROR, route=3
    )
    assert _parse([frame]) == [(kind, FrameFlag.ERROR, 3, 7, b'{"a":"x","m":"y"}', b"payload")]


def test_split_at_every_byte() -> None:
    frames = [protocol.encode(FrameKind.CALL, i, {"a": str(i)}, bytes([i]) * i) for i in range(5)]
    data = b"".join(frames)
    for cut in range(1, len(data)):
        got = _parse([data[:cut], data[cut:]])
        assert [g[3] for g in got] == list(range(5))


def test_big_frame_between_small_ones() -> None:
    big = bytes(range(256)) * (3 * BIG_FRAME // 256)
    frames = [
        protocol.encode(FrameKind.CALL, 1, None, b"a"),
        protocol.encode(FrameKind.CALL, 2, None, big),
        protocol.encode(FrameKind.CALL, 3, None, b"c"),
    ]
    data = b"".join(frames)
    got = _parse([data[i : i + 10000] for i in range(0, len(data), 10000)])
    assert [(g[3], g[5]) for g in got] == [(1, b"a"), (2, big), (3, b"c")]


def test_header_codec() -> None:
    assert protocol.decode_header(b"") == {}
    with pytest.raises(ValueError):
        protocol.decode_header(b"[1]")


def test_frames_over_a_real_socket() -> None:
    async def main() -> list[int]:
        got: list[int] = []
        done = asyncio.Event()

        def on_frame(kind: int, flags: int, route: int, req_id: int, *rest: Any) -> None:
            got.append(req_id)
            if req_id == 999:
                done.set()

        server = await asyncio.get_running_loop().create_server(
            lambda: FrameChannel(on_frame), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        _, client = await asyncio.get_running_loop().create_connection(
            lambda: FrameChannel(lambda *a: None), "127.0.0.1", port
        )
        for i in range(1000):
            client.send(protocol.encode(FrameKind.CALL, i, None, b"x" * (i % 7)))
        await asyncio.wait_for(done.wait(), 10)
        server.close()
        return got

    assert asyncio.run(main()) == list(range(1000))
