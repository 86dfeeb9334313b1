"""A live supervisor to throw bytes at (a local pool's pod), shared by the hostile-bytes
and fuzz tests: its address, its pool's token, its process, and an actor on it whose
counter shows it still serves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psutil

import kt
from kt.actors.driver import get_driver
from kt.core import protocol
from kt.core.protocol import FrameKind
from kt.local.provider import kt_home


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


@dataclass(frozen=True)
class Target:
    address: tuple[str, int]
    token: str
    supervisor: psutil.Process
    actor: Any


def live_target(pool: kt.Compute) -> Target:
    """A Counter on `pool`'s one pod, answered once; the pod it runs on."""
    counter = kt.cls(Counter).options(compute=pool).remote()
    assert counter.incr() == 1
    driver = get_driver()
    name = driver.pool_name(pool, False)
    (slot,) = driver.pools[name].slots
    record = kt_home() / "local" / name / f"{slot.pod.name}.json"
    supervisor = psutil.Process(json.loads(record.read_text())["pid"])
    return Target(slot.pod.address, driver.pools[name].token, supervisor, counter)


def hello(token: str, version: int = protocol.VERSION, caller: str = "hostile") -> bytes:
    header = {"v": version, "token": token, "caller": caller, "host": "", "actor": ""}
    return protocol.encode(FrameKind.HELLO, 0, header)


def frames(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """The (kind, header) of each whole frame in `data`."""
    out = []
    while len(data) >= protocol.PREFIX_SIZE:
        length, kind, _, hlen, _, _ = protocol.PREFIX.unpack_from(data, 0)
        header = data[protocol.PREFIX_SIZE : protocol.PREFIX_SIZE + hlen]
        out.append((kind, protocol.decode_header(header) if header else {}))
        data = data[protocol.LENGTH_SIZE + length :]
    return out
