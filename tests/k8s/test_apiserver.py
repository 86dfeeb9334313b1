"""The test cluster's API server, driven by real clients: kubernetes_asyncio and kubectl.

Behaviours covered:
- create, get, list with label and field selectors, merge patch, replace (409 Conflict
  on a stale resourceVersion), delete, then 404 -- each answered with a Status body the
  client turns into its ApiException;
- a watch from a list's resourceVersion sees ADDED, MODIFIED (a status update) and
  DELETED in order; a version older than the kept history gets 410 Gone;
- deleting an owner removes what names it in ownerReferences (cascade); a pod bound to a
  node is deleted gracefully (deletionTimestamp first, gone after a delete with grace 0);
- a wrong bearer token gets 401;
- a watch whose client stopped reading (its socket full) holds up no other request, and
  is closed after UNREAD_S;
- kubectl 1.27 and 1.33 (two independent clients) list and delete pods against it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from kt.testing import apiserver
from tests.distributed.torchrun import free_port
from tests.k8s.kubectl import kubectl_path

pytestmark = pytest.mark.timeout(120)
TOKEN = "test-token"


async def _api(token: str = TOKEN) -> AsyncIterator[tuple[client.CoreV1Api, str, bytes]]:
    port = free_port()
    tls = apiserver.make_tls()
    runner, _ = await apiserver.serve("127.0.0.1", port, TOKEN, tls)
    url = f"https://127.0.0.1:{port}"
    ca = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)
    ca.write(tls.ca_pem)
    ca.close()
    config = client.Configuration(host=url)
    config.ssl_ca_cert = ca.name
    config.api_key = {"BearerToken": f"Bearer {token}"}
    api_client = client.ApiClient(config)
    try:
        yield client.CoreV1Api(api_client), url, tls.ca_pem
    finally:
        await api_client.close()
        await runner.cleanup()
        os.unlink(ca.name)


def _run(body: Any) -> None:
    async def main() -> None:
        async for api, url, ca in _api():
            await body(api, url, ca)

    asyncio.run(main())


def _pod(name: str, labels: dict[str, str] | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="python:3.11")]),
    )


def test_crud_selectors_conflicts_and_status_codes() -> None:
    async def body(api: client.CoreV1Api, url: str, ca: bytes) -> None:
        cm = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="a", labels={"app": "kt", "tier": "x"}),
            data={"k": "1"},
        )
        made = await api.create_namespaced_config_map("default", cm)
        assert made.metadata.uid and made.metadata.resource_version
        await api.create_namespaced_config_map(
            "default",
            client.V1ConfigMap(metadata=client.V1ObjectMeta(name="b", labels={"app": "other"})),
        )
        with pytest.raises(ApiException) as info:
            await api.create_namespaced_config_map("default", cm)
        assert info.value.status == 409 and json.loads(info.value.body)["reason"] == "AlreadyExists"
        for selector, names in (
            ("app=kt", ["a"]),
            ("app!=kt", ["b"]),
            ("app in (kt,other)", ["a", "b"]),
            ("tier", ["a"]),
            ("!tier", ["b"]),
        ):
            listed = await api.list_namespaced_config_map("default", label_selector=selector)
            assert [i.metadata.name for i in listed.items] == names, selector
        by_field = await api.list_namespaced_config_map("default", field_selector="metadata.name=b")
        assert [i.metadata.name for i in by_field.items] == ["b"]
        patched = await api.patch_namespaced_config_map("a", "default", {"data": {"k": "2"}})
        assert patched.data == {"k": "2"}
        made.data = {"k": "stale"}
        with pytest.raises(ApiException) as info:
            await api.replace_namespaced_config_map("a", "default", made)  # old version
        assert info.value.status == 409 and json.loads(info.value.body)["reason"] == "Conflict"
        await api.delete_namespaced_config_map("a", "default")
        with pytest.raises(ApiException) as info:
            await api.read_namespaced_config_map("a", "default")
        assert info.value.status == 404

    _run(body)


def test_watch_sees_changes_in_order_and_old_versions_are_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(apiserver, "HISTORY", 20)

    async def body(api: client.CoreV1Api, url: str, ca: bytes) -> None:
        start = (await api.list_namespaced_pod("default")).metadata.resource_version
        seen: list[tuple[str, str]] = []

        async def follow() -> None:
            async with watch.Watch().stream(
                api.list_namespaced_pod, "default", resource_version=start, timeout_seconds=10
            ) as stream:
                async for event in stream:
                    seen.append((event["type"], event["object"].status.phase))
                    if event["type"] == "DELETED":
                        return

        watcher = asyncio.get_running_loop().create_task(follow())
        await asyncio.sleep(0.2)
        await api.create_namespaced_pod("default", _pod("p"))
        await api.patch_namespaced_pod_status("p", "default", {"status": {"phase": "Running"}})
        await api.delete_namespaced_pod("p", "default")
        await asyncio.wait_for(watcher, 10)
        assert seen == [("ADDED", "Pending"), ("MODIFIED", "Running"), ("DELETED", "Running")]
        for i in range(30):  # push the start out of the kept history
            await api.create_namespaced_config_map(
                "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}"))
            )
        raw = await api.list_namespaced_pod(
            "default", watch=True, resource_version=start, _preload_content=False
        )
        first = json.loads((await raw.content.readline()).decode())
        assert first["type"] == "ERROR" and first["object"]["code"] == 410

    _run(body)


def test_cascade_graceful_pods_and_auth() -> None:
    async def body(api: client.CoreV1Api, url: str, ca: bytes) -> None:
        owner = await api.create_namespaced_config_map(
            "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
        )
        ref = client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
        )
        pod = _pod("owned")
        pod.metadata.owner_references = [ref]
        await api.create_namespaced_pod("default", pod)
        await api.delete_namespaced_config_map("owner", "default")
        assert (await api.list_namespaced_pod("default")).items == []

        await api.create_namespaced_pod("default", _pod("bound"))
        binding = client.V1Binding(
            metadata=client.V1ObjectMeta(name="bound"),
            target=client.V1ObjectReference(kind="Node", name="node-1"),
        )
        await api.create_namespaced_pod_binding("bound", "default", binding, _preload_content=False)
        await api.delete_namespaced_pod("bound", "default")
        still = await api.read_namespaced_pod("bound", "default")
        assert still.metadata.deletion_timestamp is not None and still.spec.node_name == "node-1"
        await api.delete_namespaced_pod("bound", "default", grace_period_seconds=0)
        with pytest.raises(ApiException):
            await api.read_namespaced_pod("bound", "default")

    _run(body)

    async def wrong() -> None:
        async for api, _, _ in _api(token="nope"):
            with pytest.raises(ApiException) as info:
                await api.list_namespaced_pod("default")
            assert info.value.status == 401

    asyncio.run(wrong())


def test_a_watch_whose_client_stopped_reading_holds_up_no_one_else(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that watches and never reads again (a process stopped, a relay that stopped
    reading) fills its socket; its watch then waits to write, and nothing else may wait
    with it. Before, a watch wrote its bookmark holding the lock every change takes: once
    that write waited, every create, update and delete waited forever. After UNREAD_S
    the server closes that watch, as kube-apiserver closes a watcher that falls behind."""
    monkeypatch.setattr(apiserver, "BOOKMARK_S", 0.0)  # a bookmark each turn: full at once
    monkeypatch.setattr(apiserver, "UNREAD_S", 3.0)

    async def body() -> None:
        port = free_port()
        tls = apiserver.make_tls()
        runner, server = await apiserver.serve("127.0.0.1", port, TOKEN, tls)
        loop = asyncio.get_running_loop()
        with tempfile.NamedTemporaryFile(suffix=".pem") as ca, socket.socket() as raw:
            ca.write(tls.ca_pem)
            ca.flush()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            await loop.run_in_executor(None, raw.connect, ("127.0.0.1", port))
            context = ssl.create_default_context(cafile=ca.name)
            stalled = context.wrap_socket(
                raw, server_hostname="127.0.0.1", do_handshake_on_connect=False
            )
            await loop.run_in_executor(None, stalled.do_handshake)  # the server is this loop
            path = "/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=true"
            head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}"
            stalled.sendall(f"{head}\r\n\r\n".encode())
            deadline = time.monotonic() + 60
            while not any(  # until the server holds more for it than its socket takes
                c.transport is not None and c.transport.get_write_buffer_size() > 1 << 16
                for c in runner.server.connections
            ):
                assert time.monotonic() < deadline, "the watch's socket never filled"
                await asyncio.sleep(0.05)
            configmaps = apiserver.RESOURCES["configmaps"]
            for i in range(20):  # each waits at most 5 s; before, one of the first waited forever
                made = server.store.create(configmaps, "default", {"metadata": {"name": f"c{i}"}})
                await asyncio.wait_for(made, 5)
                await asyncio.sleep(0.05)
            while runner.server.connections:  # then it closes the watch that read nothing
                assert time.monotonic() < deadline, "the unread watch was never closed"
                await asyncio.sleep(0.1)
            stalled.close()
        await runner.cleanup()

    with caplog.at_level(logging.WARNING, logger=apiserver.__name__):
        asyncio.run(body())
    assert "closing the watch /api/v1/namespaces/default/configmaps?watch=1" in caplog.text


@pytest.mark.parametrize("version", ["1.27", "1.33"])
def test_kubectl_lists_and_deletes_pods(version: str, tmp_path: pathlib.Path) -> None:
    kubectl = kubectl_path(version)

    async def body(api: client.CoreV1Api, url: str, ca: bytes) -> None:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps(apiserver.kubeconfig(url, TOKEN, ca)))
        await api.create_namespaced_pod("default", _pod("one", {"kt.dev/pool": "p"}))
        await api.create_namespaced_pod("default", _pod("two", {"kt.dev/pool": "q"}))

        async def run(*args: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                kubectl,
                f"--kubeconfig={kubeconfig}",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "HOME": str(tmp_path)},
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
            return out.decode()

        listed = json.loads(await run("get", "pods", "-l", "kt.dev/pool=p", "-o", "json"))
        assert [i["metadata"]["name"] for i in listed["items"]] == ["one"]
        table = await run("get", "pods")
        assert "one" in table and "two" in table
        await run("delete", "pod", "two", "--wait=false")
        names = [p.metadata.name for p in (await api.list_namespaced_pod("default")).items]
        assert names == ["one"]

    _run(body)
