"""Port-forward through the API server (kt.k8s.portforward over the test API server's
`pods/<name>/portforward` websocket, subprotocol v4.channel.k8s.io).

Behaviours covered:
- a service account whose Role has `get` but not `create` on pods/portforward is refused
  (403 naming create and pods/portforward): the local connection closes with nothing
  relayed and the failure is counted;
- with both verbs, bytes go both ways unchanged through the channel protocol (the port
  prefix of each channel stripped), a 4 MiB payload included, over several connections;
- a pod port where nothing listens: the API server says so on the error channel and the
  local connection closes; a pod that `pick` cannot name (none Ready) closes it too.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from typing import Any

import pytest
from kubernetes_asyncio import client

from kt.k8s.portforward import PortForward
from tests.distributed.torchrun import free_port
from tests.k8s import secure_api

pytestmark = pytest.mark.timeout(60)
ADMIN = "pf-admin"
NS = "team-pf"


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _round_trip(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    await writer.drain()
    got = b""
    while len(got) < len(payload):
        chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
        if not chunk:
            break
        got += chunk
    writer.close()
    return got


async def _closed_without_data(address: tuple[str, int]) -> bool:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"anything")
    try:
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed with our bytes unread
        rest = b""
    writer.close()
    return rest == b""


def test_a_port_forward_relays_both_ways_when_rbac_allows_it(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        admin, url, ca, runner = await secure_api.start(tmp_path, ADMIN)
        core, auth = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
        echo, echo_port = await _echo_server()
        forwards: list[PortForward] = []
        try:
            await core.create_namespace({"metadata": {"name": NS}})
            await core.create_namespaced_service_account(NS, {"metadata": {"name": "driver"}})
            pod: dict[str, Any] = {
                "metadata": {"name": "gateway-0"},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            }
            await core.create_namespaced_pod(NS, pod)
            running = await core.read_namespaced_pod("gateway-0", NS)
            running.status = {"phase": "Running", "podIP": "127.0.0.1"}
            await core.replace_namespaced_pod_status("gateway-0", NS, running)
            rule = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get"]}
            role = {"metadata": {"name": "pf"}, "rules": [rule]}
            await auth.create_namespaced_role(NS, role)
            binding = {
                "metadata": {"name": "pf"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pf"},
                "subjects": [{"kind": "ServiceAccount", "name": "driver", "namespace": NS}],
            }
            await auth.create_namespaced_role_binding(NS, binding)
            issued = await core.create_namespaced_service_account_token(
                "driver", NS, {"spec": {"audiences": []}}
            )
            conf = secure_api.configuration(url, issued.status.token, ca)

            async def pick() -> str:
                return "gateway-0"

            forward = PortForward(conf, NS, pick, echo_port)
            forwards.append(forward)
            local = await forward.start()
            assert await _closed_without_data(local)  # get alone: no create
            assert forward.failures == 1
            assert "create and get on pods/portforward in namespace team-pf" in caplog.text
            rule["verbs"] = ["get", "create"]
            await auth.replace_namespaced_role("pf", NS, role)
            assert await _round_trip(local, b"hello") == b"hello"
            big = os.urandom(4 << 20)
            results = await asyncio.gather(*(_round_trip(local, big) for _ in range(3)))
            assert all(r == big for r in results)
            assert forward.failures == 1

            nothing = PortForward(conf, NS, pick, free_port())  # nothing listens there
            forwards.append(nothing)
            assert await _closed_without_data(await nothing.start())
            assert nothing.failures == 1
            assert f"error forwarding port {nothing.port} to pod gateway-0" in caplog.text

            async def none_ready() -> str:
                raise LookupError("no Ready kt gateway pod")

            unnamed = PortForward(conf, NS, none_ready, echo_port)
            forwards.append(unnamed)
            assert await _closed_without_data(await unnamed.start())
            assert unnamed.failures == 1
        finally:
            for f in forwards:
                await f.close()
            echo.close()
            await admin.close()
            await runner.cleanup()

    asyncio.run(main())
