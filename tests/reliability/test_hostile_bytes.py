"""Hostile and malformed bytes at a live supervisor (a local pool's pod).

Behaviours covered:
- a length prefix of 4 GiB, before HELLO (the cap is 16 KiB there) and after it (the cap
  is kt.config.max_frame_bytes, 2 GiB), followed by 64 KiB of zeros: a REFUSED frame
  naming the frame's size and the cap, the connection closed, and the supervisor's RSS
  does not grow (nothing was allocated for it); a length shorter than a frame's prefix
  is refused too;
- after HELLO: an unknown frame kind, a CALL header with unknown fields, a header that is
  not JSON, a header length past the frame's end: REFUSED saying which, then closed;
  before HELLO: random bytes, a frame cut short, a HELLO of a newer protocol version or
  with unknown fields: refused or closed, nothing run;
- a pickle that would create a file, sent as CREATE_ACTOR and CALL payloads before HELLO
  and after a HELLO with a wrong token: refused, the file never appears (nothing is
  unpickled before the token check);
- through all of it, another caller's actor keeps its state and answers.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from typing import Any

import pytest

import kt
from kt.core import protocol, serialization
from kt.core.protocol import FrameKind
from tests.reliability.target import Target, live_target
from tests.reliability.target import frames as _frames
from tests.reliability.target import hello as _hello

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def target(pool: kt.Compute) -> Target:
    return live_target(pool)


def _exchange(
    address: tuple[str, int], *sends: bytes, wait: float = 10.0, until: int = 0
) -> list[Any]:
    """Send each chunk, then read until the supervisor closes (or sends a frame of kind
    `until`): the frames it sent."""
    with socket.create_connection(address, 5) as s:
        s.settimeout(wait)
        for data in sends:
            try:
                s.sendall(data)
            except OSError:
                break  # closed on us: what it said is still readable
        got = b""
        try:
            while chunk := s.recv(1 << 16):
                got += chunk
                if until and any(kind == until for kind, _ in _frames(got)):
                    break
        except ConnectionResetError:
            pass
        except TimeoutError as exc:
            raise AssertionError(f"still open after {wait} s; it sent {_frames(got)}") from exc
    return _frames(got)


def _refusal(frames: list[Any]) -> str:
    assert frames and frames[-1][0] == FrameKind.REFUSED, frames
    return str(frames[-1][1]["message"])


def _still_serving(target: Any) -> None:
    before = target.actor.incr()
    assert target.actor.incr() == before + 1


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-hello", "after-hello"])
def test_a_huge_length_prefix_costs_no_memory(target: Any, authenticated: bool) -> None:
    rss = target.supervisor.memory_info().rss
    hello = [_hello(target.token)] if authenticated else []
    huge = struct.pack("<I", 2**32 - 1) + bytes(64 * 1024)
    frames = _exchange(target.address, *hello, huge)
    cap = 2**31 if authenticated else 16 * 1024
    assert f"a frame of {2**32 + 3} bytes (at most {cap} here)" in _refusal(frames)
    time.sleep(0.5)
    grown = target.supervisor.memory_info().rss - rss
    assert grown < 32 * 2**20, f"the supervisor grew by {grown / 2**20:.0f} MiB"
    short = struct.pack("<I", 3) + bytes(16)  # shorter than a frame's prefix
    assert "a frame of 7 bytes" in _refusal(_exchange(target.address, *hello, short))
    _still_serving(target)


def test_a_long_frame_announced_costs_only_what_arrives(target: Any) -> None:
    """After HELLO, 1.5 GiB is within the cap: the frame is waited for, but its buffer
    takes memory only as bytes come, and the WELCOME before it is not held up."""
    rss = target.supervisor.memory_info().rss
    with socket.create_connection(target.address, 5) as s:
        s.settimeout(10)
        s.sendall(_hello(target.token) + struct.pack("<I", 3 * 2**29) + bytes(64 * 1024))
        assert _frames(s.recv(1 << 16))[0][0] == FrameKind.WELCOME
        time.sleep(0.5)
        grown = target.supervisor.memory_info().rss - rss
        assert grown < 32 * 2**20, f"the supervisor grew by {grown / 2**20:.0f} MiB"
    _still_serving(target)


def test_malformed_frames_after_hello_are_refused_saying_which(target: Any) -> None:
    hello = _hello(target.token)
    unknown = protocol.encode(99, 1, {"x": 1})
    not_json = protocol.encode_prefix(FrameKind.CALL, 2, b"{nope", 0) + b"{nope"
    past_end = bytearray(protocol.encode(FrameKind.CALL, 3, {"a": "x", "m": "y"}))
    struct.pack_into("<H", past_end, 6, 5000)  # hlen beyond the frame
    extra = protocol.encode(FrameKind.CALL, 4, {"a": "x", "m": "y", "zzz": 1})
    for data, said in (
        (unknown, "unknown frame kind 99"),
        (extra, "a CALL header must be {'a', 'm'}, not ['a', 'm', 'zzz']"),
        (not_json, "a frame of kind 5 could not be handled"),
        (bytes(past_end), "a header of 5000 bytes in a frame of"),
    ):
        frames = _exchange(target.address, hello, data)
        assert frames[0][0] == FrameKind.WELCOME
        assert said in _refusal(frames), (said, frames)
    _still_serving(target)


def test_garbage_before_hello_is_refused_and_nothing_runs(target: Any) -> None:
    random = os.urandom(4096)
    frames = _exchange(target.address, random)
    assert not frames or frames[-1][0] == FrameKind.REFUSED
    cut = _hello(target.token)[:30]  # a frame cut short, then the caller goes
    with socket.create_connection(target.address, 5) as s:
        s.sendall(cut)
    newer = _exchange(target.address, _hello(target.token, protocol.VERSION + 1))
    assert f"protocol version {protocol.VERSION + 1}" in _refusal(newer)
    odd = {"v": protocol.VERSION, "token": target.token, "caller": "x", "color": "red"}
    unknown = _exchange(target.address, protocol.encode(FrameKind.HELLO, 0, odd))
    assert "HELLO has unknown fields ['color']" in _refusal(unknown)
    _still_serving(target)


class _Touch:
    """Unpickling it creates a file."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def test_a_pickle_without_the_token_executes_nothing(target: Any, tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    parts = serialization.dumps((_Touch(marker), (), {}))
    payload = b"".join(bytes(p) for p in parts)
    create = {"actor": "evil", "cls": "Evil", "name": "", "max_concurrency": 1, "env": {}}
    frames_out = [
        protocol.encode(FrameKind.CREATE_ACTOR, 1, create, payload),
        protocol.encode(FrameKind.CALL, 2, {"a": "evil", "m": "x"}, payload),
    ]
    for frame in frames_out:
        assert "missing or wrong token" in _refusal(_exchange(target.address, frame))
        wrong = _exchange(target.address, _hello("not-the-token"), frame)
        assert "missing or wrong token" in _refusal(wrong)
    time.sleep(1.0)  # a worker that unpickled it would have made the file by now
    assert not marker.exists()
    # the same payload with the token does run: the test would see it
    frame = protocol.encode(FrameKind.CREATE_ACTOR, 1, create, payload)
    _exchange(target.address, _hello(target.token), frame, wait=30, until=FrameKind.RESULT)
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    _still_serving(target)
