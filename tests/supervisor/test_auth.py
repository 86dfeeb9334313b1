"""The call channel refuses callers without the pool's token, before unpickling anything.

Covers: a CREATE_ACTOR / CALL sent without HELLO closes the connection and runs nothing;
a wrong token is REFUSED and runs nothing; the same frames with the right token do run
(so the side-effect check can fail); control HTTP's /status refuses a missing or wrong
Bearer token and answers the right one, while /healthz needs none.
"""

from __future__ import annotations

import json
import pathlib
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest

import kt
from kt.core import protocol, serialization
from kt.core.protocol import FrameKind


class Toucher:
    def __init__(self, path: str) -> None:
        pathlib.Path(path).write_text("init ran")

    def touch(self, path: str, marker: object = None) -> None:
        pathlib.Path(path).write_text("call ran")


class TouchOnUnpickle:
    """Unpickling this writes a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (_touch, (self.path, "unpickled"))


def _touch(path: str, text: str) -> str:
    pathlib.Path(path).write_text(text)
    return path


def _frames(actor_id: str, init_path: str, call_path: str) -> bytes:
    create = serialization.dumps_bytes((Toucher, (init_path,), {}))
    call = serialization.dumps_bytes(((call_path, TouchOnUnpickle(call_path + ".pickle")), {}))
    return protocol.encode(
        FrameKind.CREATE_ACTOR, 1, {"actor": actor_id, "cls": "Toucher"}, create
    ) + protocol.encode(FrameKind.CALL, 2, {"a": actor_id, "m": "touch"}, call)


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the supervisor sent before it closed the connection (it must close it)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with data unread on its side: closed all the same
    except TimeoutError:
        raise AssertionError("the supervisor kept an unauthenticated connection open") from None
    return data


def _kinds(data: bytes) -> list[int]:
    kinds, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        kinds.append(data[pos + 4])
        pos += 4 + length
    return kinds


def _address(pool: kt.Compute) -> tuple[str, int]:
    probe = kt.cls(Toucher).options(compute=pool, cpus=0)
    return probe.remote("/dev/null")._wait_placed(timeout=60)


def test_frames_without_hello_are_dropped_unrun(pool: kt.Compute, tmp_path: pathlib.Path) -> None:
    address = _address(pool)
    init_path, call_path = tmp_path / "init", tmp_path / "call"
    with socket.create_connection(address) as sock:
        sock.sendall(_frames("intruder1", str(init_path), str(call_path)))
        reply = _read_until_closed(sock)
    assert FrameKind.RESULT not in _kinds(reply)
    assert _kinds(reply) in ([], [FrameKind.REFUSED])
    time.sleep(1.0)
    assert not init_path.exists() and not call_path.exists()
    assert not pathlib.Path(f"{call_path}.pickle").exists()  # nothing was even unpickled


def test_wrong_token_is_refused_and_nothing_runs(pool: kt.Compute, tmp_path: pathlib.Path) -> None:
    address = _address(pool)
    init_path, call_path = tmp_path / "init", tmp_path / "call"
    hello = protocol.encode(FrameKind.HELLO, 0, {"v": protocol.VERSION, "token": "guess"})
    with socket.create_connection(address) as sock:
        sock.sendall(hello + _frames("intruder2", str(init_path), str(call_path)))
        reply = _read_until_closed(sock)
    assert _kinds(reply) == [FrameKind.REFUSED]
    time.sleep(1.0)
    assert not init_path.exists() and not call_path.exists()
    assert not pathlib.Path(f"{call_path}.pickle").exists()  # nothing was even unpickled


def test_right_token_runs_the_same_frames(pool: kt.Compute, tmp_path: pathlib.Path) -> None:
    handle = kt.cls(Toucher).options(compute=pool, cpus=0).remote(str(tmp_path / "probe"))
    address = handle._wait_placed(timeout=60)
    init_path, call_path = tmp_path / "init", tmp_path / "call"
    hello = protocol.encode(FrameKind.HELLO, 0, {"v": protocol.VERSION, "token": handle._token})
    with socket.create_connection(address) as sock:
        sock.sendall(hello + _frames("friend", str(init_path), str(call_path)))
        deadline = time.monotonic() + 30
        while not call_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert init_path.read_text() == "init ran"
    assert call_path.read_text() == "call ran"
    assert pathlib.Path(f"{call_path}.pickle").read_text() == "unpickled"


def test_status_needs_the_token_and_healthz_does_not(pool: kt.Compute) -> None:
    probe = kt.cls(Toucher).options(compute=pool, cpus=0).remote("/dev/null")
    host, port = probe._wait_placed(timeout=60)
    base = f"http://{host}:{port + 1}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        request = urllib.request.Request(f"{base}/status", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 401
    request = urllib.request.Request(
        f"{base}/status", headers={"Authorization": f"Bearer {probe._token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        status = json.loads(reply.read())
    assert any(a["class"] == "Toucher" for a in status["actors"])
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as reply:
        assert reply.status == 200
    kt.kill(probe)
