"""The kt gateway (`python -m kt.k8s.gateway`) on the test cluster.

Behaviours covered:
- a driver with KT_GATEWAY set runs a fan-out over 4 actors on 2 pods and an SPMD 2x2
  gloo group through it: every connection of that driver reaches its pods from the
  gateway's address, none from its own; with heartbeats every second, a link idle for 3 s
  still works (the PONGs go between frames); a state dict an actor holds for direct
  transfers is read from its pod's host copy, never dialled for;
- attacks, each refused with one logged line and nothing relayed: bytes that are not a
  preamble, a preamble never finished, one over the size cap, a target that is not a
  kt pod's supervisor port (the API server, an address with no kt pod), a real pod with a
  wrong token, bytes sent before `ok`; a connection closed before its first byte (a health
  probe) is not logged; a frame after `ok` that is not a HELLO is closed by
  the pod and runs nothing; afterwards a caller's HELLO through the gateway is welcomed;
- the PONG goes only between frames, whatever the reads' boundaries (pure), and is sent
  when the pod has been quiet for a heartbeat period, never inside a frame;
- a gateway whose API server takes connections and never answers refuses a caller
  within its lookup's bound, saying so, and goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import kt
from kt.actors.driver import get_driver
from kt.core import protocol
from kt.core.provider import get_provider
from kt.k8s.gateway import _Pipe
from kt.testing import cluster
from tests.charts import chart
from tests.distributed.torchrun import free_port
from tests.k8s import netns
from tests.k8s.kubectl import kubectl
from tests.k8s.silent import silent_api_server

pytestmark = pytest.mark.timeout(240)
SOURCE_IP = "127.254.0.1"


@pytest.fixture(scope="module")
def gateway(k8s_cluster: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    options = ("--source-ip", SOURCE_IP, "--preamble-timeout", "3", "--heartbeat", "1")
    with cluster.gateway(k8s_cluster, log, *options) as address:
        host, port = address.rsplit(":", 1)

        class Gw:
            address = (host, int(port))
            log_path = log

        yield Gw


DRIVER = r"""
import json, os, sys, time
import kt

class Recorder:
    def __init__(self):
        self.seen = []
    def record(self, i):
        self.seen.append(i)
        return i
    def history(self):
        return self.seen
    def put_direct(self, key):
        import torch
        kt.put(key, {"w": torch.arange(1000.0)}, transport="gloo")

def probe():
    import torch, torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    t = torch.tensor([float(os.environ["RANK"])])
    dist.all_reduce(t)
    return t.item()

pool = kt.Compute(cpus=2, replicas=2, backend="k8s", name=sys.argv[1])
actors = [kt.cls(Recorder).options(compute=pool).remote() for _ in range(4)]
results = kt.get([actors[i % 4].record.remote(i) for i in range(2000)], timeout=120)
assert results == list(range(2000))
assert all(a.history() == list(range(i, 2000, 4)) for i, a in enumerate(actors))
group = kt.fn(probe).to(
    kt.Compute(cpus=2, backend="k8s", name=sys.argv[1] + "-spmd").distribute(
        "pytorch", workers=2, procs_per_worker=2
    )
)
sums = group.remote().result(timeout=120)
time.sleep(3)  # idle: the gateway sends heartbeats
assert actors[0].record(7) == 7
# a value an actor holds for direct transfers: this driver cannot dial its pod, so it
# reads the pod's host copy through the gateway without trying (no fallback counted)
import torch
from kt.actors import direct
actors[0].put_direct("gw/direct")
into = {"w": torch.zeros(1000)}
kt.get("gw/direct", into=into, timeout=60)
assert bool((into["w"] == torch.arange(1000.0)).all())
assert direct.counts.fallbacks == 0 and direct.counts.received == 0, direct.counts
print(json.dumps({"sums": sums, "pid": os.getpid()}), flush=True)
sys.stdin.readline()  # stay connected while the test looks at the pods
group.teardown()
"""


def _status(address: tuple[str, int], token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1] + 1}/status",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return dict(json.loads(reply.read()))


def _pool_pods(pool: str, namespace: str | None = None) -> list[tuple[tuple[str, int], str]]:
    provider = get_provider("k8s")
    provider.open_pool(pool, namespace)
    runtime = get_driver().runtime
    pods = runtime.run(provider.list_pods(pool))
    token = runtime.run(provider.read_token(pool))
    assert token is not None
    return [(p.address, token) for p in pods]


def _api_address(kubeconfig: pathlib.Path) -> tuple[str, int]:
    server = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def _drive(
    argv: list[str], env: dict[str, str], pool: str, namespace: str | None = None
) -> set[str]:
    """Run DRIVER (fan-out over actors, an SPMD group) and the addresses its connections
    reached the pods from."""
    driver = subprocess.Popen(
        [*argv, pool],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line, driver.stderr.read() if driver.stderr else ""
        out = json.loads(line)
        assert out["sums"] == [6.0, 6.0, 6.0, 6.0]
        seen = set()
        for name in (pool, f"{pool}-spmd"):
            for address, token in _pool_pods(name, namespace):
                for peer in _status(address, token)["peers"]:
                    if peer["caller"] == f"driver-{out['pid']}":
                        seen.add(peer["address"])
    finally:
        if driver.stdin is not None:
            driver.stdin.write("\n")
            driver.stdin.flush()
        driver.wait(60)
    assert driver.returncode == 0, driver.stderr.read() if driver.stderr else ""
    return seen


def test_a_driver_that_reaches_only_the_gateway_runs_actors_and_a_group(
    gateway: Any, k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {
        **os.environ,
        "KUBECONFIG": str(k8s_cluster),
        "KT_GATEWAY": f"{gateway.address[0]}:{gateway.address[1]}",
    }
    # its own network namespace: the API server and the gateway, nothing else
    with netns.reaching([_api_address(k8s_cluster), gateway.address], tmp_path) as prefix:
        seen = _drive([*prefix, sys.executable, str(script)], env, f"gw-{uuid.uuid4().hex[:6]}")
    assert seen == {SOURCE_IP}, seen  # every connection came from the gateway


def test_outside_the_cluster_kt_finds_the_gateway_and_port_forwards_to_it(
    k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    release, served = f"kt-{tag}", f"team-{tag}"
    port = free_port()  # the gateway pod binds the host's port: one free here
    objects = chart.render({"namespaces": [served], "gateway": {"port": port}}, namespace=release)
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        for ns in (release, served)
    ]
    kinds = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap")
    installed = [o for o in objects if o["kind"] in kinds]
    pod = chart.gateway_pod(objects, f"kt-{tag}-gateway-0")
    for name, items in (("ns", namespaces), ("chart", installed), ("pod", [pod])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        kubectl("1.33", k8s_cluster, "create", "--validate=false", "-f", str(path))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster), "KT_NAMESPACE": served}
    env |= {"KT_BACKEND": "k8s", "COLUMNS": "300"}
    env.pop("KT_GATEWAY", None)
    # only the API server: the gateway is reached through a port-forward
    with netns.reaching([_api_address(k8s_cluster)], tmp_path) as prefix:
        said = subprocess.run(
            [*prefix, sys.executable, "-m", "kt.cli", "config"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert said.returncode == 0, said.stderr
        assert "port-forward" in said.stdout and f"gateway {release}/" in said.stdout, said.stdout
        seen = _drive([*prefix, sys.executable, str(script)], env, f"pf-{tag}", served)
    name = pod["metadata"]["name"]
    found = json.loads(
        kubectl("1.33", k8s_cluster, "get", "pod", name, "-n", release, "-o", "json")
    )
    assert seen == {found["status"]["podIP"]}, seen  # every connection came from the gateway pod
    kubectl("1.33", k8s_cluster, "delete", "pod", name, "-n", release)


def _ask(address: tuple[str, int], data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(address, 5) as s:
        if data:
            s.sendall(data)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except TimeoutError:
            out += b"<still open>"
        return out


def test_a_gateway_whose_api_server_never_answers_refuses_saying_so(
    tmp_path: pathlib.Path,
) -> None:
    with (
        silent_api_server(tmp_path) as (kubeconfig, _),
        cluster.gateway(kubeconfig, tmp_path / "gateway.log") as address,
    ):
        host, port = address.rsplit(":", 1)
        to = (host, int(port))
        for _ in range(2):  # and again: it still serves
            began = time.monotonic()
            answer = _ask(to, protocol.gateway_preamble(("127.1.2.3", 7170), "t"), 40)
            said = answer.decode("utf-8", "replace")
            assert said.startswith("refused: internal: cannot tell whether 127.1.2.3"), said
            assert "the API server did not answer within 10 s" in said, said
            assert time.monotonic() - began < 30


class Echo:
    def ping(self) -> str:
        return "pong"


def test_attacks_are_refused_and_the_gateway_keeps_serving(
    gateway: Any, k8s_cluster: pathlib.Path
) -> None:
    compute = kt.Compute(cpus=1, replicas=1, backend="k8s", name=f"gw-{uuid.uuid4().hex[:6]}")
    echo = kt.cls(Echo).options(compute=compute).remote()
    assert echo.ping() == "pong"
    assert compute.name is not None
    ((pod, token),) = _pool_pods(compute.name)
    api_port = int(
        json.loads(k8s_cluster.read_text())["clusters"][0]["cluster"]["server"].rsplit(":", 1)[1]
    )
    calls = _status(pod, token)["actors"][0]["calls"]
    before = gateway.log_path.read_text().count("refused")
    attacks = {
        "random bytes": (os.urandom(64).replace(b"\n", b"") + b"\n", "refused: "),
        "never finished": (b'KTGW1 {"target": ', "no whole preamble in time"),
        "over the cap": (b"x" * 5000, "at most 4096 bytes"),
        "the API server": (
            protocol.gateway_preamble(("127.0.0.1", api_port), token),
            "is not a kt supervisor's",
        ),
        "no kt pod there": (
            protocol.gateway_preamble(("127.0.0.1", 7170), token),
            "127.0.0.1 is not a live kt pod",
        ),
        "wrong token": (protocol.gateway_preamble(pod, "not-the-token"), "wrong token"),
    }
    for name, (data, said) in attacks.items():
        answer = _ask(gateway.address, data).decode("utf-8", "replace")
        assert answer.startswith("refused: ") and said in answer, (name, answer)
    for _ in range(3):  # health probes (the chart's tcpSocket): connect, close, not logged
        socket.create_connection(gateway.address, 5).close()
    time.sleep(0.5)
    after = gateway.log_path.read_text().count("refused")
    assert after - before == len(attacks)  # one logged line each, none for the probes
    # bytes after the preamble, before `ok`: refused too (a driver waits for `ok`)
    answer = _ask(gateway.address, protocol.gateway_preamble(pod, token) + b"\x00" * 64)
    assert answer.startswith(b"refused: ")
    # a right preamble, `ok`, then bytes that are not a HELLO: the pod closes it
    refused = asyncio.run(_garbage_after_ok(gateway.address, pod, token))
    assert protocol.PREFIX.unpack(refused[: protocol.PREFIX_SIZE])[1] == protocol.FrameKind.REFUSED
    assert _status(pod, token)["actors"][0]["calls"] == calls  # nothing more ran
    # and the gateway still relays a caller that says HELLO
    assert asyncio.run(_hello_through(gateway.address, pod, token)) == protocol.FrameKind.WELCOME


async def _garbage_after_ok(gateway: tuple[str, int], pod: tuple[str, int], token: str) -> bytes:
    reader, writer = await asyncio.open_connection(*gateway)
    writer.write(protocol.gateway_preamble(pod, token))
    assert await reader.readline() == protocol.GATEWAY_OK
    call = protocol.encode(protocol.FrameKind.CALL, 1, {"a": "x", "m": "y"}, os.urandom(32))
    writer.write(call)  # a whole frame, but no HELLO first
    rest = await asyncio.wait_for(reader.read(), 10)  # REFUSED, then closed by the pod
    writer.close()
    return rest


async def _hello_through(gateway: tuple[str, int], pod: tuple[str, int], token: str) -> int:
    reader, writer = await asyncio.open_connection(*gateway)
    writer.write(protocol.gateway_preamble(pod, token))
    assert await reader.readline() == protocol.GATEWAY_OK
    hello = {"v": protocol.VERSION, "token": token, "caller": "test", "host": "", "actor": ""}
    writer.write(protocol.encode(protocol.FrameKind.HELLO, 0, hello))
    prefix = await reader.readexactly(protocol.PREFIX_SIZE)
    kind = protocol.PREFIX.unpack(prefix)[1]
    writer.close()
    return int(kind)


class _Written:
    """Stands in for the driver's transport: what the gateway wrote to it."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_a_quiet_pod_gets_the_driver_pongs_and_a_busy_one_does_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        down, up = _Pipe(loop.create_future(), frames=True), _Pipe(loop.create_future())
        driver = _Written()
        down.peer, up.transport = up, driver  # type: ignore[assignment]
        beat = asyncio.ensure_future(down.beat(0.05))
        await asyncio.sleep(0.18)
        assert driver.data.count(protocol.PONG_FRAME) >= 2  # quiet: a PONG each period
        frame = protocol.encode(protocol.FrameKind.LOG, 0, {"src": "x"}, b"y" * 100)
        driver.data = b""
        down.data_received(frame[:30])  # the pod is in the middle of a frame
        await asyncio.sleep(0.18)
        assert driver.data == frame[:30]  # no PONG cut into it
        down.data_received(frame[30:])
        await asyncio.sleep(0.18)
        assert driver.data.startswith(frame) and protocol.PONG_FRAME in driver.data[len(frame) :]
        beat.cancel()

    asyncio.run(main())


def test_a_heartbeat_goes_only_between_frames() -> None:
    frames = [
        protocol.encode(protocol.FrameKind.LOG, 0, {"src": "x"}, b"y" * n) for n in (0, 7, 300)
    ]
    stream = b"".join(frames)
    loop = asyncio.new_event_loop()
    for cut in range(1, len(stream)):
        pipe = _Pipe(loop.create_future(), frames=True)
        pipe._follow(stream[:cut])
        between = cut in (len(frames[0]), len(frames[0]) + len(frames[1]))
        assert (pipe.left == 0 and pipe.prefix == b"") == between, cut
        pipe._follow(stream[cut:])
        assert pipe.left == 0 and pipe.prefix == b""
    loop.close()
