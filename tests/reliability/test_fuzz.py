"""Generated frames thrown at a live supervisor (a local pool's pod), with hypothesis.

Behaviours covered:
- before HELLO and after a HELLO with the pool's token, each generated example (a frame
  of any kind, flags, route and request id, whose header is JSON of any shape or random
  bytes, whose length is right or wrong, or plain random bytes, possibly several frames
  in a row) gets at most a reply and a close: the supervisor neither crashes nor keeps a
  connection it refused, and it never answers before HELLO with anything but REFUSED;
- afterwards another caller's actor still answers with its state, and the supervisor's
  RSS grew by less than 64 MiB across all examples (nothing held per connection).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kt
from kt.core import protocol
from kt.core.protocol import FrameKind
from tests.reliability.target import hello, live_target

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def target() -> Any:
    target = live_target(kt.Compute(cpus=1, replicas=1, backend="local", name="fuzz-target"))
    yield target
    kt.kill(target.actor)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)  # what JSON (orjson) carries
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
headers = st.one_of(
    st.dictionaries(
        st.sampled_from(["a", "m", "v", "token", "caller", "host", "actor", "src", "x"]),
        json_values,
        max_size=5,
    ).map(orjson.dumps),
    st.binary(max_size=64),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 255) | st.sampled_from(list(FrameKind)))
    header = draw(headers)
    payload = draw(st.binary(max_size=256))
    body = header + payload
    length = protocol.PREFIX_SIZE - protocol.LENGTH_SIZE + len(body)
    length = draw(st.just(length) | st.integers(0, 1 << 20))
    prefix = protocol.PREFIX.pack(
        length,
        int(kind),
        draw(st.integers(0, 255)),
        min(len(header), draw(st.sampled_from([len(header), 0xFFFF, 0]))),
        draw(st.integers(0, (1 << 32) - 1)),
        draw(st.integers(0, (1 << 64) - 1)),
    )
    return prefix + body


examples = st.lists(frames(), min_size=1, max_size=3).map(b"".join) | st.binary(max_size=512)


def _throw(address: tuple[str, int], *chunks: bytes) -> bytes:
    """Send the chunks; read what comes back until closed, or for 0.3 s of quiet."""
    got = b""
    with socket.create_connection(address, 5) as s:
        s.settimeout(0.3)
        try:
            for chunk in chunks:
                s.sendall(chunk)
            while data := s.recv(1 << 16):
                got += data
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    return got


def _kinds(data: bytes) -> list[int]:
    kinds = []
    while len(data) >= protocol.PREFIX_SIZE:
        length, kind = protocol.PREFIX.unpack_from(data, 0)[:2]
        kinds.append(kind)
        data = data[protocol.LENGTH_SIZE + length :]
    return kinds


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-hello", "after-hello"])
def test_generated_frames_leave_the_supervisor_serving(target: Any, authenticated: bool) -> None:
    rss_before = target.supervisor.memory_info().rss
    deadline = time.monotonic() + 60  # a bounded run: hypothesis stops at the examples or here

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(data=examples)
    def throw(data: bytes) -> None:
        if time.monotonic() > deadline:
            return
        if authenticated:
            reply = _throw(target.address, hello(target.token, caller="fuzz"), data)
            assert _kinds(reply)[:1] == [FrameKind.WELCOME], reply[:64]
        else:
            reply = _throw(target.address, data)
            assert set(_kinds(reply)) <= {FrameKind.REFUSED}, reply[:64]
        assert target.supervisor.is_running()

    throw()
    before = target.actor.incr()
    assert target.actor.incr() == before + 1
    growth = target.supervisor.memory_info().rss - rss_before
    assert growth < 64 << 20, f"the supervisor grew by {growth >> 20} MiB"
