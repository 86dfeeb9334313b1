"""Hostile and broken STORE requests against a live pod's supervisor (a local pool's):
each is answered with an error that names what was wrong, on a connection that stays
open and serves the next request, and none leaves anything behind.

Behaviours covered:
- headers that are not objects, unknown or missing ops, fields missing or of the wrong
  type, negative or boolean sizes and offsets, a fetch from nowhere: an error answer each
  (ProtocolError naming the field), then an `ls` on the same connection works;
- a read of a value id the pod does not hold: ValueGoneError (kt.get looks again);
- a put reserved by a connection that then closes: dropped (no pending put left), and a
  reserve of a negative size makes no file;
- a value replaced while a getter that does not read is still being sent the old one:
  the old file is not reused for the next value, so the slow getter gets the old bytes
  intact.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import kt
from kt.core import protocol, serialization, shm
from kt.core.errors import ProtocolError, ValueGoneError
from kt.core.protocol import FrameFlag, FrameKind
from tests.reliability.target import Target, hello, live_target
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(120)
MIB = 2**20


class Holder:
    def put(self, key: str, value: Any) -> None:
        kt.put(key, value)

    def get_sum(self, key: str) -> int:
        return int(kt.get(key)["a"].sum())


POOL = kt.Compute(cpus=1, replicas=1, backend="local", name=f"store-frames-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    target = live_target(POOL)
    yield target
    kt.kill(target.actor)


class Link:
    """A raw connection past HELLO that sends STORE frames and reads their answers."""

    def __init__(self, target: Target) -> None:
        self.sock = socket.create_connection(target.address, 10)
        self.sock.sendall(hello(target.token, caller="store-frames"))
        kind, _, _ = self.read()
        assert kind == FrameKind.WELCOME
        self.req = 0

    def send(self, header: Any, payload: bytes = b"") -> int:
        self.req += 1
        head = header if isinstance(header, bytes) else protocol.orjson_dumps(header)
        prefix = protocol.encode_prefix(FrameKind.STORE, self.req, head, len(payload))
        self.sock.sendall(prefix + head + payload)
        return self.req

    def read(self) -> tuple[int, int, bytes]:
        def exactly(n: int) -> bytes:
            got = b""
            while len(got) < n:
                chunk = self.sock.recv(min(n - len(got), 1 << 20))
                if not chunk:
                    raise ConnectionError("the supervisor closed the connection")
                got += chunk
            return got

        prefix = exactly(protocol.PREFIX_SIZE)
        length, kind, flags, hlen, _, _ = protocol.PREFIX.unpack(prefix)
        rest = exactly(protocol.LENGTH_SIZE + length - protocol.PREFIX_SIZE)
        return kind, flags, rest[hlen:]

    def ask(self, header: Any) -> Any:
        """The answer to one request: its value, or its error (returned, not raised)."""
        self.send(header)
        kind, flags, payload = self.read()
        assert kind == FrameKind.RESULT
        if flags & FrameFlag.ERROR:
            return serialization.loads_exception(payload)
        return serialization.loads(payload)

    def close(self) -> None:
        self.sock.close()


BAD = [
    (b"[1, 2]", "JSON object"),
    ({"op": "steal"}, "op is one of"),
    ({"k": "x"}, "op is one of"),
    ({"op": "reserve", "n": 10}, "'k' is a str"),
    ({"op": "reserve", "k": "x", "n": -5}, "'n' is an int >= 0"),
    ({"op": "reserve", "k": "x", "n": True}, "'n' is an int >= 0"),
    ({"op": "reserve", "k": "x", "n": "10"}, "'n' is an int >= 0"),
    ({"op": "write", "id": 7, "off": 0}, "'id' is a str"),
    ({"op": "write", "id": "nope", "off": -1}, "'off' is an int >= 0"),
    ({"op": "seal", "id": "nope"}, "no put 'nope' is reserved"),
    ({"op": "seal", "id": "nope", "dev": 5}, "'dev' is a str"),
    ({"op": "seal", "id": "nope", "dev": "x" * 600}, "dev is at most 512"),
    ({"op": "locate", "k": ["x"]}, "'k' is a str"),
    ({"op": "chunk", "k": "x", "vid": "v", "off": -8, "n": 1}, "'off' is an int >= 0"),
    ({"op": "fetch", "k": "x", "vid": "v", "n": 4, "from": "nowhere", "t": "t"}, "host:port"),
    ({"op": "fetch", "k": "x", "vid": "v", "n": -4, "from": "h:1", "t": "t"}, "'n' is an int"),
    ({"op": "route", "k": "x"}, "'vid' is a str"),
    ({"op": "ls", "p": 5}, "'p' is a str"),
    ({"op": "rm"}, "'k' is a str"),
]


def _files_of(target: Target) -> set[str]:
    prefix = f"kt-shm-{target.supervisor.pid}-"
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)}


def test_malformed_requests_get_an_error_each_and_the_link_keeps_serving(target: Target) -> None:
    link = Link(target)
    try:
        files = _files_of(target)
        for header, why in BAD:
            answer = link.ask(header)
            assert isinstance(answer, ProtocolError | ValueGoneError), (header, answer)
            assert why in str(answer), (header, str(answer))
        assert _files_of(target) == files  # no refused reserve made a file
        assert isinstance(link.ask({"op": "get", "k": "x", "vid": "v"}), ValueGoneError)
        assert isinstance(link.ask({"op": "ls", "p": ""}), dict)  # answered, not closed
        reserved = link.ask({"op": "reserve", "k": f"k-{uuid.uuid4().hex}", "n": 1000})
        assert isinstance(reserved, dict) and reserved["id"]
    finally:
        link.close()
    assert target.supervisor.is_running()
    assert target.actor.incr() > 1


def test_a_put_whose_connection_closes_is_dropped(target: Target) -> None:
    link = Link(target)
    before = pod_status(target.actor)["data"]["pending"]
    reserved = link.ask({"op": "reserve", "k": f"half-{uuid.uuid4().hex}", "n": 4 * MIB})
    assert pod_status(target.actor)["data"]["pending"] == before + 1, reserved
    link.close()
    deadline = time.monotonic() + 10
    while pod_status(target.actor)["data"]["pending"] > before:
        assert time.monotonic() < deadline, "the closed connection's put is still pending"
        time.sleep(0.1)


def test_a_value_being_sent_is_not_overwritten_when_its_file_is_freed(target: Target) -> None:
    """The slow getter asks for 64 MiB and reads nothing until the value was replaced
    and another value of the same size was put: its bytes are still the first value's."""
    holder = kt.cls(Holder).options(compute=POOL, cpus=0).remote()
    key, other = f"slow-{uuid.uuid4().hex[:6]}", f"next-{uuid.uuid4().hex[:6]}"
    ones = np.ones(64 * MIB, dtype=np.uint8)
    holder.put.remote(key, {"a": ones}).result(timeout=60)
    link = Link(target)
    try:
        meta = link.ask({"op": "locate", "k": key})
        link.send({"op": "get", "k": key, "vid": meta["vid"]})  # not read yet
        time.sleep(0.5)  # the supervisor queues what the socket does not take
        holder.put.remote(key, {"a": np.full(64 * MIB, 2, dtype=np.uint8)}).result(timeout=60)
        holder.put.remote(other, {"a": np.full(64 * MIB, 3, dtype=np.uint8)}).result(timeout=60)
        kind, flags, payload = link.read()
        assert kind == FrameKind.RESULT and not flags & FrameFlag.ERROR
        got = serialization.loads(payload)["a"]
        assert got.shape == ones.shape and bool((got == 1).all()), np.unique(got)[:5]
        assert holder.get_sum.remote(other).result(timeout=60) == 3 * 64 * MIB
    finally:
        link.close()
        kt.kill(holder)
