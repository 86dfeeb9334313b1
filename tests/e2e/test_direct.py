"""The data store's direct path (`kt.actors.direct`): a state dict's tensors go from the
process that put them straight into a getter's own, over torch.distributed point to
point. On CPU, gloo (transport="gloo"); NCCL, the default for CUDA tensors, runs the same
code and is tested in tests/gpu.

Behaviours covered:
- (both backends) an actor puts a state dict with transport="gloo"; an actor on another
  pod gets it into its own tensors (a transposed one among them) bit-identical and in
  place, received directly, not read from the store; a second get reuses the pair; a
  new put replaces the held copy and the getter receives the new values;
- the pod's host copy is there too: the driver gets the value, and a getter with numpy
  arrays reads the store;
- into= that does not match is refused naming the entry, nothing copied, nothing sent,
  and the holder serves the next get; three getters on other pods at once all get it;
- a put and get in one process copies from the held copy;
- the holder killed: a get reads the store's copy (same bytes); kt.rm drops the held
  copy at once in the putting process, and the sweep drops it in a holder whose key was
  removed elsewhere;
- a connection with a wrong token, or with garbage, is refused and the holder goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import struct
import time
import uuid
from typing import Any

import numpy as np
import pytest

import kt
from kt.actors import datastore, direct

pytestmark = pytest.mark.timeout(240)


class Side:
    def __init__(self, seed: int, rows: int = 256) -> None:
        import torch

        torch.manual_seed(seed)
        self.sd = {
            "w": torch.randn(rows, 1024),
            "b": torch.randn(7).to(torch.bfloat16),
            "t": torch.randn(64, 32).t(),  # not contiguous
            "none": torch.empty(0),
            "i": torch.arange(10, dtype=torch.int64) * seed,
        }

    def put(self, key: str, transport: str | None = "gloo") -> None:
        kt.put(key, self.sd, transport=transport)

    def reseed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        for v in self.sd.values():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape).to(v.dtype))

    def get_into(self, key: str) -> dict[str, str]:
        pointers = {k: v.data_ptr() for k, v in self.sd.items()}
        kt.get(key, into=self.sd, timeout=60)
        assert pointers == {k: v.data_ptr() for k, v in self.sd.items()}, "not in place"
        return self.digest()

    def get_into_numpy(self, key: str) -> dict[str, str]:
        arrays = {
            k: v.float().numpy() if k == "b" else v.numpy().copy() for k, v in self.sd.items()
        }
        arrays["b"] = self.sd["b"].clone()  # numpy has no bfloat16: a tensor stays
        kt.get(key, into=arrays, timeout=60)
        return {k: _digest(v) for k, v in arrays.items()}

    def try_into(self, key: str, rows: int) -> str:
        import torch

        wrong = dict(self.sd, w=torch.zeros(rows, 1024))
        try:
            kt.get(key, into=wrong, timeout=60)
        except kt.StateDictMismatchError as exc:
            assert not wrong["w"].any(), "copied despite the mismatch"
            return str(exc)
        return "accepted"

    def digest(self) -> dict[str, str]:
        return {k: _digest(v) for k, v in self.sd.items()}

    def counts(self) -> tuple[dict[str, int], list[str]]:
        return dataclasses.asdict(direct.counts), direct.held_keys()

    def put_get_here(self, key: str) -> dict[str, str]:
        import torch

        kt.put(key, self.sd, transport="gloo")
        mine = {k: torch.zeros_like(v) for k, v in self.sd.items()}
        kt.get(key, into=mine)
        return {k: _digest(v) for k, v in mine.items()}

    def rm(self, key: str) -> list[str]:
        kt.rm(key)
        return direct.held_keys()

    def pod(self) -> str:
        import os

        return os.environ["KT_POD"]


def _digest(v: Any) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        v = v.contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(v).view(np.uint8)).hexdigest()


def _pool(backend: str, replicas: int) -> kt.Compute:
    name = f"direct-{uuid.uuid4().hex[:6]}"
    return kt.Compute(cpus=1, replicas=replicas, backend=backend, name=name)


def _sides(pool: kt.Compute, n: int) -> list[Any]:
    sides = [kt.cls(Side).options(compute=pool, cpus=1).remote(i + 1) for i in range(n)]
    assert len({s.pod() for s in sides}) == n, "each side on a pod of its own"
    return sides


def test_a_state_dict_goes_straight_into_a_getter_on_another_pod(backend: str) -> None:
    holder, getter = _sides(_pool(backend, 2), 2)
    key = f"direct/{uuid.uuid4().hex[:6]}"
    holder.put(key)
    assert getter.get_into(key) == holder.digest()
    assert getter.get_into(key) == holder.digest()
    got, _ = getter.counts()
    sent, held = holder.counts()
    assert (got["received"], got["fallbacks"], sent["sent"]) == (2, 0, 2), (got, sent)
    assert got["bytes_received"] == sum(t.nbytes for t in Side(1).sd.values()) * 2
    assert held == [key]
    holder.reseed(9)
    holder.put(key)
    assert getter.get_into(key) == holder.digest()
    assert getter.counts()[0]["received"] == 3 and holder.counts()[1] == [key]
    stored = kt.get(key, timeout=30)  # the driver reads the pod's host copy
    assert {k: _digest(v) for k, v in stored.items()} == holder.digest()
    for s in (holder, getter):
        kt.kill(s)


def test_mismatch_concurrent_getters_the_store_copy_and_the_holders_end() -> None:
    holder, *getters = _sides(_pool("local", 4), 4)
    key = f"direct/{uuid.uuid4().hex[:6]}"
    holder.put(key)
    first = getters[0]
    why = first.try_into(key, 255)
    assert "'w' of" in why and "(256, 1024) is stored" in why and "nothing was copied" in why
    assert holder.counts()[0]["sent"] == 0
    digests = kt.get([g.get_into.remote(key) for g in getters], timeout=120)
    assert digests == [holder.digest()] * 3
    assert holder.counts()[0]["sent"] == 3
    assert first.get_into_numpy(key) == holder.digest()  # arrays: read from the store
    assert holder.counts()[0]["sent"] == 3
    kt.kill(holder)
    time.sleep(1)
    before = first.counts()[0]
    holder_digest = Side(1).digest()
    assert first.get_into(key) == holder_digest  # the pod's host copy
    after = first.counts()[0]
    assert after["received"] == before["received"] and after["fallbacks"] == before["fallbacks"] + 1
    for g in getters:
        kt.kill(g)


def test_put_and_get_in_one_process_and_the_held_copy_going() -> None:
    holder, getter = _sides(_pool("local", 2), 2)
    key = f"direct/{uuid.uuid4().hex[:6]}"
    assert holder.put_get_here(key) == holder.digest()
    assert holder.counts()[0]["local"] == 1
    assert holder.rm(key) == []  # the putter's rm drops its copy at once
    other = f"direct/{uuid.uuid4().hex[:6]}"
    holder.put(other)
    assert getter.get_into(other) == holder.digest()
    getter.rm(other)  # removed from another process: the holder's sweep finds it gone
    deadline = time.monotonic() + direct.SWEEP_S * 3 + 30
    while holder.counts()[1]:
        assert time.monotonic() < deadline, "the held copy of a removed key stayed"
        time.sleep(1)
    for s in (holder, getter):
        kt.kill(s)


def _say(sock: socket.socket, message: bytes) -> None:
    sock.sendall(struct.pack("!I", len(message)) + message)


def test_a_wrong_token_or_garbage_is_refused_and_the_holder_serves_on() -> None:
    holder, getter = _sides(_pool("local", 2), 2)
    key = f"direct/{uuid.uuid4().hex[:6]}"
    holder.put(key)
    found = datastore._locate(key)
    assert found is not None
    _, address = direct.parse_endpoint(found[2]["dev"])[:2]
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        _say(sock, b'{"t": "not-the-token", "from": "x"}')
        (size,) = struct.unpack("!I", sock.recv(4))
        assert b"not this pool's" in sock.recv(size)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        _say(sock, b"\xff\xfe not json")
        assert sock.recv(16) == b""  # closed on it
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(struct.pack("!I", 2**31))  # a length over the limit
        assert sock.recv(16) == b""
    assert getter.get_into(key) == holder.digest()
    assert getter.counts()[0]["received"] == 1
    for s in (holder, getter):
        kt.kill(s)
